"""breadcrumbs: Model Breadcrumbs (Davari & Belilovsky, 2024) with mergekit's conventions
(mergekit/sparsify.py's magnitude_outliers, registry.py's "breadcrumbs": no consensus, not normalised, not
rescaled).

Per module, on dense [out, in] updates: sum_i w_i keep_middle(dW_i), where keep_middle drops the
int(gamma * numel) largest-magnitude entries (outliers), keeps the next int(D * numel) and drops the rest
(sparsify.keep_middle; fewer outliers dropped when the two do not fit; dW_i itself at D = 1). Dense; stored
at --rank by truncated SVD (plan.py).
"""

from lrtool.merge.base import DENSE_RANK, Method, ModuleInputs, Settings, Update
from lrtool.merge.sparsify import DENSITY, GAMMA, keep_middle


def breadcrumbs(module: ModuleInputs, settings: Settings) -> Update:
    import torch

    result = torch.zeros(module.shape, dtype=torch.float64)
    for i, weight in enumerate(module.weights):
        if module.modules[i] is not None:
            result += weight * keep_middle(module.delta(i), settings.density, settings.gamma)
    return Update.dense(result)


METHOD = Method(
    name="breadcrumbs",
    summary="drop the largest gamma and the smallest fraction of each dW_i (keep D), sum with weights "
    "(dense)",
    compute=breadcrumbs,
    parameters=(DENSITY, GAMMA, DENSE_RANK),
)
