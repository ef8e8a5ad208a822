"""dare-linear: DARE (Yu et al., 2024): drop each entry of dW_i with probability 1 - D, divide the kept ones
by D, then sum with weights: sum_i w_i drop(dW_i).

The drop mask is random but reproducible: for module m and adapter index i (0-based, command-line order)
the entries kept are those where u < D, u = torch.rand(out, in, dtype=float64) drawn from a CPU
torch.Generator seeded with the first 8 bytes (little-endian, top bit cleared) of
sha256("lrtool-dare\\0{seed}\\0{m}\\0{i}"). Same seed, same bytes; reordering the adapters changes the masks.
"""

import hashlib

import torch

from lrtool.merge.base import Method, ModuleInputs, Parameter, Settings, Update
from lrtool.merge.magnitude_prune import DENSITY, RANK

SEED = Parameter("seed", 0, "seed of the drop masks (same seed, same bytes)")
NOTE = "drop masks are drawn per module and adapter index from --seed: reordering the adapters changes them"


def drop_generator(seed: int, module: str, index: int) -> torch.Generator:
    digest = hashlib.sha256(f"lrtool-dare\0{seed}\0{module}\0{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability `density` (u < density) and divide the kept ones by it."""
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float64) < density
    return torch.where(keep, delta / density, 0.0)


def dropped(module: ModuleInputs, settings: Settings) -> list[torch.Tensor]:
    """drop(dW_i) for every adapter i (zeros where it lacks the module)."""
    return [
        drop_and_rescale(module.delta(i), settings.density, drop_generator(settings.seed, module.name, i))
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
