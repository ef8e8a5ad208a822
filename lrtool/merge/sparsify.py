"""The steps the sparsifying methods share, on dense [out, in] updates, and their parameters.

    trim    keep_largest: keep the int(D * numel) largest-magnitude entries (magnitude-prune, ties, knots,
            core-space); keep_middle: drop the largest int(gamma * numel) first (breadcrumbs*)
    drop    dropped: DARE's random drop, each entry kept with probability D and divided by D (dare-*);
            della_dropped: DELLA's, the keep probability ranked by magnitude within each row (della*)
    elect   elect_and_average: TIES' sign election and disjoint mean, mergekit's conventions (ties,
            dare-ties, della, knots, core-space); elect_and_sum without the mean (breadcrumbs-ties);
            ties_merge is trim then elect

Reads and writes tensors only. DARE's drop mask is random but reproducible, and the same on every device:
for module m and adapter index i (0-based, command-line order) the key is the first 8 bytes of
sha256("lrtool-dare\\0{seed}\\0{m}\\0{i}") as two little-endian 32-bit words, and the entry at row-major
position p of the [out, in] update is kept where lrtool.kernels.counter_rng's bits(key, p) < round(D * 2^32),
a counter-based draw that the GPU's fused merge kernel makes identically. Same seed, same bytes; reordering
the adapters changes the masks. DELLA draws from the same generator with its own key ("lrtool-della" for
"lrtool-dare") and a threshold per entry, round(p * 2^32).

Among entries of equal magnitude, the earlier one (row-major) counts as the larger everywhere here: a stable
descending sort, so every trim is deterministic. Imports torch only when a step runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from lrtool.merge.base import ModuleInputs, Parameter, Settings

if TYPE_CHECKING:
    import torch

DENSITY = Parameter("density", 0.5, "D, the fraction of each update's entries kept, in (0, 1]")
SEED = Parameter("seed", 0, "seed of the drop masks (same seed, same bytes)")
DROP_NOTE = (
    "drop masks are drawn per module and adapter index from --seed: reordering the adapters changes them"
)
GAMMA = Parameter(
    "gamma",
    0.01,
    "the fraction of each update's largest-magnitude entries dropped before the D kept (mergekit's default)",
    check=lambda value: None if 0 <= value < 1 else "must be in [0, 1)",
)
EPSILON = Parameter(
    "epsilon",
    0.15,
    "keep probabilities run from D - epsilon (smallest entry of a row) to D + epsilon (largest); "
    "mergekit's default",
    check=lambda value: None if value >= 0 else "must be at least 0",
)
LAMBDA = Parameter("lambda", 1.0, "the merged update is multiplied by lambda (mergekit's default)")


# ---------------------------------------------------------------------------------------------------------
# trim


def largest(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Which entries of the flat `magnitude` are its k largest (bool), the earlier ones first among equals:
    the first k of a stable descending sort, by selection instead (linear time, not n log n)."""
    import torch

    n = magnitude.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    threshold = torch.kthvalue(magnitude, n - k + 1).values  # the k-th largest magnitude
    keep = magnitude > threshold
    tied = torch.nonzero(magnitude == threshold).squeeze(1)
    keep[tied[: k - int(keep.sum())]] = True
    return keep


def keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with all but its int(density * numel) largest-magnitude entries set to zero; of entries
    equal in magnitude to the smallest one kept, the first ones in row-major order are kept."""
    import torch

    n = delta.numel()
    k = int(density * n)
    if k >= n:
        return delta
    if k == 0:
        return torch.zeros_like(delta)
    flat = delta.reshape(-1)
    return torch.where(largest(flat.abs(), k), flat, 0.0).reshape(delta.shape)


def keep_middle(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs' mask, mergekit's sparsify.magnitude_outliers: drop the int(gamma * numel)
    largest-magnitude entries, keep the next int(density * numel), drop the rest (fewer dropped from the top
    when the two do not fit); `delta` itself when density >= 1.

    mergekit keeps indices[n_bottom:-n_top] of an ascending sort, which is empty when int(gamma * numel) is 0
    (gamma 0, or a small module); here the middle is kept then too, so gamma 0 is magnitude-prune's trim."""
    import torch

    if density >= 1:
        return delta
    n = delta.numel()
    kept = int(density * n)
    top = min(int(gamma * n), n - kept)
    magnitude = delta.reshape(-1).abs()
    keep = largest(magnitude, top + kept) & ~largest(magnitude, top)
    return torch.where(keep, delta.reshape(-1), 0.0).reshape(delta.shape)


# ---------------------------------------------------------------------------------------------------------
# drop


def drop_key(seed: int, module: str, index: int, method: str = "dare") -> tuple[int, int]:
    """The counter_rng key of adapter `index`'s drop mask in `module` (DARE's; `method` "della": DELLA's)."""
    from lrtool.kernels import counter_rng

    digest = hashlib.sha256(f"lrtool-{method}\0{seed}\0{module}\0{index}".encode()).digest()
    return counter_rng.word_bits(digest)


