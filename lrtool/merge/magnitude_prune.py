"""magnitude-prune: keep the int(D * numel) largest-magnitude entries of each dW_i, then sum with weights.

result = sum_i w_i keep_largest(dW_i, D), on dense [out, in] updates. Among entries of equal magnitude the
earlier one (row-major) is kept, so the result is deterministic. A dense result: stored at --rank by
truncated SVD (see base.py), or added exactly with --into-base.
"""

import torch

from lrtool.merge.base import Method, ModuleInputs, Parameter, Settings, Update

DENSITY = Parameter("density", 0.5, "D, the fraction of each update's entries kept, in (0, 1]")
RANK = Parameter(
    "rank",
    None,
    "rank the dense result is stored at by truncated SVD (default: per module, the largest input rank; "
    "at least min(out, in) is exact)",
    storage=True,
)


def keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with all but its int(density * numel) largest-magnitude entries set to zero; of entries
    equal in magnitude to the smallest one kept, the first ones in row-major order are kept.

    The same as a stable descending sort, by selection instead (linear time, not n log n).
    """
    n = delta.numel()
    k = int(density * n)
    if k >= n:
        return delta
    if k == 0:
        return torch.zeros_like(delta)
    flat = delta.reshape(-1)
    magnitude = flat.abs()
    threshold = torch.kthvalue(magnitude, n - k + 1).values  # the k-th largest magnitude
    keep = magnitude > threshold
    tied = torch.nonzero(magnitude == threshold).squeeze(1)
    keep[tied[: k - int(keep.sum())]] = True
    return torch.where(keep, flat, 0.0).reshape(delta.shape)


def magnitude_prune(module: ModuleInputs, settings: Settings) -> Update:
    result = torch.zeros(module.shape, dtype=torch.float64)
    for i, weight in enumerate(module.weights):
        if module.modules[i] is not None:
            result += weight * keep_largest(module.delta(i), settings.density)
    return Update.dense(result)


METHOD = Method(
    name="magnitude-prune",
    summary="keep the int(D * numel) largest entries of each dW_i, then sum with weights (dense)",
    compute=magnitude_prune,
    parameters=(DENSITY, RANK),
)
