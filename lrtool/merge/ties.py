"""ties: TIES-merging (Yadav et al., 2023) on dense updates, with mergekit's conventions.

Per module, on dense [out, in] updates dW_i:
1. trim: keep the int(D * numel) largest-magnitude entries of each unweighted dW_i (magnitude_prune);
2. weight: t_i = w_i * trimmed dW_i;
3. elect: each entry's sign is the sign of sum_i t_i, zero counting as positive;
4. disjoint mean: sum the t_i whose sign agrees with the elected one (zeros never agree) and divide by the
   sum of the weights w_i of those entries, by 1 where that sum is 0 (no entry agrees).
Because of step 4, scaling every weight by c > 0 leaves the result unchanged, and a negative weight does not
negate an adapter. (peft's ties elects on the unweighted values and divides by a count instead.)
"""

import torch

from lrtool.merge.base import Method, ModuleInputs, Settings, Update
from lrtool.merge.magnitude_prune import DENSITY, RANK, keep_largest


def elect_and_average(values: torch.Tensor, weights) -> torch.Tensor:
    """TIES' sign election and disjoint mean of `values` [n, ...] (unweighted), weights [n]."""
    w = torch.tensor(weights, dtype=values.dtype).reshape(-1, *([1] * (values.dim() - 1)))
    weighted = values * w
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(values.dtype)
    agrees = torch.sign(weighted) == elected
    total = torch.where(agrees, weighted, 0.0).sum(dim=0)
    divisor = torch.where(agrees, w, 0.0).sum(dim=0)
    return total / torch.where(divisor == 0, 1.0, divisor)


def ties(module: ModuleInputs, settings: Settings) -> Update:
    trimmed = torch.stack([keep_largest(delta, settings.density) for delta in module.deltas()])
    return Update.dense(elect_and_average(trimmed, module.weights))


METHOD = Method(
    name="ties",
    summary="trim each dW_i to its largest entries, elect signs, average the agreeing entries (dense)",
    compute=ties,
    parameters=(DENSITY, RANK),
    divides_by_weights=True,
)