def drop_and_rescale(delta: torch.Tensor, density: float, key: tuple[int, int]) -> torch.Tensor:
    """Keep the entries counter_rng keeps with probability `density` for `key`, divided by `density`."""
    import torch

    from lrtool.kernels import counter_rng

    keep = counter_rng.keep(key, 0, delta.numel(), density, delta.device).reshape(delta.shape)
    return torch.where(keep, delta / density, 0.0)


def dropped(module: ModuleInputs, settings: Settings) -> list[torch.Tensor]:
    """drop(dW_i) for every adapter i (zeros where it lacks the module)."""
    return [
        drop_and_rescale(module.delta(i), settings.density, drop_key(settings.seed, module.name, i))
        if module.modules[i] is not None
        else module.delta(i)
        for i in range(len(module.modules))
    ]


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune probabilities (mergekit's sparsify.della_magprune): within each row, the entries
    ranked by magnitude (1 the smallest, n the largest; the earlier one first among equals) get
    p = (D - epsilon) + (rank - 1) / (n - 1) * 2 epsilon, from D - epsilon up to D + epsilon (D for a row of
    one entry), in float64."""
    import torch

    rows, n = delta.shape
    order = torch.argsort(delta.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n).expand(rows, n))  # 0-based: rank - 1
    spread = ranks.to(torch.float64) / (n - 1) if n > 1 else torch.full(delta.shape, 0.5, dtype=torch.float64)
    return (density - epsilon) + spread * (2 * epsilon)


def della_drop(delta: torch.Tensor, density: float, epsilon: float, key: tuple[int, int]) -> torch.Tensor:
    """DELLA's drop of one update: each entry kept where counter_rng's bits(key, p) < round(p * 2^32) for
    its probability p (della_keep_probabilities), then rescaled as mergekit's della does by default
    (sparsify.rescaled_masked_tensor, l1): the kept entries times ||delta||_1 / ||kept||_1, unless either
    norm is below mergekit's eps 1e-7. (The DELLA paper, and mergekit before its rescale_norm, divided each
    kept entry by its p instead.) `delta` itself when density >= 1."""
    import torch

    from lrtool.kernels import counter_rng

    if density >= 1:
        return delta
    thresholds = torch.round(della_keep_probabilities(delta, density, epsilon) * 2.0**32).to(torch.int64)
    keep = counter_rng.bits(key, 0, delta.numel(), delta.device).reshape(delta.shape) < thresholds
    kept = torch.where(keep, delta, 0.0)
    before, after = float(delta.abs().sum()), float(kept.abs().sum())
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def della_dropped(module: ModuleInputs, settings: Settings) -> list[torch.Tensor]:
    """della_drop(dW_i) for every adapter i (zeros where it lacks the module), keys from --seed."""
    return [
        della_drop(
            module.delta(i),
            settings.density,
            settings.epsilon,
            drop_key(settings.seed, module.name, i, method="della"),
        )
        if module.modules[i] is not None
        else module.delta(i)
        for i in range(len(module.modules))
    ]


def check_della(settings: Settings) -> None:
    """mergekit's rule: below density 1, D - epsilon and D + epsilon must both lie in (0, 1)."""
    from lrtool.errors import UsageError

    density, epsilon = settings.density, settings.epsilon
    if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        raise UsageError(
            f"--density {density} and --epsilon {epsilon}: the keep probabilities D - epsilon and "
            "D + epsilon must lie in (0, 1); choose a smaller --epsilon"
        )


# ---------------------------------------------------------------------------------------------------------
# elect


def agreeing(weighted: torch.Tensor) -> torch.Tensor:
    """TIES' election on weighted values [n, ...]: each entry's sign is the sign of the sum over n, zero
    counting as positive (mergekit's get_mask, "sum"); which values agree with it (zeros never agree)."""
    import torch

    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)
    return torch.sign(weighted) == elected


def _weights_like(values: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    import torch

    return torch.tensor(weights, dtype=values.dtype).reshape(-1, *([1] * (values.dim() - 1)))


def elect_and_average(values: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """TIES' sign election and disjoint mean of `values` [n, ...] (unweighted), weights [n]: each entry's
    sign is the sign of sum_i w_i v_i, zero counting as positive; the w_i v_i whose sign agrees with it
    (zeros never agree) are summed and divided by the sum of their weights w_i, by 1 where none agrees."""
    import torch

    w = _weights_like(values, weights)
    weighted = values * w
    agrees = agreeing(weighted)
    total = torch.where(agrees, weighted, 0.0).sum(dim=0)
    divisor = torch.where(agrees, w, 0.0).sum(dim=0)
    return total / torch.where(divisor == 0, 1.0, divisor)


def elect_and_sum(values: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """TIES' sign election without the mean (mergekit's consensus with normalize off, as its
    breadcrumbs_ties has it): the sum of the w_i v_i that agree with the elected sign."""
    import torch

    weighted = values * _weights_like(values, weights)
    return torch.where(agreeing(weighted), weighted, 0.0).sum(dim=0)


def ties_merge(values: Iterable[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES on unweighted values, one per adapter: trim each to its largest entries, elect and average."""
    import torch

    return elect_and_average(torch.stack([keep_largest(value, density) for value in values]), weights)
