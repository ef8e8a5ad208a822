"""iso-c: Iso-C (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces"): the weighted sum of the updates with its spectrum flattened to its mean singular
value.

Per module: M = sum_i w_i dW_i = U diag(S) V^T; result = mean(S) U V^T, the mean over M's numerically
non-zero singular values. (The paper's code averages all min(out, in) singular values of a full-rank sum and
keeps every singular vector; for a sum of LoRAs the zero ones belong to an arbitrary null-space basis, so
here the spectrum is flattened within the span of the updates.) The weights play the paper's alpha.

Factored: M's SVD comes from its stacked factors (linear's: a QR of each and an SVD of the small core), the
result is stored as a LoRA of M's rank (at most sum_i r_i); no dense [out, in] matrix is formed.
"""

from lrtool.merge.base import Method, ModuleInputs, Settings, Update
from lrtool.merge.spectral import factored, top_components


def iso_c(module: ModuleInputs, settings: Settings) -> Update:
    import torch

    U, S, Vh = top_components(*module.linear(), module.shape)
    if S.numel() == 0:
        return Update.zero(module.shape)
    return factored(U, torch.full_like(S, float(S.mean())), Vh)


METHOD = Method(
    name="iso-c",
    summary="Iso-C: the weighted sum of the dW_i with its singular values all set to their mean (factored)",
    compute=iso_c,
)
