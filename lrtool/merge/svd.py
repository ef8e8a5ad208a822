"""svd: the best rank-K approximation of the `linear` result sum_i w_i dW_i (Eckart-Young).

Computed from the factors, never forming the dense matrix: the concatenated factors of `linear` are
QR-decomposed and only their small (sum r_i)-square core goes through an SVD (lrtool.lowrank.factored_svd).
Stored as B = U_K diag(S_K), A = Vh_K, scale 1. K is --rank, by default per module the largest rank any
input has for it; a K at least sum r_i keeps the linear result exactly. The receipt's from_linear is the
truncation's relative error.
"""

from lrtool import lowrank
from lrtool.merge.base import Method, ModuleInputs, Parameter, Settings, Update


def svd(module: ModuleInputs, settings: Settings) -> Update:
    U, S, Vh = lowrank.factored_svd(*module.linear())
    k = min(settings.rank or module.max_rank, S.shape[0])
    return Update.factored(U[:, :k] * S[:k], Vh[:k])


METHOD = Method(
    name="svd",
    summary="the best rank-K approximation of the linear sum, from the factors (no dense matrix)",
    compute=svd,
    parameters=(Parameter("rank", None, "K, the rank kept (default: per module, the largest input rank)"),),
)
