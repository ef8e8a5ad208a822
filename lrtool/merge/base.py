"""What a merge method is made of: its parameters, one module's inputs, one module's result.

A method is a `Method` (in one file of this package, registered in __init__.py): a name, a summary, its
parameters and `compute(ModuleInputs, Settings) -> Update`, the exact result for one module. Method files
import this module and sparsify.py (the trim, drop and elect steps several methods share), nothing else of
the package. Reads and writes nothing: plan.py lines the adapters up, stores the results and gets the
receipt written.

Definitions every method follows:

- dW_i = scale_i * B_i @ A_i, the update adapter i applies to a module; a module an adapter lacks counts as
  zero there. Weights default to 1/N each; negative weights are allowed.
- A method computes, per module, its exact result in float64, either factored (B @ A: linear, svd,
  factor-avg, knots) or dense (ties, dare-*, magnitude-prune); a dense result is stored at the rank --rank
  gives (DENSE_RANK), by truncated SVD (plan.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lrtool import lowrank
from lrtool.adapters import LoraModule
from lrtool.errors import UsageError

# ---------------------------------------------------------------------------------------------------------
# Methods and their parameters


@dataclass(frozen=True)
class Parameter:
    """A parameter a method takes: `rank`, `density` or `seed` (the --rank, --density, --seed flags)."""

    name: str
    default: int | float | None
    help: str
    storage: bool = False  # for rank: it sets the stored LoRA's rank, not the method's result


# The --rank of a method whose result is dense (ties, dare-*, magnitude-prune): a storage rank.
DENSE_RANK = Parameter(
    "rank",
    None,
    "rank the dense result is stored at by truncated SVD (default: per module, the largest input rank; "
    "at least min(out, in) is exact)",
    storage=True,
)


@dataclass(frozen=True)
class Settings:
    """A merge's resolved parameters: weights (one per adapter) and the method's rank, density, seed."""

    weights: tuple[float, ...]
    rank: int | None = None
    density: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Method:
    """A merge method: what `--method NAME` runs. `compute` maps one module's inputs to its exact result."""

    name: str
    summary: str
    compute: Callable[[ModuleInputs, Settings], Update]
    parameters: tuple[Parameter, ...] = ()
    check: Callable[[ModuleInputs], None] | None = None  # refuses inputs before anything is computed
    divides_by_weights: bool = False  # normalises by a sum of weights (TIES' disjoint mean)
    notes: tuple[str, ...] = ()  # what the receipt should always say about this method

    def describe(self) -> dict:
        """What `lrtool merge --list` prints for this method."""
        return {
            "name": self.name,
            "summary": self.summary,
            "parameters": {p.name: {"default": p.default, "help": p.help} for p in self.parameters},
        }

    def parameter(self, name: str) -> Parameter | None:
        return next((p for p in self.parameters if p.name == name), None)

    def settings(
        self,
        weights: tuple[float, ...],
        rank: int | None = None,
        density: float | None = None,
        seed: int | None = None,
    ) -> Settings:
        """Resolve the given parameters against this method's: defaults filled in, others refused."""
        given = {"rank": rank, "density": density, "seed": seed}
        takes = ", ".join(f"--{p.name}" for p in self.parameters) or "no parameters"
        for name, value in given.items():
            if value is not None and self.parameter(name) is None:
                raise UsageError(f"--{name} does not apply to method {self.name} (it takes {takes})")
        resolved = {p.name: p.default if given[p.name] is None else given[p.name] for p in self.parameters}
        if resolved.get("rank") is not None and (isinstance(rank, bool) or resolved["rank"] < 1):
            raise UsageError(f"--rank must be at least 1, got {resolved['rank']}")
        density = resolved.get("density")
        if density is not None and not 0 < density <= 1:
            raise UsageError(f"--density must be in (0, 1] (the fraction of entries kept), got {density}")
        return Settings(weights=tuple(weights), **resolved)


def parse_weights(text: str | None, count: int) -> tuple[float, ...] | None:
    """Parse --weights "w1,w2,..." (None when not given) and check there is one per adapter."""
    if text is None:
        return None
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--weights must be comma-separated numbers, got {text!r}") from None
    return check_weights(weights, count)


