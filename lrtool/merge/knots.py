"""knots: KnOTS (Stoica et al., 2024, "Model merging with SVD to tie the KnOTS"): align the adapters'
updates in one shared basis by an SVD of their concatenation, merge them there with TIES, map back.

Per module, with dW_i = s_i B_i A_i ([out, in]; zero where adapter i lacks the module):
1. concatenate the unweighted updates side by side and take the thin SVD
       [dW_1 | dW_2 | ... | dW_n] = U diag(S) [V_1^T | V_2^T | ... | V_n^T],
   keeping the k singular values above S_max * max(out, n * in) * eps(float64) (the numerical rank, at most
   sum_i r_i), so that dW_i = U diag(S) V_i^T with each V_i^T = diag(S)^-1 U^T dW_i [k, in] task i's
   coordinates (exactly zero for an adapter lacking the module);
2. merge the coordinates with TIES (sparsify.ties_merge, as ties.py: mergekit's conventions, density D,
   the weights w_i): V^T = ties(V_1^T, ..., V_n^T), trimming int(D * k * in) entries per task;
3. map back: result = U diag(S) V^T, of rank at most k: stored exactly, balanced as B = U diag(sqrt(S)),
   A = diag(sqrt(S)) V^T (or at --rank K, its best rank-K approximation).
The SVD is computed from the factors: the concatenation equals [s_1 B_1 | ...] blockdiag(A_1, ..., A_n); a
QR of the stacked B's, a QR of each A_i^T and an SVD of the small core give U, S and each V_i, with no
[out, n * in] matrix formed. Sign flips of singular pairs do not change the result (TIES is odd-symmetric).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lrtool.merge.base import Method, ModuleInputs, Parameter, Settings, Update
from lrtool.merge.sparsify import DENSITY, ties_merge

if TYPE_CHECKING:
    import torch

RANK = Parameter(
    "rank",
    None,
    "rank the result is stored at (default: its own rank, at most sum_i r_i: exact)",
    storage=True,
)


def shared_basis(module: ModuleInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [out, k], S [k], V^T [n, k, in]) with dW_i = U diag(S) V^T[i] for every adapter i."""
    import torch

    out_features, in_features = module.shape
    present = [i for i, m in enumerate(module.modules) if m is not None]
    factors = [module.scaled_factors(i) for i in present]
    q, r_b = torch.linalg.qr(torch.cat([B for B, _ in factors], dim=1))  # [s_1 B_1 | ...] = Q R_b
    bases, triangles = zip(*(torch.linalg.qr(A.T) for _, A in factors))  # A_i^T = P_i T_i
    core = r_b @ torch.block_diag(*(t.T for t in triangles))  # concatenation = Q core blockdiag(P_i^T)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    tolerance = s.max() * max(out_features, len(module.modules) * in_features) * torch.finfo(s.dtype).eps
    k = int((s > tolerance).sum())
    coordinates = torch.zeros(len(module.modules), k, in_features, dtype=torch.float64)
    blocks = torch.split(vh[:k], [t.shape[0] for t in triangles], dim=1)
    for i, block, basis in zip(present, blocks, bases):
        coordinates[i] = block @ basis.T
    return q @ u[:, :k], s[:k], coordinates


def knots(module: ModuleInputs, settings: Settings) -> Update:
    U, S, coordinates = shared_basis(module)
    root = S.sqrt()  # balanced factors, as base.balanced stores a truncated SVD
    return Update.factored(
        U * root, root[:, None] * ties_merge(coordinates, module.weights, settings.density)
    )


METHOD = Method(
    name="knots",
    summary="KnOTS: SVD of the concatenated updates gives a shared basis; TIES on the coordinates, map back",
    compute=knots,
    parameters=(DENSITY, RANK),
    divides_by_weights=True,
)
