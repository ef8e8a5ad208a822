"""The steps the sparsifying methods share, on dense [out, in] updates, and their parameters.

    trim    keep_largest: keep the int(D * numel) largest-magnitude entries (magnitude-prune, ties, knots)
    drop    dropped: DARE's random drop, each entry kept with probability D and divided by D (dare-*)
    elect   elect_and_average: TIES' sign election and disjoint mean, mergekit's conventions (ties,
            dare-ties, knots); ties_merge is trim then elect

Reads and writes tensors only. DARE's drop mask is random but reproducible, and the same on every device:
for module m and adapter index i (0-based, command-line order) the key is the first 8 bytes of
sha256("lrtool-dare\\0{seed}\\0{m}\\0{i}") as two little-endian 32-bit words, and the entry at row-major
position p of the [out, in] update is kept where lrtool.kernels.counter_rng's bits(key, p) < round(D * 2^32),
a counter-based draw that the GPU's fused merge kernel makes identically. Same seed, same bytes; reordering
the adapters changes the masks.
"""

import hashlib
from collections.abc import Iterable, Sequence

import torch

from lrtool.kernels import counter_rng
from lrtool.merge.base import ModuleInputs, Parameter, Settings

DENSITY = Parameter("density", 0.5, "D, the fraction of each update's entries kept, in (0, 1]")
SEED = Parameter("seed", 0, "seed of the drop masks (same seed, same bytes)")
DROP_NOTE = (
    "drop masks are drawn per module and adapter index from --seed: reordering the adapters changes them"
)


# ---------------------------------------------------------------------------------------------------------
# trim


def keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with all but its int(density * numel) largest-magnitude entries set to zero; of entries
    equal in magnitude to the smallest one kept, the first ones in row-major order are kept.

    The same as a stable descending sort, by selection instead (linear time, not n log n).
    """
    n = delta.numel()
    k = int(density * n)
    if k >= n:
        return delta
    if k == 0:
        return torch.zeros_like(delta)
    flat = delta.reshape(-1)
    magnitude = flat.abs()
    threshold = torch.kthvalue(magnitude, n - k + 1).values  # the k-th largest magnitude
    keep = magnitude > threshold
    tied = torch.nonzero(magnitude == threshold).squeeze(1)
    keep[tied[: k - int(keep.sum())]] = True
    return torch.where(keep, flat, 0.0).reshape(delta.shape)


# ---------------------------------------------------------------------------------------------------------
# drop


def drop_key(seed: int, module: str, index: int) -> tuple[int, int]:
    """The counter_rng key of adapter `index`'s drop mask in `module`."""
    return counter_rng.word_bits(hashlib.sha256(f"lrtool-dare\0{seed}\0{module}\0{index}".encode()).digest())


def drop_and_rescale(delta: torch.Tensor, density: float, key: tuple[int, int]) -> torch.Tensor:
    """Keep the entries counter_rng keeps with probability `density` for `key`, divided by `density`."""
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


# ---------------------------------------------------------------------------------------------------------
# elect


def elect_and_average(values: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """TIES' sign election and disjoint mean of `values` [n, ...] (unweighted), weights [n]: each entry's
    sign is the sign of sum_i w_i v_i, zero counting as positive; the w_i v_i whose sign agrees with it
    (zeros never agree) are summed and divided by the sum of their weights w_i, by 1 where none agrees."""
    w = torch.tensor(weights, dtype=values.dtype).reshape(-1, *([1] * (values.dim() - 1)))
    weighted = values * w
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(values.dtype)
    agrees = torch.sign(weighted) == elected
    total = torch.where(agrees, weighted, 0.0).sum(dim=0)
    divisor = torch.where(agrees, w, 0.0).sum(dim=0)
    return total / torch.where(divisor == 0, 1.0, divisor)


def ties_merge(values: Iterable[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES on unweighted values, one per adapter: trim each to its largest entries, elect and average."""
    return elect_and_average(torch.stack([keep_largest(value, density) for value in values]), weights)
