"""The figures of `lrtool diagnose`, computed from the factors of dW = scale * B @ A, never a dense dW
(lowrank.py: QR of each factor and the SVD of the r x r core; Frobenius inner products from r x r Gram
matrices), so a 7B-sized adapter takes seconds: per module its spectrum and what it says (norm, effective
and stable rank, top energy), per pair of adapters their cosine, the overlap of their column and row spaces,
the error factor-avg would commit, and a verdict. The one exception is the TIES sign-conflict rate, defined
on the dense entries: it forms dW a block of rows at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lrtool.adapters import LoraModule
from lrtool.diagnose.findings import ZERO_UPDATE_TOLERANCE
from lrtool.lowrank import factored_svd, inner

# How much merging two adapters is expected to interfere (`verdict` of a pair), from the whole-update
# cosine and the mean overlap of their column and row spaces (mean squared cosine of principal angles,
# about r / width for unrelated adapters).
OPPOSED_COSINE = (-0.1, -0.3)  # moderate, high: the updates cancel each other where merged
SHARED_SUBSPACE = (0.2, 0.5)  # moderate, high: they write into the same directions ...
AGREEING_COSINE = 0.5  # ... unless they largely agree
LOSSY_FACTOR_AVG = 0.5  # factor-avg's relative error above which the verdict says to merge exactly

_EPS64 = 2.220446049250313e-16  # float64 machine epsilon: numerical rank as numpy's matrix_rank counts it
_SIGN_BLOCK_ENTRIES = 1 << 18  # entries of dense dW formed at a time for sign conflicts (2 MB of float64)


def spectrum(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of dW = scale * B @ A from the factors, S descending (all r values), scale folded in."""
    U, S, Vh = factored_svd(module.B, module.A)
    return (-U if module.scale < 0 else U), S * abs(module.scale), Vh


def spectral_figures(S: torch.Tensor) -> dict:
    """norm, effective rank, stable rank and top-value energy of a spectrum (None when it is all zero).

    Effective rank (Roy & Vetterli 2007): exp of the entropy of p_i = s_i / sum(s), the singular values
    normalised to sum 1 (not their squares): 1 for a rank-1 update, r for a flat spectrum.
    """
    energy = float((S**2).sum())
    figures = {"norm": math.sqrt(energy), "effective_rank": None, "stable_rank": None, "top_energy": None}
    if energy > 0:
        p = S / S.sum()
        p = p[p > 0]
        figures["effective_rank"] = math.exp(float(-(p * torch.log(p)).sum()))
        figures["stable_rank"] = energy / float(S[0]) ** 2
        figures["top_energy"] = float(S[0]) ** 2 / energy
    return figures


def is_zero_update(module: LoraModule, norm: float) -> bool:
    """Whether dW = scale * B @ A of norm `norm` counts as zero: ||dW|| <= ZERO_UPDATE_TOLERANCE x |scale|
    ||B|| ||A|| (exactly zero when B is, as peft initialises it, or the scale is)."""
    factors = torch.linalg.vector_norm(module.A, dtype=torch.float64) * torch.linalg.vector_norm(
        module.B, dtype=torch.float64
    )
    return norm <= ZERO_UPDATE_TOLERANCE * abs(module.scale) * float(factors)


def _numerical_rank(S: torch.Tensor, shape: tuple[int, int]) -> int:
    if len(S) == 0 or float(S[0]) == 0:
        return 0
    return int((S > float(S[0]) * max(shape) * _EPS64).sum())


def _overlap(Qa: torch.Tensor, Qb: torch.Tensor) -> float | None:
    """Mean squared cosine of the principal angles between two subspaces given orthonormal bases.

    The cosines are the singular values of Qa^T Qb, so their squares sum to ||Qa^T Qb||_F^2; the mean is
    over min(dim a, dim b) angles: 1 when one space contains the other, 0 when they are orthogonal.
    """
    k = min(Qa.shape[1], Qb.shape[1])
    return float((Qa.T @ Qb).pow(2).sum()) / k if k else None


