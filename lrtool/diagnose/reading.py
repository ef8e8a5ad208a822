"""Read LoRA adapters for diagnose without refusing anything: what their files hold, as findings, and the
modules the figures can cover. Two stages per input, so that a file the canonical reader refuses is still
reported in full:

1. survey: lrtool.adapters' survey of the config and the safetensors header; each of its problems becomes a
   finding with the same code and message.
2. load: the canonical reader's modules (the exact scales merge would apply, and where they came from),
   also for a file it refuses: the well-formed modules are read with the same scale rules. Integer
   (quantised) factors are an unsupported feature, left out; float8 factors are read in float64, as torch
   computes nothing in float8.

A base model's weights, the renaming of kohya's mangled module names to the base's paths and the findings of
an adapter against its base are in base_check.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lrtool.adapters import LoraModule, Survey, check_computable, survey
from lrtool.adapters.read import adapter_of
from lrtool.diagnose.findings import finding
from lrtool.errors import InputError, LrtoolError, one_line


@dataclass
class AdapterInput(Survey):
    """One ADAPTER argument: its survey, the findings it makes, and what could be loaded for the figures."""

    findings: list[dict] = field(default_factory=list)
    refused: str | None = None  # why merge refuses it, or None
    lora: dict[str, LoraModule] = field(default_factory=dict)  # the modules the figures cover
    modules: dict[str, dict] = field(default_factory=dict)  # module -> its report entry
    scale_source: str | None = None  # where the scales came from: config, metadata, alpha, default (+ joined)
    scale_detail: str | None = None  # the same in words: which field or tensor, by which rule

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
    item.scale_source = adapter.metadata.get("scale_source")
    item.scale_detail = adapter.metadata.get("scale_detail")
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
        module = LoraModule(
            A=_computable(module.A), B=_computable(module.B), scale=module.scale, kernel=module.kernel
        )
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
