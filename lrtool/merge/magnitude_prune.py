"""magnitude-prune: keep the int(D * numel) largest-magnitude entries of each dW_i, then sum with weights.

result = sum_i w_i keep_largest(dW_i, D), on dense [out, in] updates (sparsify.keep_largest). Among entries
of equal magnitude the earlier one (row-major) is kept, so the result is deterministic. A dense result:
stored at --rank by truncated SVD (see plan.py), or added exactly with --into-base.
"""

from lrtool.merge.base import DENSE_RANK, Method, ModuleInputs, Settings, Update
from lrtool.merge.sparsify import DENSITY, keep_largest


def magnitude_prune(module: ModuleInputs, settings: Settings) -> Update:
    import torch

    result = torch.zeros(module.shape, dtype=torch.float64)
    for i, weight in enumerate(module.weights):
        if module.modules[i] is not None:
            result += weight * keep_largest(module.delta(i), settings.density)
    return Update.dense(result)


METHOD = Method(
    name="magnitude-prune",
    summary="keep the int(D * numel) largest entries of each dW_i, then sum with weights (dense)",
    compute=magnitude_prune,
    parameters=(DENSITY, DENSE_RANK),
)
