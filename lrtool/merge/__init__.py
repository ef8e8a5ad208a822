"""Merge methods: combine LoRA adapters into one adapter (or into a base model's weights), exactly.

Each method is one small file in this package that defines `METHOD` (a `base.Method`: its name, a one-line
summary, its parameters and its computation on one module), registered by name in `REGISTRY` below. A
method file imports only base.py, sparsify.py and spectral.py. The rest, from the bottom up:

    base.py        what a method is made of: Method, Parameter, Settings, ModuleInputs, Update
    sparsify.py    trim, drop and elect, the steps the entry-wise methods share (ties, dare-*, della*, ...)
    spectral.py    the steps the SVD-based methods share (tsv, iso-c, iso-cts, core-space)
    fused.py       the dense methods through the fused kernel where kernels run (a CUDA device)
    receipt.py     merge_report.json: the receipt, its summary lines, the inputs' sha256
    plan.py        plan_merge: every check, modules lined up; each module computed and stored as a LoRA
    into_base.py   --into-base: the exact update added to a Hugging Face model directory's weights
    run.py         one merge top down, as `lrtool merge` runs it: load -> plan -> write -> receipt

    from lrtool.merge.plan import plan_merge
    plan = plan_merge([load_adapter("a/"), load_adapter("b/")], "ties", density=0.3)
    result = plan.to_adapter()      # result.adapter: the stored LoRA; result.report: the receipt

Importing this package is cheap (no torch): `REGISTRY` lists the names without importing the method files,
so the command line can offer them as choices; looking a method up imports its file, which imports no torch
either until it computes, so `describe_methods()` (merge --list, the man page) stays cheap too. Reads and
writes nothing.
"""

from lrtool.registry import Registry

# name -> the file (module of this package) that defines its METHOD. Names are what `--method` takes.
_FILES = {
    "linear": "linear",
    "svd": "svd",
    "factor-avg": "factor_avg",
    "ties": "ties",
    "dare-linear": "dare_linear",
    "dare-ties": "dare_ties",
    "magnitude-prune": "magnitude_prune",
    "knots": "knots",
    "task-arithmetic": "task_arithmetic",
    "della": "della",
    "della-linear": "della_linear",
    "breadcrumbs": "breadcrumbs",
    "breadcrumbs-ties": "breadcrumbs_ties",
    "sce": "sce",
    "slerp": "slerp",
    "karcher": "karcher",
    "tsv": "tsv",
    "iso-c": "iso_c",
    "iso-cts": "iso_cts",
    "core-space": "core_space",
}
REGISTRY = Registry(__name__, _FILES, "merge method")
get = REGISTRY.get
describe_methods = REGISTRY.describe

__all__ = ["REGISTRY", "describe_methods", "get"]
