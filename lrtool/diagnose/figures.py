"""The figures of `lrtool diagnose`, computed from the factors of dW = scale * B @ A, never a dense dW
(lowrank.py: QR of each factor and the SVD of the r x r core; Frobenius inner products from r x r Gram
matrices), so a 7B-sized adapter takes seconds: per module its spectrum and what it says (norm, effective
and stable rank, top energy), per pair of adapters their cosine, the overlap of their column and row spaces,
the error factor-avg would commit, and a verdict. The one exception is the TIES sign-conflict rate, defined
on the dense entries: exactly, it forms both updates a cache-sized block of rows at a time, in float32 with a
certified error bound (float64 for the entries too close to zero to tell); for a pair of more than
EXACT_SIGN_ENTRIES common entries it is estimated from SIGN_SAMPLES entries drawn uniformly (seeded by the
module's name, so reruns agree), computed in float64, and reported as an estimate with its 95% interval.
"""

from __future__ import annotations

import hashlib
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
_UNIT32 = 2.0**-24  # float32 unit roundoff
_SIGN_BLOCK_ENTRIES = 1 << 20  # entries of each float32 block of both updates (2 x 4 MB)
EXACT_SIGN_ENTRIES = 1 << 28  # a pair with more common dense entries gets an estimated sign-conflict rate
SIGN_SAMPLES = 1 << 20  # entries the estimate draws (its 95% interval is about +-0.001 wide)


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
    non-zero): the conflicts TIES's sign election resolves, counted before its trimming. Exact.

    Dense by definition, so formed a block of rows at a time, never a whole update: each entry is the dot
    product of a row of B and a column of A, computed in float32 on rows and columns scaled to unit length
    (which keeps every sign). A float32 dot product of length r is off by at most gamma_r = r u / (1 - r u)
    (u = 2^-24) for unit vectors, and rounding them to float32 adds 2u + u^2: the product z of the two
    adapters' scaled entries settles both signs when |z| exceeds that bound times (1 + bound)(1 + u); the
    few entries below it are computed again in float64, as the definition reads, scale included.
    """
    if a.scale == 0 or b.scale == 0:
        return 0, 0
    unit_Ba, rows_a = _unit_rows(a.B)
    unit_Bb, rows_b = _unit_rows(b.B)
    unit_Aa, columns_a = _unit_rows(a.A.T)
    unit_Ab, columns_b = _unit_rows(b.A.T)
    rows = torch.nonzero(rows_a & rows_b)[:, 0]  # a zero row or column is zero in its update: never both
    columns = torch.nonzero(columns_a & columns_b)[:, 0]
    if len(rows) == 0 or len(columns) == 0:
        return 0, 0
    unit_Ba, unit_Bb = unit_Ba[rows], unit_Bb[rows]
    unit_Aa, unit_Ab = unit_Aa[columns].T.contiguous(), unit_Ab[columns].T.contiguous()
    rank = max(a.rank, b.rank)
    gamma = rank * _UNIT32 / (1 - rank * _UNIT32) * (1 + _UNIT32) ** 2
    bound = gamma + 2 * _UNIT32 + _UNIT32**2
    threshold = 1.01 * bound * (1 + bound) * (1 + _UNIT32)
    opposite = (a.scale < 0) != (b.scale < 0)  # the scales' signs: conflicts and agreements trade places
    width = len(columns)
    height = max(1, _SIGN_BLOCK_ENTRIES // width)
    x, y = torch.empty(height, width), torch.empty(height, width)
    near = torch.empty(height, width, dtype=torch.bool)
    agreement, settled, unsettled = 0, 0, []
    for start in range(0, len(rows), height):
        count = min(height, len(rows) - start)
        z, w, small = x[:count], y[:count], near[:count]
        torch.mm(unit_Ba[start : start + count], unit_Aa, out=z)
        torch.mm(unit_Bb[start : start + count], unit_Ab, out=w)
        z.mul_(w)
        torch.sign(z, out=w)  # +1 where the signs agree, -1 where they differ
        torch.le(z.abs_(), threshold, out=small)
        where = torch.nonzero(small.view(-1))[:, 0]  # too close to zero to tell in float32: done in float64
        agreement += int(w.sum()) - int(w.view(-1)[where].sum())
        settled += count * width - len(where)
        unsettled.append(where.add_(start * width))
    where = torch.cat(unsettled)
    conflicts, both = _float64_signs(a, b, rows[where // width], columns[where % width])
    disagreeing = (settled - agreement) // 2
    return conflicts + (settled - disagreeing if opposite else disagreeing), both + settled


def _unit_rows(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X's rows scaled to unit length (norms in float64), in float32; and which rows are non-zero."""
    X = X.to(torch.float64)
    norms = torch.linalg.vector_norm(X, dim=1, keepdim=True)
    return (X / torch.where(norms > 0, norms, 1.0)).to(torch.float32), norms[:, 0] > 0


