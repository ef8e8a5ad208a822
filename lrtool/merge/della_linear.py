"""della-linear: DELLA's drop (Deep et al., 2024) without the election, with mergekit's conventions
(mergekit/sparsify.py's della_magprune, merge_methods/generalized_task_arithmetic.py and registry.py's
"della_linear": no consensus, not normalised, rescaled).

Per module, on dense [out, in] updates: lambda * sum_i w_i della_drop(dW_i), where della_drop keeps each
entry with a probability ranked by magnitude within its row, from D - epsilon to D + epsilon, and rescales
the kept ones to the update's l1 norm (sparsify.della_drop, drawn from lrtool's counter-based generator
seeded by --seed, module and adapter index). Dense; stored at --rank by truncated SVD (plan.py).
"""

from lrtool.merge.base import DENSE_RANK, Method, ModuleInputs, Settings, Update
from lrtool.merge.sparsify import DENSITY, DROP_NOTE, EPSILON, LAMBDA, SEED, check_della, della_dropped


def della_linear(module: ModuleInputs, settings: Settings) -> Update:
    import torch

    result = torch.zeros(module.shape, dtype=torch.float64)
    for weight, delta in zip(module.weights, della_dropped(module, settings)):
        result += weight * delta
    return Update.dense(result if settings.lambda_ == 1 else result * settings.lambda_)


METHOD = Method(
    name="della-linear",
    summary="DELLA's magnitude-ranked drop and rescale of each dW_i, summed with weights, times lambda "
    "(dense)",
    compute=della_linear,
    parameters=(DENSITY, EPSILON, LAMBDA, SEED, DENSE_RANK),
    notes=(DROP_NOTE,),
    check_settings=check_della,
)
