"""sce: SCE, select, calculate, erase (FuseChat, Wan et al., 2024), with mergekit's conventions
(mergekit/merge_methods/sce.py).

Per module, on dense [out, in] updates dW_i (zero where an adapter lacks the module):
1. select: below D = 1, keep only the entries whose values vary most across the adapters: the
   int(D * count) largest population variances (over i), count being the entries of non-zero variance
   (mergekit's sce_mask); the others are set to zero in every dW_i;
2. calculate: each adapter's weight m_i = mean of its selected dW_i squared (mergekit's sce_weight), times
   its --weights w_i;
3. erase: TIES' sign election on sum_i w_i dW_i (zero counting as positive); per entry, the weighted mean
   sum_i m_i w_i dW_i / sum_i m_i w_i over the adapters whose sign agrees (zeros never agree), 0 where none
   does.
With equal --weights (the default) this is mergekit's sce; w_i scale each adapter's weight, and scaling them
all by c > 0 leaves the result unchanged (it divides by the agreeing weights, as ties does). mergekit's
absolute guards, equal weights when sum m_i < 1e-6 and a divisor of at least 1e-6, are not kept: LoRA
updates' mean squares are ~1e-6 and below, where they would change the result with the updates' scale; here
only a zero divisor (no agreeing entry) is guarded. Dense; stored at --rank by truncated SVD (plan.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lrtool.merge.base import DENSE_RANK, Method, ModuleInputs, Settings, Update
from lrtool.merge.sparsify import DENSITY, agreeing, largest

if TYPE_CHECKING:
    import torch


def most_varying(values: torch.Tensor, density: float) -> torch.Tensor:
    """The mask [out, in] of the entries kept by SCE's select step (the earlier first among equal ones)."""
    variance = values.var(dim=0, unbiased=False).reshape(-1)
    k = int(int((variance != 0).sum()) * density)
    return largest(variance, k).reshape(values.shape[1:])


def sce(module: ModuleInputs, settings: Settings) -> Update:
    import torch

    values = torch.stack(module.deltas())
    if settings.density < 1:
        values = values * most_varying(values, settings.density)
    means = values.square().mean(dim=(1, 2))
    weights = torch.tensor(module.weights, dtype=torch.float64)[:, None, None]
    agrees = agreeing(values * weights)
    omega = (means[:, None, None] * weights).expand_as(values)
    total = torch.where(agrees, values * omega, 0.0).sum(dim=0)
    divisor = torch.where(agrees, omega, 0.0).sum(dim=0)
    return Update.dense(total / torch.where(divisor == 0, 1.0, divisor))


METHOD = Method(
    name="sce",
    summary="SCE: keep the entries that vary most across adapters, weight each dW_i by its mean square, "
    "average the sign-agreeing entries (dense)",
    compute=sce,
    parameters=(DENSITY, DENSE_RANK),
    divides_by_weights=True,
)
