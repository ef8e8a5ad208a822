"""dare-linear: DARE (Yu et al., 2024): drop each entry of dW_i with probability 1 - D, divide the kept ones
by D, then sum with weights: sum_i w_i drop(dW_i).

The drop mask is random but reproducible, and the same on every device (sparsify.py says how it is drawn):
same seed, same bytes; reordering the adapters changes the masks.
"""

from lrtool.merge.base import DENSE_RANK, Method, ModuleInputs, Settings, Update
from lrtool.merge.sparsify import DENSITY, DROP_NOTE, SEED, dropped


def dare_linear(module: ModuleInputs, settings: Settings) -> Update:
    import torch

    result = torch.zeros(module.shape, dtype=torch.float64)
    for weight, delta in zip(module.weights, dropped(module, settings)):
        result += weight * delta
    return Update.dense(result)


METHOD = Method(
    name="dare-linear",
    summary="drop entries of each dW_i with probability 1 - D, rescale by 1/D, sum with weights (dense)",
    compute=dare_linear,
    parameters=(DENSITY, SEED, DENSE_RANK),
    notes=(DROP_NOTE,),
)
