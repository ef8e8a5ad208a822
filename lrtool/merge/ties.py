"""ties: TIES-merging (Yadav et al., 2023) on dense updates, with mergekit's conventions.

Per module, on dense [out, in] updates dW_i (the steps are sparsify.py's):
1. trim: keep the int(D * numel) largest-magnitude entries of each unweighted dW_i (keep_largest);
2. weight: t_i = w_i * trimmed dW_i;
3. elect: each entry's sign is the sign of sum_i t_i, zero counting as positive;
4. disjoint mean: sum the t_i whose sign agrees with the elected one (zeros never agree) and divide by the
   sum of the weights w_i of those entries, by 1 where that sum is 0 (no entry agrees).
Because of step 4, scaling every weight by c > 0 leaves the result unchanged, and a negative weight does not
negate an adapter. (peft's ties elects on the unweighted values and divides by a count instead.)
"""

from lrtool.merge.base import DENSE_RANK, Method, ModuleInputs, Settings, Update
from lrtool.merge.sparsify import DENSITY, ties_merge


def ties(module: ModuleInputs, settings: Settings) -> Update:
    return Update.dense(ties_merge(module.deltas(), module.weights, settings.density))


METHOD = Method(
    name="ties",
    summary="trim each dW_i to its largest entries, elect signs, average the agreeing entries (dense)",
    compute=ties,
    parameters=(DENSITY, DENSE_RANK),
    divides_by_weights=True,
)
