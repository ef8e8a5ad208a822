"""Linear algebra on factored updates dW = B @ A, without forming the dense matrix.

Reads and writes tensors only. An update of rank r costs O((out + in) r^2) here instead of O(out * in * r):

    factored_svd      the SVD of B @ A from a QR of each factor and the SVD of an r x r core
    inner             <B1 A1, B2 A2>_F as the sum of (B1^T B2) * (A1 A2^T), two small Gram matrices
    norm, distance    Frobenius norm (from the factored SVD) and distance (the norm of stacked factors)

Stacking factors (B = [B1 | B2], A = [A1; A2]) represents a sum of updates, so the same functions serve
merges (the exact sum of several adapters) and diagnostics (spectra, cosines between adapters).
"""

import torch


def factored_svd(B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype = torch.float64):
    """(U [out, k], S [k], Vh [k, in]) with B @ A = U diag(S) Vh, S descending, k = the inner dimension."""
    B, A = B.to(dtype), A.to(dtype)
    q_b, r_b = torch.linalg.qr(B)  # B = Qb Rb
    q_a, r_a = torch.linalg.qr(A.T)  # A = Ra^T Qa^T
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return q_b @ u, s, vh @ q_a.T


def inner(
    B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor, dtype: torch.dtype = torch.float64
) -> float:
    """The Frobenius inner product <B1 @ A1, B2 @ A2> = trace(A1^T B1^T B2 A2)."""
    gram_b = B1.to(dtype).T @ B2.to(dtype)  # [r1, r2]
    gram_a = A1.to(dtype) @ A2.to(dtype).T  # [r1, r2]
    return float((gram_b * gram_a).sum())


def norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """||B @ A||_F, from the singular values of the factored SVD (a trace of Gram matrices would cancel
    digits when B @ A is a small difference, as in `distance`)."""
    _, s, _ = factored_svd(B, A)
    return float(s.square().sum().sqrt())


def distance(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """||B1 @ A1 - B2 @ A2||_F, as the norm of the stacked difference [B1 | -B2] @ [A1; A2]."""
    return norm(torch.cat([B1.double(), -B2.double()], dim=1), torch.cat([A1.double(), A2.double()], dim=0))
