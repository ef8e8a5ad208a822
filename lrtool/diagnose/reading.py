"""Read LoRA adapters for diagnose without refusing anything: what their files hold, as findings, and the
modules the figures can cover. Two stages per input, so that a file the canonical reader refuses is still
reported in full:

1. survey: lrtool.adapters' survey of the config and the safetensors header; each of its problems becomes a
   finding with the same code and message.
2. load: the canonical reader's modules (the exact scales merge would apply), also for a file it refuses:
   the well-formed modules are read with the same scale rules. Integer (quantised) factors are an
   unsupported feature, left out; float8 factors are read in float64, as torch computes nothing in float8.

Also here: a base model's weights, known from their safetensors headers (`BaseWeights`), the renaming of
kohya's mangled module names to the base's paths, and the findings of an adapter against its base.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lrtool.adapters import Adapter, LoraModule, Survey, check_computable, match_module_names, survey
from lrtool.adapters.read import adapter_of
from lrtool.diagnose.findings import finding
from lrtool.errors import IncompatibleError, InputError, LrtoolError, one_line


@dataclass
class AdapterInput(Survey):
    """One ADAPTER argument: its survey, the findings it makes, and what could be loaded for the figures."""

    findings: list[dict] = field(default_factory=list)
    refused: str | None = None  # why merge refuses it, or None
    lora: dict[str, LoraModule] = field(default_factory=dict)  # the modules the figures cover
    modules: dict[str, dict] = field(default_factory=dict)  # module -> its report entry

    @property
    def unreadable(self) -> bool:
        return any(f["code"] == "unreadable" for f in self.findings)

    def add(self, *args, **kwargs) -> None:
        """A finding (where a Survey adds problems, diagnose adds the findings it reports)."""
        self.findings.append(finding(*args, **kwargs))


def read_adapter(path: str) -> AdapterInput:
    """Both stages: the findings about the files at `path`, and the modules the figures can cover."""
    found = survey(path)
    item = AdapterInput(**vars(found))
    for problem in found.problems:
        item.add(problem.code, problem.text, problem.module, problem.severity)
    if found.refusal is not None:
        item.refused = found.refusal.text
    if not item.unreadable:
        _load(item, found)
    return item


def _load(item: AdapterInput, found: Survey) -> None:
    """Fill item.lora with the finite, well-formed modules, scaled as the canonical reader scales them."""
    try:
        adapter = adapter_of(found, item.well_formed)
    except InputError as error:
        item.add("unreadable", one_line(error))
        return
    if item.refused is None:
        try:  # integer or non-finite factors: merge and eval refuse them; the findings below say where
            check_computable(adapter)
        except LrtoolError as error:
            item.refused = one_line(error)
    for name, module in adapter.modules.items():
        integer = sorted({_dtype_name(t) for t in (module.A, module.B) if not t.is_floating_point()})
        if integer:
            message = f"integer (quantised?) factors ({', '.join(integer)}): left out of the figures"
            item.add("unsupported-feature", message, name)
            continue
        module = LoraModule(A=_computable(module.A), B=_computable(module.B), scale=module.scale)
        problem = _non_finite(module)
        if problem:
            item.add("non-finite", problem, name)
        else:
            item.lora[name] = module


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _computable(tensor: torch.Tensor) -> torch.Tensor:
    """A floating-point tensor in a dtype torch computes with: float8 (which has no isfinite, norm or
    matmul on the CPU) as float64, others as they are."""
    return tensor.to(torch.float64) if tensor.dtype.itemsize < 2 else tensor


def _non_finite(module: LoraModule) -> str | None:
    """What is not finite in a module (its factors, its scale), or None."""
    bad = [
        f"{role} holds {int((~torch.isfinite(t)).sum())} NaN or infinite values"
        for role, t in (("A", module.A), ("B", module.B))
        if not torch.isfinite(t).all()
    ]
    if not math.isfinite(module.scale):
        bad.append(f"the scale is {module.scale}")
    return "; ".join(bad) or None


# ---------------------------------------------------------------------------------------------------------
# The base


@dataclass
class BaseWeights:
    """A Hugging Face model directory's weights, known by their safetensors headers; norms read on demand."""

    path: str
    shapes: dict[str, list[int]]  # module path -> weight shape
    files: dict[str, Path]  # module path -> the file holding `<module>.weight`
    _norms: dict[str, float | None] = field(default_factory=dict, repr=False)  # read on demand, kept

    @classmethod
    def read(cls, spec: str) -> BaseWeights:
        """Read the weight headers of a local model directory; InputError when it is not one."""
        path = Path(spec)
        if not path.is_dir():
            raise InputError(f"{spec}: no such directory; --base takes a local Hugging Face model directory")
        if not (path / "config.json").is_file():
            raise InputError(f"{spec}: not a model directory (no config.json)")
        index = path / "model.safetensors.index.json"
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted({path / name for name in weight_map.values()})
            else:
                files = sorted(path.glob("*.safetensors"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise InputError(f"{index}: not a safetensors index ({' '.join(str(error).split())})") from None
        if not files:
            pickled = sorted(p.name for p in path.glob("*.bin"))
            what = (
                f"only pickled weights ({', '.join(pickled)}), never unpickled" if pickled else "no weights"
            )
            raise InputError(f"{spec}: {what}; diagnose reads a base's .safetensors files")
        shapes, where = {}, {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        if key.endswith(".weight"):
                            shapes[key.removesuffix(".weight")] = list(f.get_slice(key).get_shape())
                            where[key.removesuffix(".weight")] = file
            except (SafetensorError, OSError) as error:
                raise InputError(
                    f"{file}: not a readable safetensors file ({' '.join(str(error).split())})"
                ) from None
        return cls(path=spec, shapes=shapes, files=where)

    def norm(self, module: str) -> float | None:
        """||W||_F of `<module>.weight` (None for integer, i.e. quantized, weights)."""
        if module not in self._norms:
            with safe_open(str(self.files[module]), framework="pt") as f:
                weight = f.get_tensor(module + ".weight")
            floating = weight.is_floating_point()
            self._norms[module] = (
                float(torch.linalg.vector_norm(_computable(weight), dtype=torch.float64))
                if floating
                else None
            )
        return self._norms[module]


def rename_modules(item: AdapterInput, reference: set[str], base: BaseWeights | None) -> None:
    """Rename kohya's underscore-mangled module names to the reference's dotted paths (adapters'
    match_module_names), in the modules, the findings and item.lora."""
    names = set(item.groups) | {f["module"] for f in item.findings if f["module"]}
    if not names or not reference:
        return
    # match_module_names renames an Adapter's modules; a placeholder per name tells which name went where.
    placeholders = {name: LoraModule(A=torch.empty(0, 0), B=torch.empty(0, 0), scale=0.0) for name in names}
    try:
        renamed = match_module_names(Adapter(modules=placeholders, source=item.path), reference)
    except IncompatibleError as error:
        if base is not None:
            item.add("missing-in-base", f"cannot match its modules to the base's: {error}")
        return
    new_name = {id(placeholder): name for name, placeholder in renamed.modules.items()}
    mapping = {name: new_name[id(placeholder)] for name, placeholder in placeholders.items()}
    item.groups = {mapping[m]: slots for m, slots in item.groups.items()}
    item.well_formed = {mapping[m] for m in item.well_formed}
    item.lora = {mapping[m]: module for m, module in item.lora.items()}
    for f in item.findings:
        f["module"] = mapping.get(f["module"], f["module"])


def check_base(item: AdapterInput, base: BaseWeights) -> None:
    """missing-in-base and base-shape-mismatch; modules that fail either get no relative norm."""
    transposed = bool((item.config or {}).get("fan_in_fan_out", False))  # GPT-2's Conv1D stores [in, out]
    for name in sorted(item.well_formed):
        slots = item.groups[name]
        out_features, in_features = item.shapes[slots["B"]][0], item.shapes[slots["A"]][1]
        if name not in base.shapes:
            item.add(
                "missing-in-base", f"the base has no weight {name}.weight: this update would do nothing", name
            )
            continue
        expected = [in_features, out_features] if transposed else [out_features, in_features]
        if base.shapes[name] != expected:
            item.add(
                "base-shape-mismatch",
                f"the update is [out, in] = [{out_features}, {in_features}] but the base weight is "
                f"{base.shapes[name]}",
                name,
            )
