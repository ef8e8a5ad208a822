"""core-space: merging LoRAs in the core space of their factors (Panariello et al., NeurIPS 2025, "Accurate
and Efficient Low-Rank Model Merging in Core Space"), with TIES in the core, as the paper's code does with
merge_method "ties" and merge_space "core".

Per module, over the adapters that hold it:
1. reference bases: U_B, the left singular vectors of the stacked B's [B_1 | ... | B_N], and V_A, the right
   singular vectors of the stacked A's [A_1; ...; A_N] (the factors as stored, like the paper's code; the
   numerically non-zero ones), orthonormal, of dimension at most sum_i r_i;
2. project each adapter into the core: M_i = U_B^T (s_i B_i) (A_i V_A), a small [k_B, k_A] matrix, exact
   (dW_i = U_B M_i V_A^T: every B_i lies in U_B's span, every A_i in V_A's);
3. merge the cores with TIES (sparsify.ties_merge, as ties.py: mergekit's conventions, density D, the
   weights w_i), trimming int(D * k_B * k_A) entries per core;
4. map back exactly: result = U_B M V_A^T, stored balanced (the SVD of the small M) at M's rank.
The other merges the paper runs in the core commute with the orthonormal bases: linear and iso-c in the core
are lrtool's linear and iso-c, and TSV in the core is lrtool's tsv with k = the core's dimension / N; lrtool
computes those in the span of the factors already, so core-space here is the one whose core merge is entry
by entry, where the basis matters.

Factored: the bases come from SVDs of the [out, sum r_i] and [sum r_i, in] stacks, the cores and TIES work on
matrices of at most (sum r_i)^2 entries; no dense [out, in] matrix is formed.
"""

from lrtool.merge.base import Method, ModuleInputs, Settings, Update
from lrtool.merge.sparsify import DENSITY, ties_merge
from lrtool.merge.spectral import column_basis, factored, numerical_rank


def core_space(module: ModuleInputs, settings: Settings) -> Update:
    import torch

    present = [i for i, m in enumerate(module.modules) if m is not None]
    U_B = column_basis(torch.cat([module.modules[i].B.to(torch.float64) for i in present], dim=1))
    V_A = column_basis(torch.cat([module.modules[i].A.to(torch.float64) for i in present], dim=0).T)
    cores = torch.zeros(len(module.modules), U_B.shape[1], V_A.shape[1], dtype=torch.float64)
    for i in present:
        B, A = module.scaled_factors(i)
        cores[i] = (U_B.T @ B) @ (A @ V_A)
    merged = ties_merge(cores, module.weights, settings.density)
    U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
    k = numerical_rank(S, tuple(merged.shape))
    return factored(U_B @ U[:, :k], S[:k], Vh[:k] @ V_A.T)


METHOD = Method(
    name="core-space",
    summary="project every adapter onto the common bases of the stacked B's and A's, TIES on the small "
    "core matrices, map back exactly (factored)",
    compute=core_space,
    parameters=(DENSITY,),
    divides_by_weights=True,
)
