"""dare-ties: DARE's random drop and rescale (each entry of dW_i kept with probability D and divided by D,
seeded by --seed, module and adapter index: sparsify.dropped), then TIES' sign election and disjoint mean
with weights (sparsify.elect_and_average, mergekit's conventions) instead of a plain sum.
"""

from lrtool.merge.base import DENSE_RANK, Method, ModuleInputs, Settings, Update
from lrtool.merge.sparsify import DENSITY, DROP_NOTE, SEED, dropped, elect_and_average


def dare_ties(module: ModuleInputs, settings: Settings) -> Update:
    import torch

    return Update.dense(elect_and_average(torch.stack(dropped(module, settings)), module.weights))


METHOD = Method(
    name="dare-ties",
    summary="DARE's random drop and rescale of each dW_i, then TIES' sign election and mean (dense)",
    compute=dare_ties,
    parameters=(DENSITY, SEED, DENSE_RANK),
    divides_by_weights=True,
    notes=(DROP_NOTE,),
)
