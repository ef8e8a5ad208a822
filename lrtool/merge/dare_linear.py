"""dare-linear: DARE (Yu et al., 2024): drop each entry of dW_i with probability 1 - D, divide the kept ones
by D, then sum with weights: sum_i w_i drop(dW_i).

The drop mask is random but reproducible, and the same on every device: for module m and adapter index i
(0-based, command-line order) the key is the first 8 bytes of sha256("lrtool-dare\\0{seed}\\0{m}\\0{i}") as
two little-endian 32-bit words, and the entry at row-major position p of the [out, in] update is kept where
lrtool.kernels.counter_rng's bits(key, p) < round(D * 2^32), a counter-based draw that the GPU's fused merge
kernel makes identically. Same seed, same bytes; reordering the adapters changes the masks.
"""

import hashlib

import torch

from lrtool.kernels import counter_rng
from lrtool.merge.base import Method, ModuleInputs, Parameter, Settings, Update
from lrtool.merge.magnitude_prune import DENSITY, RANK

SEED = Parameter("seed", 0, "seed of the drop masks (same seed, same bytes)")
NOTE = "drop masks are drawn per module and adapter index from --seed: reordering the adapters changes them"


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


def dare_linear(module: ModuleInputs, settings: Settings) -> Update:
    result = torch.zeros(module.shape, dtype=torch.float64)
    for weight, delta in zip(module.weights, dropped(module, settings)):
        result += weight * delta
    return Update.dense(result)


METHOD = Method(
    name="dare-linear",
    summary="drop entries of each dW_i with probability 1 - D, rescale by 1/D, sum with weights (dense)",
    compute=dare_linear,
    parameters=(DENSITY, SEED, RANK),
    notes=(NOTE,),
)
