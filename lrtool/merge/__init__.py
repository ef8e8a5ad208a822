"""Merge methods: combine LoRA adapters into one adapter (or into a base model's weights), exactly.

Each method is one small file in this package that defines `METHOD` (a `base.Method`: its name, a one-line
summary, its parameters and its computation on one module), registered by name in `REGISTRY` below. The
shared machinery (lining adapters up by module, weights, storing the result as a LoRA, the receipt) is in
`base.py`; adding a base model's weights (`--into-base`) is in `into_base.py`.

    from lrtool.merge import plan_merge
    plan = plan_merge([load_adapter("a/"), load_adapter("b/")], "ties", density=0.3)
    result = plan.to_adapter()      # result.adapter: the stored LoRA; result.report: the receipt

Importing this package is cheap (no torch): `REGISTRY` lists the names without importing the method files,
so the command line can offer them as choices; looking a method up imports its file.
"""

import importlib
from collections.abc import Iterator, Mapping

from lrtool.errors import UsageError

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
}


class _Registry(Mapping):
    """name -> Method, importing a method's file (and with it torch) only when the method is looked up."""

    def __init__(self, files: dict[str, str]):
        self._files = dict(files)

    def __getitem__(self, name: str):
        return importlib.import_module(f"{__name__}.{self._files[name]}").METHOD

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


REGISTRY = _Registry(_FILES)


def get(name: str):
    """The registered method called `name`; a usage error listing the valid names when there is none."""
    if name not in REGISTRY:
        raise UsageError(f"unknown merge method {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def describe_methods() -> list[dict]:
    """One JSON-ready object per method, in registry order: name, summary, parameters (default, help)."""
    return [REGISTRY[name].describe() for name in REGISTRY]


# The rest of the API lives in base.py, which imports torch; it is loaded on first use (PEP 562).
_API = (
    "MergePlan",
    "MergeResult",
    "Method",
    "ModuleInputs",
    "Parameter",
    "Settings",
    "Update",
    "check_weights",
    "parse_weights",
    "plan_merge",
    "prepare",
    "summary_lines",
)


def __getattr__(name: str):
    if name in _API:
        from lrtool.merge import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["REGISTRY", "describe_methods", "get", *_API]
