"""breadcrumbs-ties: Model Breadcrumbs' mask (Davari & Belilovsky, 2024) with TIES' sign election, with
mergekit's conventions (mergekit/sparsify.py's magnitude_outliers, registry.py's "breadcrumbs_ties":
consensus "sum", not normalised, not rescaled).

Per module, on dense [out, in] updates: t_i = w_i keep_middle(dW_i) (drop the int(gamma * numel) largest
entries, keep the next int(D * numel); sparsify.keep_middle); each entry's sign is the sign of sum_i t_i,
zero counting as positive; the result is the sum of the t_i that agree with it (sparsify.elect_and_sum).
Unlike ties.py, nothing is divided by the agreeing weights (mergekit's default for this method), so the
result scales with the weights. Dense; stored at --rank by truncated SVD (plan.py).
"""

from lrtool.merge.base import DENSE_RANK, Method, ModuleInputs, Settings, Update
from lrtool.merge.sparsify import DENSITY, GAMMA, elect_and_sum, keep_middle


def breadcrumbs_ties(module: ModuleInputs, settings: Settings) -> Update:
    import torch

    kept = [keep_middle(delta, settings.density, settings.gamma) for delta in module.deltas()]
    return Update.dense(elect_and_sum(torch.stack(kept), module.weights))


METHOD = Method(
    name="breadcrumbs-ties",
    summary="breadcrumbs' mask on each dW_i, then TIES' sign election, agreeing entries summed (dense)",
    compute=breadcrumbs_ties,
    parameters=(DENSITY, GAMMA, DENSE_RANK),
)
