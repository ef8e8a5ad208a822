"""dare-ties: DARE's random drop and rescale (dare_linear.py: each entry of dW_i kept with probability D and
divided by D, seeded by --seed, module and adapter index), then TIES' sign election and disjoint mean with
weights (ties.py, mergekit's conventions) instead of a plain sum.
"""

import torch

from lrtool.merge.base import Method, ModuleInputs, Settings, Update
from lrtool.merge.dare_linear import NOTE, SEED, dropped
from lrtool.merge.magnitude_prune import DENSITY, RANK
from lrtool.merge.ties import elect_and_average


def dare_ties(module: ModuleInputs, settings: Settings) -> Update:
    return Update.dense(elect_and_average(torch.stack(dropped(module, settings)), module.weights))


METHOD = Method(
    name="dare-ties",
    summary="DARE's random drop and rescale of each dW_i, then TIES' sign election and mean (dense)",
    compute=dare_ties,
    parameters=(DENSITY, SEED, RANK),
    divides_by_weights=True,
    notes=(NOTE,),
)
