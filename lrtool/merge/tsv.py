"""tsv: TSV-Merge, Task Singular Vectors (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task
Interference in Model Merging"), on the adapters' updates.

Per module, over the N adapters that hold it:
1. each adapter keeps its top k singular triplets, dW_i ~ U_i diag(S_i) V_i^T, with k = --rank, by default
   min(out, in) // N (the paper's share, 1/N of the spectrum; int(min(out, in) * 1/N) in its code), and at
   most its numerical rank (a LoRA of rank r_i has r_i non-zero singular values: the others' vectors would
   be an arbitrary null-space basis);
2. concatenate U = [U_1 | ... | U_N], S = [w_1 S_1, ..., w_N S_N], V = [V_1 | ... | V_N];
3. orthogonalise: U and V replaced by their polar factors (the nearest matrices with orthonormal columns,
   spectral.polar: u_u @ v_u in the paper's code);
4. result = polar(U) diag(S) polar(V)^T.
With weights 1 this is the paper's TSV-M at alpha = 1; lrtool's default 1/N each scales it like linear's
average.

Factored: each U_i, S_i, V_i comes from the factors (a QR of each and an SVD of the r_i x r_i core), the
polar factors from SVDs of the [out, K] and [in, K] concatenations (K = sum of the kept k), and the result is
stored as a LoRA of rank K; no dense [out, in] matrix is formed.
"""

from lrtool.merge.base import Method, ModuleInputs, Parameter, Settings, Update
from lrtool.merge.spectral import factored, polar, top_components

RANK = Parameter(
    "rank",
    None,
    "k, the singular vectors each adapter keeps (default: per module, min(out, in) // N, the paper's share; "
    "at most the adapter's rank)",
)


def tsv(module: ModuleInputs, settings: Settings) -> Update:
    import torch

    present = [i for i, m in enumerate(module.modules) if m is not None]
    k = settings.rank or min(module.shape) // len(present)
    parts = [(module.weights[i], top_components(*module.scaled_factors(i), module.shape, k)) for i in present]
    if sum(S.numel() for _, (_, S, _) in parts) == 0:
        return Update.zero(module.shape)
    U = polar(torch.cat([U for _, (U, _, _) in parts], dim=1))
    Vh = polar(torch.cat([Vh for _, (_, _, Vh) in parts], dim=0))
    return factored(U, torch.cat([weight * S for weight, (_, S, _) in parts]), Vh)


METHOD = Method(
    name="tsv",
    summary="TSV-Merge: each adapter's top singular vectors, concatenated and orthogonalised (polar "
    "factors), recombined with their weighted singular values (factored)",
    compute=tsv,
    parameters=(RANK,),
)
