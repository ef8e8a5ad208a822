"""Linear algebra on factored updates dW = B @ A, without forming the dense matrix.

Reads and writes tensors only. An update of rank r costs O((out + in) r^2) here instead of O(out * in * r):

    factored_svd      the SVD of B @ A from a QR of each factor and the SVD of an r x r core
    inner             <B1 A1, B2 A2>_F as the sum of (B1^T B2) * (A1 A2^T), two small Gram matrices
    norm, distance    Frobenius norm from `inner`, and a distance that does not cancel digits

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
    """||B @ A||_F from the Gram trace: fast, and accurate unless B @ A is far smaller than ||B|| ||A||
    (the product of a difference written as stacked factors): `distance` avoids that case."""
    return max(inner(B, A, B, A), 0.0) ** 0.5


def distance(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """||B1 @ A1 - B2 @ A2||_F without cancelling digits.

    Equal shapes: B1 A1 - B2 A2 = (B1 - B2) A1 + B2 (A1 - A2), whose factors [B1 - B2 | B2] and [A1; A1 - A2]
    are small exactly where the two updates agree, so the Gram trace stays accurate (a float32 copy of an
    update measures at its true ~1e-8, not at the 1e-8 floor of subtracting two equal norms). Otherwise the
    stacked difference [B1 | -B2] @ [A1; A2], measured through a QR of its A side.
    """
    B1, A1, B2, A2 = (t.to(torch.float64) for t in (B1, A1, B2, A2))
    if B1.shape == B2.shape and A1.shape == A2.shape:
        return norm(torch.cat([B1 - B2, B2], dim=1), torch.cat([A1, A1 - A2], dim=0))
    _, r = torch.linalg.qr(torch.cat([A1, A2], dim=0).T)  # [A1; A2] = R^T Q^T with Q orthonormal
    return float((torch.cat([B1, -B2], dim=1) @ r.T).norm())
