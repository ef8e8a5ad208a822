"""The steps the SVD-based methods share (tsv, iso-c, iso-cts, core-space), on factored updates.

    numerical_rank   how many singular values count, numpy's matrix_rank tolerance
    top_components   an update's leading singular triplets, from its factors (lowrank.factored_svd)
    polar            the nearest matrix with orthonormal columns (rows): the orthogonalisation TSV uses
    column_basis     an orthonormal basis of the column space of stacked factors (core-space's bases)
    factored         U diag(S) Vh as an Update, the magnitude split evenly between the factors

Every update here lives in the span of its stacked factors, so each step works on [out, k] and [k, in]
matrices with k at most the sum of the ranks, never on a dense [out, in] one: a QR of each factor and an SVD
of a small core stand in for the SVD of the update. A dense singular vector whose singular value is zero is
arbitrary (LAPACK's choice of a null-space basis); the methods keep only numerically non-zero ones, where the
papers' dense code (written for full-rank task vectors) would carry such vectors along.

Reads and writes tensors only; imports torch only when a step runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lrtool.merge.base import Update

if TYPE_CHECKING:
    import torch

EPS64 = 2.220446049250313e-16  # float64 machine epsilon


def numerical_rank(S: torch.Tensor, shape: tuple[int, int], scale: float | None = None) -> int:
    """How many of the singular values S (descending) of an [out, in] update exceed
    scale * max(out, in) * eps(float64), scale S[0] by default (numpy's matrix_rank tolerance)."""
    if len(S) == 0:
        return 0
    reference = float(S[0]) if scale is None else scale
    return int((S > reference * max(shape) * EPS64).sum())


def top_components(B: torch.Tensor, A: torch.Tensor, shape: tuple[int, int], k: int | None = None):
    """(U [out, j], S [j], Vh [j, in]) of B @ A: its j leading singular triplets, j = min(k, numerical rank)
    (all numerically non-zero ones when k is None)."""
    from lrtool import lowrank

    U, S, Vh = lowrank.factored_svd(B, A)
    j = numerical_rank(S, shape)
    j = j if k is None else min(k, j)
    return U[:, :j], S[:j], Vh[:j]


def polar(X: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Q^T of X = P diag(s) Q^T (thin SVD): the matrix with orthonormal
    columns (rows, when X is wide) nearest to X in Frobenius norm. TSV-Merge's orthogonalisation of the
    concatenated singular vectors (Gargiulo et al., 2025: u_u @ v_u in its code)."""
    import torch

    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def column_basis(X: torch.Tensor) -> torch.Tensor:
    """The left singular vectors of X [out, k] with numerically non-zero singular values: an orthonormal
    basis of its column space, ordered by singular value (core-space's reference bases)."""
    import torch

    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    return U[:, : numerical_rank(S, tuple(X.shape))]


def factored(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> Update:
    """U diag(S) Vh as factors B = U diag(sign(S) sqrt|S|), A = diag(sqrt|S|) Vh: balanced, as base.balanced
    stores a truncated SVD (neither factor holds the whole magnitude), for S of either sign."""
    root = S.abs().sqrt()
    return Update.factored(U * (S.sign() * root), root[:, None] * Vh)
