"""iso-cts: Iso-CTS (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common
and Task-Specific Subspaces"): Iso-C's flattened spectrum over a common subspace and task-specific
directions.

Per module, with M = sum_i w_i dW_i of numerical rank k and the N adapters that hold the module:
1. common subspace: M's top k_c singular triplets, k_c = k - round((k - int(0.8 k)) / N) * N (the paper's
   common_space_fraction 0.8, the remainder divisible among the tasks), and d = (k - k_c) / N per task;
2. task-specific: each w_i dW_i projected off the common column space, (I - U_c U_c^T) w_i dW_i, keeps its
   top d singular triplets (its numerically non-zero ones at most);
3. concatenate the task-specific and the common triplets, replace U and V by their polar factors (as tsv);
4. result = mean(S) polar(U) polar(V)^T, the spectrum flattened to the mean of the kept singular values.
The paper's code sizes the subspaces by min(out, in), a full-rank task vector's rank; a sum of LoRAs spans k
<= sum_i r_i dimensions, and here the fractions are of k (past it, singular vectors are an arbitrary
null-space basis). The weights play the paper's alpha.

Factored: M, the projections and their SVDs come from stacked factors ([out, r] and [r, in] matrices, QRs
and small cores), the polar factors from SVDs of [out, k] and [in, k] matrices; the result is stored as a
LoRA of rank at most k; no dense [out, in] matrix is formed.
"""

from lrtool.merge.base import Method, ModuleInputs, Settings, Update
from lrtool.merge.spectral import factored, numerical_rank, polar, top_components

COMMON_FRACTION = 0.8  # the paper's common_space_fraction


def split(rank: int, tasks: int) -> tuple[int, int]:
    """(k_c, d): the common subspace's dimension and each task's, for a sum of numerical rank `rank`."""
    common = int(rank * COMMON_FRACTION)
    specific = round((rank - common) / tasks) * tasks
    common = min(rank, max(0, rank - specific))
    return common, (rank - common) // tasks


def iso_cts(module: ModuleInputs, settings: Settings) -> Update:
    import torch

    from lrtool import lowrank

    U, S, Vh = top_components(*module.linear(), module.shape)
    present = [i for i, m in enumerate(module.modules) if m is not None]
    common, per_task = split(S.numel(), len(present))
    Uc = U[:, :common]
    parts = []
    for i in present:
        B, A = module.scaled_factors(i)
        B = module.weights[i] * B
        U_i, S_i, Vh_i = lowrank.factored_svd(B - Uc @ (Uc.T @ B), A)
        kept = min(per_task, numerical_rank(S_i, module.shape, scale=lowrank.norm(B, A)))
        parts.append((U_i[:, :kept], S_i[:kept], Vh_i[:kept]))
    parts.append((Uc, S[:common], Vh[:common]))
    values = torch.cat([S for _, S, _ in parts])
    if values.numel() == 0:
        return Update.zero(module.shape)
    U = polar(torch.cat([U for U, _, _ in parts], dim=1))
    Vh = polar(torch.cat([Vh for _, _, Vh in parts], dim=0))
    return factored(U, torch.full_like(values, float(values.mean())), Vh)


METHOD = Method(
    name="iso-cts",
    summary="Iso-CTS: a common subspace of the weighted sum plus each adapter's own directions, "
    "orthogonalised, singular values set to their mean (factored)",
    compute=iso_cts,
)
