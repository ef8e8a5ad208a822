"""della: DELLA-Merging (Deep et al., 2024) with mergekit's conventions (mergekit/sparsify.py's
della_magprune, merge_methods/generalized_task_arithmetic.py and registry.py's "della": TIES' consensus,
normalised, rescaled).

Per module, on dense [out, in] updates dW_i (the steps are sparsify.py's):
1. MagPrune: within each row, rank the entries of dW_i by magnitude and keep each with probability from
   D - epsilon (the smallest) up to D + epsilon (the largest), drawn from lrtool's counter-based generator
   (seeded by --seed, module and adapter index, so every device keeps the same entries);
2. rescale the kept entries so the update keeps its l1 norm (mergekit's default for della);
3. elect and merge: TIES' sign election on w_i times the pruned updates and their disjoint mean, divided by
   the sum of the agreeing weights (sparsify.elect_and_average, as ties.py);
4. multiply by lambda.
Dense: the ranks and the draws are entry by entry. Stored at --rank by truncated SVD (plan.py).
"""

from lrtool.merge.base import DENSE_RANK, Method, ModuleInputs, Settings, Update
from lrtool.merge.sparsify import (
    DENSITY,
    DROP_NOTE,
    EPSILON,
    LAMBDA,
    SEED,
    check_della,
    della_dropped,
    elect_and_average,
)


def della(module: ModuleInputs, settings: Settings) -> Update:
    import torch

    merged = elect_and_average(torch.stack(della_dropped(module, settings)), module.weights)
    return Update.dense(merged if settings.lambda_ == 1 else merged * settings.lambda_)


METHOD = Method(
    name="della",
    summary="DELLA: drop entries of each dW_i with magnitude-ranked probabilities, rescale, TIES' election "
    "and mean, times lambda (dense)",
    compute=della,
    parameters=(DENSITY, EPSILON, LAMBDA, SEED, DENSE_RANK),
    divides_by_weights=True,
    notes=(DROP_NOTE,),
    check_settings=check_della,
)
