"""svd: the best rank-K approximation of the `linear` result sum_i w_i dW_i (Eckart-Young).

Computed from the factors, never forming the dense matrix: the concatenated factors of `linear` are
QR-decomposed and only their small (sum r_i)-square core goes through an SVD (lrtool.lowrank.factored_svd).
Stored balanced, B = U_K diag(sqrt(S_K)), A = diag(sqrt(S_K)) Vh_K, scale 1 (base.balanced). K is --rank,
by default per module the largest rank any input has for it; a K at least sum r_i keeps the linear result
exactly. The receipt's from_linear is the truncation's relative error, from the spectrum: the tail's share of
the energy, sqrt(sum_{i>K} s_i^2 / sum_i s_i^2) (measured from the factors, as for other methods, when K
keeps the whole spectrum).
"""

from dataclasses import replace

from lrtool.merge.base import Method, ModuleInputs, Parameter, Settings, Update, balanced, relative


def svd(module: ModuleInputs, settings: Settings) -> Update:
    from lrtool import lowrank

    U, S, Vh = lowrank.factored_svd(*module.linear())
    kept = balanced(U, S, Vh, settings.rank or module.max_rank)
    if kept.B.shape[1] == S.shape[0]:  # nothing truncated: the receipt measures the (rounding) distance
        return kept
    energy = S.square()
    tail = relative(float(energy[kept.B.shape[1] :].sum()) ** 0.5, float(energy.sum()) ** 0.5)
    return replace(kept, from_linear=tail)  # Eckart-Young: the distance from the linear sum is the tail


METHOD = Method(
    name="svd",
    summary="the best rank-K approximation of the linear sum, from the factors (no dense matrix)",
    compute=svd,
    parameters=(Parameter("rank", None, "K, the rank kept (default: per module, the largest input rank)"),),
)