def _sign_conflicts(a: LoraModule, b: LoraModule) -> tuple[int, int]:
    """(entries where both dense updates are non-zero and their signs differ, entries where both are
    non-zero): the conflicts TIES's sign election resolves, counted before its trimming.

    Dense by definition, so formed a cache-sized block of rows at a time (6x faster than 32 MB blocks);
    the sign of da * db says both at once (in float64 a product underflows only below 1e-308).
    """
    Ba, Aa = a.B.to(torch.float64) * a.scale, a.A.to(torch.float64)
    Bb, Ab = b.B.to(torch.float64) * b.scale, b.A.to(torch.float64)
    rows = max(1, _SIGN_BLOCK_ENTRIES // Aa.shape[1])
    conflicts = both = 0
    for start in range(0, Ba.shape[0], rows):
        product = (Ba[start : start + rows] @ Aa).mul_(Bb[start : start + rows] @ Ab)
        both += int(torch.count_nonzero(product))
        conflicts += int(torch.count_nonzero(product < 0))
    return conflicts, both


def _factor_avg(a: LoraModule, b: LoraModule) -> tuple[float, float] | None:
    """(||factor-avg - exact average||, ||exact average||) for equal ranks, else None.

    factor-avg averages the factors separately (scale folded into B): ((sa Ba + sb Bb) / 2) @ ((Aa + Ab) / 2);
    the exact average (dWa + dWb) / 2 is the stacked [sa Ba / 2 | sb Bb / 2] @ [Aa; Ab]. Both norms come from
    the singular values of stacked factors (lowrank.distance, from inner products, would lose half the
    digits to cancellation when the two nearly agree).
    """
    if a.rank != b.rank:
        return None
    Ba, Aa = a.B.to(torch.float64) * a.scale, a.A.to(torch.float64)
    Bb, Ab = b.B.to(torch.float64) * b.scale, b.A.to(torch.float64)
    exact_B, exact_A = torch.cat([Ba / 2, Bb / 2], dim=1), torch.cat([Aa, Ab], dim=0)
    difference_B = torch.cat([(Ba + Bb) / 2, -exact_B], dim=1)
    difference_A = torch.cat([(Aa + Ab) / 2, exact_A], dim=0)
    error = float(factored_svd(difference_B, difference_A)[1].pow(2).sum().sqrt())
    return error, float(factored_svd(exact_B, exact_A)[1].pow(2).sum().sqrt())


@dataclass
class PairFigures:
    """What two adapters' common modules add up to, module by module."""

    a: int
    b: int
    inner: float = 0.0
    conflicts: int = 0
    both_nonzero: int = 0
    factor_avg_error_sq: float = 0.0
    factor_avg_reference_sq: float = 0.0
    column_overlaps: list[float] = field(default_factory=list)
    row_overlaps: list[float] = field(default_factory=list)
    modules: list[dict] = field(default_factory=list)
    shape_conflicts: list[str] = field(default_factory=list)

    def add(self, name: str, a: LoraModule, b: LoraModule, spectrum_a: tuple, spectrum_b: tuple) -> None:
        """Add module `name`, with both adapters' factors and spectra (as `spectrum` gives them)."""
        if a.out_features != b.out_features or a.in_features != b.in_features:
            self.shape_conflicts.append(name)
            return
        (Ua, Sa, Vha), (Ub, Sb, Vhb) = spectrum_a, spectrum_b
        shape = (a.out_features, a.in_features)
        ka, kb = _numerical_rank(Sa, shape), _numerical_rank(Sb, shape)
        norm_a, norm_b = float(Sa.pow(2).sum().sqrt()), float(Sb.pow(2).sum().sqrt())
        product = a.scale * b.scale * inner(a.B, a.A, b.B, b.A)
        self.inner += product
        conflicts, both = _sign_conflicts(a, b)
        self.conflicts, self.both_nonzero = self.conflicts + conflicts, self.both_nonzero + both
        averaged = _factor_avg(a, b)
        if averaged is not None:
            self.factor_avg_error_sq += averaged[0] ** 2
            self.factor_avg_reference_sq += averaged[1] ** 2
        column, row = _overlap(Ua[:, :ka], Ub[:, :kb]), _overlap(Vha[:ka].T, Vhb[:kb].T)
        self.column_overlaps += [column] if column is not None else []
        self.row_overlaps += [row] if row is not None else []
        self.modules.append(
            {
                "name": name,
                "cosine": product / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else None,
                "column_overlap": column,
                "row_overlap": row,
                "sign_conflict": conflicts / both if both else None,
                "factor_avg_error": averaged[0] / averaged[1] if averaged and averaged[1] > 0 else None,
            }
        )


def verdict(cosine: float | None, overlap: float | None, factor_avg_error: float | None) -> str:
    """How much merging two adapters is expected to interfere, in a few words (thresholds above)."""
    if cosine is None:
        return "unknown: no non-zero update to compare"
    level, reasons = 0, []
    if cosine <= OPPOSED_COSINE[0]:
        level = 2 if cosine <= OPPOSED_COSINE[1] else 1
        reasons.append(f"the updates oppose each other (cosine {cosine:.2f})")
    if overlap is not None and overlap >= SHARED_SUBSPACE[0] and cosine < AGREEING_COSINE:
        level = max(level, 2 if overlap >= SHARED_SUBSPACE[1] else 1)
        reasons.append(f"they share subspaces (overlap {overlap:.2f}) without agreeing (cosine {cosine:.2f})")
    if not reasons:
        what = "largely agreeing" if cosine >= AGREEING_COSINE else "near-orthogonal"
        reasons.append(f"{what} updates (cosine {cosine:.2f}, overlap {overlap or 0:.2f})")
    text = f"{('low', 'moderate', 'high')[level]}: {'; '.join(reasons)}"
    if factor_avg_error is not None and factor_avg_error > LOSSY_FACTOR_AVG:
        text += f"; factor-avg is off by {factor_avg_error:.0%} of the exact average: merge exactly"
    return text
