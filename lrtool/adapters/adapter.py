"""The canonical LoRA adapter in memory: per module path the factors A [r, in] and B [out, r] and the scale
the update is applied with, so that delta W = scale * B @ A (DESIGN.md, "The canonical adapter").

A conv layer's LoRA (kohya's, LyCORIS' LoCon, peft's lora.Conv2d) is the same product over the flattened
kernel: A is [r, in_channels * prod(kernel)], B [out, r], and the module keeps its kernel size, so that every
merge method and diagnose work on 2-D factors unchanged and writers restore the stored shapes
([r, in, *kernel] and [out, r, 1, ...]); the update, reshaped, is the weight's [out, in, *kernel].

Reads and writes nothing: lrtool.adapters.read builds Adapters from files, lrtool.adapters.write saves them.
Also here, because every consumer of factors needs them: the checks that an adapter can be computed with,
and whether two declared bases name one model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lrtool.errors import InputError, UnsupportedFeatureError


@dataclass(eq=False)
class LoraModule:
    """One adapted linear layer. Its update is delta W = scale * B @ A, shaped [out_features, in_features]."""

    A: torch.Tensor  # [r, in_features]; a conv layer's: [r, in_channels * prod(kernel)]
    B: torch.Tensor  # [out_features, r]
    scale: float  # the factor the update is applied with: alpha / r, or alpha / sqrt(r) with rsLoRA
    kernel: tuple[int, ...] | None = None  # a conv layer's kernel size, e.g. (3, 3); None: a linear layer

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the base weight the update is added to: [out, in] for a linear layer (as nn.Linear
        stores it), [out, in_channels, *kernel] for a conv layer."""
        if self.kernel is None:
            return (self.out_features, self.in_features)
        return (self.out_features, self.in_features // math.prod(self.kernel), *self.kernel)

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """scale * B @ A in `dtype`, in nn.Linear's [out, in] layout (also for fan_in_fan_out bases)."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


@dataclass(eq=False)
class Adapter:
    """A LoRA adapter: module path (as the base's named_modules() gives it) -> LoraModule, sorted by path."""

    modules: dict[str, LoraModule] = field(repr=False)
    base: str | None = None  # base model name or path, when the file declares one
    format: str = "peft"  # what it was read from: peft, torchtune, kohya, diffusers, diffusers-old, mlx
    source: str = ""  # the path it was loaded from
    metadata: dict = field(default_factory=dict)  # fan_in_fan_out, task_type, scale_source, ...

    def __post_init__(self) -> None:
        self.modules = dict(sorted(self.modules.items()))

    @property
    def dtypes(self) -> set[torch.dtype]:
        return {t.dtype for m in self.modules.values() for t in (m.A, m.B)}

    @property
    def rank(self) -> int:
        """The largest rank of any module."""
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def num_parameters(self) -> int:
        return sum(m.A.numel() + m.B.numel() for m in self.modules.values())


def check_computable(adapter: Adapter) -> None:
    """Refuse an adapter whose update cannot be computed with: integer (quantised) factors, NaN or infinity
    in a factor or a scale. merge and eval use its factors only after this; diagnose reports its message as
    what merge would refuse."""
    where = adapter.source or "adapter"
    for name, module in adapter.modules.items():
        if not math.isfinite(module.scale):
            raise InputError(f"{where}: module '{name}' has a non-finite scale ({module.scale})")
        for role, tensor in (("A", module.A), ("B", module.B)):
            if not tensor.is_floating_point():
                dtype = str(tensor.dtype).removeprefix("torch.")
                raise UnsupportedFeatureError(
                    f"{where}: module '{name}' stores its {role} factor as {dtype} (quantised?); only "
                    "floating-point factors can be used: dequantise the adapter first"
                )
            if not all_finite(tensor):
                raise InputError(
                    f"{where}: module '{name}' has non-finite values (NaN or inf) in its {role} factor"
                )


def all_finite(tensor: torch.Tensor) -> bool:
    # A float64 sum is NaN or inf exactly when an entry is, for inputs narrower than float64 (no overflow
    # possible), and ~10x cheaper than an elementwise isfinite on the CPU.
    if tensor.dtype != torch.float64 and bool(torch.isfinite(tensor.sum(dtype=torch.float64))):
        return True
    return bool(torch.isfinite(tensor).all())


def same_base(a: str, b: str) -> bool:
    """Whether two adapters' declared bases name one model: equal as written, or, for local paths (spelled
    ./base, base/ or /abs/base), the same directory once resolved."""
    if a.rstrip("/") == b.rstrip("/"):
        return True
    first, second = Path(a), Path(b)
    return first.exists() and second.exists() and first.resolve() == second.resolve()