def _float64_signs(
    a: LoraModule, b: LoraModule, rows: torch.Tensor, columns: torch.Tensor
) -> tuple[int, int]:
    """(conflicts, both non-zero) among the entries (rows[k], columns[k]) of the two updates, in float64."""
    if len(rows) == 0:
        return 0, 0
    da = ((a.B[rows].to(torch.float64) * a.scale) * a.A[:, columns].T.to(torch.float64)).sum(dim=1)
    db = ((b.B[rows].to(torch.float64) * b.scale) * b.A[:, columns].T.to(torch.float64)).sum(dim=1)
    both = (da != 0) & (db != 0)
    return int((both & (torch.sign(da) != torch.sign(db))).sum()), int(both.sum())


def _sampled_sign_conflicts(name: str, a: LoraModule, b: LoraModule, count: int) -> tuple[int, int]:
    """(conflicts, both non-zero) among `count` entries drawn uniformly (with replacement) from the
    [out, in] updates, in float64; the draw is seeded by the module's name, so every run draws the same."""
    seed = int.from_bytes(hashlib.sha256(f"lrtool-sign-conflicts\0{name}".encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(a.out_features, (count,), generator=generator)
    columns = torch.randint(a.in_features, (count,), generator=generator)
    return _float64_signs(a, b, rows, columns)


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for the default z)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    center = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, center - half), min(1.0, center + half)


def _factor_avg(a: LoraModule, b: LoraModule) -> tuple[float, float] | None:
    """(||factor-avg - exact average||, ||exact average||) for equal ranks, else None.

    factor-avg averages the factors separately (scale folded into B): ((Ba + Bb) / 2) @ ((Aa + Ab) / 2);
    the exact average is (Ba Aa + Bb Ab) / 2; their difference is exactly -(Ba - Bb) @ (Aa - Ab) / 4, a
    product of rank r whose factors are small where the adapters agree (no cancellation between two nearly
    equal norms, as inner products would suffer). Each norm is ||B R^T||_F for A^T = Q R (_product_norm).
    """
    if a.rank != b.rank:
        return None
    Ba, Aa = a.B.to(torch.float64) * a.scale, a.A.to(torch.float64)
    Bb, Ab = b.B.to(torch.float64) * b.scale, b.A.to(torch.float64)
    error = _product_norm(Ba - Bb, Aa - Ab) / 4
    return error, _product_norm(torch.cat([Ba, Bb], dim=1), torch.cat([Aa, Ab], dim=0)) / 2


def _product_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """||B @ A||_F from the triangle of a QR of A^T: ||B R^T||_F, a [out, k] product, no dense update."""
    return float(torch.linalg.matrix_norm(B @ torch.linalg.qr(A.T, mode="r")[1].T))


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
    # The sign-conflict rate is estimated when set: SIGN_SAMPLES entries spread over `sign_entries`, the
    # dense entries of the pair's common modules, in proportion to each module's; `sign_sampled` counts them.
    sign_entries: int | None = None
    sign_sampled: int = 0

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
        if self.sign_entries is None:
            conflicts, both = _sign_conflicts(a, b)
        else:
            count = max(1, math.ceil(SIGN_SAMPLES * a.out_features * a.in_features / self.sign_entries))
            conflicts, both = _sampled_sign_conflicts(name, a, b, count)
            self.sign_sampled += count
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
