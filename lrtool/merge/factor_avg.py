"""factor-avg: average the factors, not the updates (parameter averaging; "uniform" in the LoRA-library
literature).

A = sum_i w_i A_i and B = sum_i w_i s_i B_i, stored with scale 1, so the result is B @ A. This is not the
average of the dW_i: it adds cross terms w_i w_j s_i B_i A_j, and scaling every weight by c scales the
result by c^2. The receipt's from_linear says how far it is from sum_i w_i dW_i. Ranks must be equal per
module (a module an adapter lacks counts as zero factors of that rank).
"""

from lrtool.errors import IncompatibleError
from lrtool.merge.base import Method, ModuleInputs, Settings, Update


def check_equal_ranks(module: ModuleInputs) -> None:
    present = [(rank, source) for rank, source in zip(module.ranks, module.sources) if rank is not None]
    for rank, source in present[1:]:
        if rank != present[0][0]:
            raise IncompatibleError(
                f"factor-avg needs equal ranks: module '{module.name}' has rank {present[0][0]} in "
                f"{present[0][1]} but {rank} in {source}; use linear or svd for mixed ranks"
            )


def factor_avg(module: ModuleInputs, settings: Settings) -> Update:
    import torch

    out_features, in_features = module.shape
    rank = module.max_rank
    B = torch.zeros(out_features, rank, dtype=torch.float64)
    A = torch.zeros(rank, in_features, dtype=torch.float64)
    for i, weight in enumerate(module.weights):
        factors = module.scaled_factors(i)
        if factors is not None:
            B += weight * factors[0]
            A += weight * factors[1]
    return Update.factored(B, A)


METHOD = Method(
    name="factor-avg",
    summary="A = sum_i w_i A_i, B = sum_i w_i s_i B_i (averaged factors, not updates); equal ranks",
    compute=factor_avg,
    check=check_equal_ranks,
    notes=(
        "factor-avg averages the factors, not the updates: from_linear says how far it is from the "
        "weighted sum of the updates",
    ),
)