def check_weights(weights: Sequence[float] | None, count: int) -> tuple[float, ...]:
    """One finite weight per adapter; 1/N each when None."""
    if count < 1:
        raise UsageError("give at least one adapter to merge")
    if weights is None:
        return (1 / count,) * count
    weights = tuple(float(w) for w in weights)
    if len(weights) != count:
        raise UsageError(f"--weights has {len(weights)} values for {count} adapters; give one per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise UsageError(f"--weights must be finite numbers, got {', '.join(map(str, weights))}")
    return weights


# ---------------------------------------------------------------------------------------------------------
# One module's inputs and one module's result


@dataclass(frozen=True)
class ModuleInputs:
    """One module across the adapters being merged: its factors (None where an adapter lacks it), weights."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    modules: tuple[LoraModule | None, ...]  # one per adapter, in command-line order
    weights: tuple[float, ...]
    sources: tuple[str, ...]  # where each adapter came from, for messages
    _memo: dict = field(default_factory=dict, compare=False, repr=False)  # linear(), until forget()

    @property
    def ranks(self) -> tuple[int | None, ...]:
        return tuple(m.rank if m is not None else None for m in self.modules)

    @property
    def max_rank(self) -> int:
        return max(r for r in self.ranks if r is not None)

    def scaled_factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scale_i * B_i, A_i) in float64, so that dW_i = B @ A; None where adapter i lacks the module."""
        module = self.modules[i]
        if module is None:
            return None
        return module.scale * module.B.to(torch.float64), module.A.to(torch.float64)

    def delta(self, i: int) -> torch.Tensor:
        """dW_i, dense [out, in] float64; zeros where adapter i lacks the module."""
        module = self.modules[i]
        return torch.zeros(self.shape, dtype=torch.float64) if module is None else module.delta()

    def deltas(self) -> list[torch.Tensor]:
        return [self.delta(i) for i in range(len(self.modules))]

    def linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """sum_i w_i dW_i as factors: B = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...], A = [A_1; A_2; ...] (float64).

        Kept until forget(): the method and the receipt both need it."""
        if "linear" not in self._memo:
            present = [
                (w, self.scaled_factors(i)) for i, w in enumerate(self.weights) if self.modules[i] is not None
            ]
            B = torch.cat([weight * B for weight, (B, _) in present], dim=1)
            A = torch.cat([A for _, (_, A) in present], dim=0)
            self._memo["linear"] = (B, A)
        return self._memo["linear"]

    def forget(self) -> None:
        self._memo.clear()


@dataclass(frozen=True)
class Update:
    """A module's merged update in float64: factored (B [out, k] @ A [k, in]) or dense (`matrix`)."""

    B: torch.Tensor | None = None
    A: torch.Tensor | None = None
    matrix: torch.Tensor | None = None

    @classmethod
    def factored(cls, B: torch.Tensor, A: torch.Tensor) -> Update:
        return cls(B=B.to(torch.float64), A=A.to(torch.float64))

    @classmethod
    def dense(cls, matrix: torch.Tensor) -> Update:
        return cls(matrix=matrix.to(torch.float64))

    @property
    def is_factored(self) -> bool:
        return self.matrix is None

    def to_dense(self) -> torch.Tensor:
        return self.B @ self.A if self.matrix is None else self.matrix

    def norm(self) -> float:
        if self.is_factored:
            return lowrank.norm(self.B, self.A)
        return float(torch.linalg.matrix_norm(self.matrix))

    def distance(self, B: torch.Tensor, A: torch.Tensor) -> float:
        """||self - B @ A||_F, in float64; from factors when self is factored."""
        B, A = B.to(torch.float64), A.to(torch.float64)
        if not self.is_factored:
            return float(torch.linalg.matrix_norm(self.matrix - B @ A))
        # A factor kept bit for bit (linear stores the A_i as they are) leaves the other's difference alone:
        # half the work of the stacked form, and no cancellation between two nearly equal norms.
        if self.A.shape == A.shape and torch.equal(self.A, A):
            return lowrank.norm(self.B - B, A)
        if self.B.shape == B.shape and torch.equal(self.B, B):
            return lowrank.norm(B, self.A - A)
        return lowrank.distance(self.B, self.A, B, A)

    def truncated(self, rank: int) -> Update:
        """The best approximation of rank at most `rank`, balanced (`balanced`)."""
        if self.is_factored:
            if self.B.shape[1] <= rank:
                return self
            U, S, Vh = lowrank.factored_svd(self.B, self.A)
        else:
            U, S, Vh = torch.linalg.svd(self.matrix, full_matrices=False)
        return balanced(U, S, Vh, rank)


def balanced(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> Update:
    """U diag(S) Vh truncated to rank at most `rank`, as B = U diag(sqrt(S)), A = diag(sqrt(S)) Vh: each
    factor holds the square root of the update's size (B = U diag(S) would hold all of it, and overflow a
    float16 that holds the inputs' factors)."""
    k = min(rank, S.shape[0])
    root = S[:k].sqrt()
    return Update.factored(U[:, :k] * root, root[:, None] * Vh[:k])


def relative(distance: float, reference: float) -> float:
    """distance / reference, and the distance itself (0 in practice) when the reference is 0."""
    return distance / reference if reference > 0 else distance


def overflow_message(name: str, what: str, dtype: torch.dtype, how: str) -> str:
    """Why module `name` cannot be written: `what` does not fit `dtype`; `how` to merge in float32 when the
    dtype is narrower than that (in float32 itself, only smaller inputs help)."""
    if dtype.itemsize >= 4:
        return (
            f"module '{name}' overflows {str(dtype).removeprefix('torch.')} ({what} beyond its range): the "
            "adapters' scales (lora_alpha) or --weights are too large for any float32 result; check them"
        )
    dtype = str(dtype).removeprefix("torch.")
    return f"module '{name}' overflows {dtype} ({what} beyond its range); merge in float32: {how}"
