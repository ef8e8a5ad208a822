"""What a merge method is made of: its parameters, one module's inputs, one module's result.

A method is a `Method` (in one file of this package, registered in __init__.py): a name, a summary, its
parameters and `compute(ModuleInputs, Settings) -> Update`, the exact result for one module. Method files
import this module, sparsify.py (the trim, drop and elect steps the entry-wise methods share) and
spectral.py (the steps the SVD-based methods share), nothing else of the package. Reads and writes nothing:
plan.py lines the adapters up, stores the results and gets the receipt written.

Importing this module, or a method file, imports no torch (functions import it when they run): the command
line's help and man page list every method's summary and parameters from the registry without it.

Definitions every method follows:

- dW_i = scale_i * B_i @ A_i, the update adapter i applies to a module; a module an adapter lacks counts as
  zero there. Weights default to 1/N each; negative weights are allowed.
- A method computes, per module, its exact result in float64, either factored (B @ A: linear, svd,
  factor-avg, knots, slerp, karcher, tsv, iso-c, iso-cts, core-space: every update lives in the span of the
  stacked factors) or dense (ties, dare-*, magnitude-prune, della*, breadcrumbs*, sce: defined entry by
  entry); a dense result is stored at the rank --rank gives (DENSE_RANK), by truncated SVD (plan.py).
"""

from __future__ import annotations

import keyword
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from lrtool.errors import UsageError

if TYPE_CHECKING:
    import torch

    from lrtool.adapters import LoraModule

# ---------------------------------------------------------------------------------------------------------
# Methods and their parameters


@dataclass(frozen=True)
class Parameter:
    """A parameter a method takes: `name` is its flag without the dashes (--rank, --density, --seed,
    --epsilon, --lambda, --gamma, --t) and, spelt as a Python name (`attribute`), a field of Settings."""

    name: str
    default: int | float | None
    help: str
    storage: bool = False  # for rank: it sets the stored LoRA's rank, not the method's result
    check: Callable[[Any], str | None] | None = None  # what is wrong with a value ("must be ..."), or None

    @property
    def attribute(self) -> str:
        """The Settings field: the name, with a trailing underscore where it is a Python keyword."""
        return _attribute(self.name)


def _attribute(flag: str) -> str:
    name = flag.replace("-", "_")
    return name + "_" if keyword.iskeyword(name) else name


def _flag(attribute: str) -> str:
    return attribute.rstrip("_").replace("_", "-")


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
    """A merge's resolved parameters: weights (one per adapter) and the method's parameters (None: a
    parameter the method does not take)."""

    weights: tuple[float, ...]
    rank: int | None = None
    density: float | None = None
    seed: int | None = None
    epsilon: float | None = None  # della: half the width of the keep probabilities' range
    lambda_: float | None = None  # della: the factor the merged update is multiplied by
    gamma: float | None = None  # breadcrumbs: the fraction of largest entries dropped
    t: float | None = None  # slerp: where between the two adapters


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
    adapters: int | None = None  # how many adapters it merges (slerp: 2); None: any number
    # A method that takes no --weights (slerp) gives the weights the receipt records and from_linear
    # compares with, from its settings.
    fixed_weights: Callable[[Settings], tuple[float, ...]] | None = None
    check_settings: Callable[[Settings], None] | None = None  # refuses a combination of parameters

    def describe(self) -> dict:
        """What `lrtool merge --list` prints for this method."""
        return {
            "name": self.name,
            "summary": self.summary,
            "parameters": {p.name: {"default": p.default, "help": p.help} for p in self.parameters},
        }

    def parameter(self, name: str) -> Parameter | None:
        return next((p for p in self.parameters if p.name == name), None)

    def settings(self, weights: tuple[float, ...], **given) -> Settings:
        """Resolve the given parameters (Settings' field names: rank=, density=, lambda_=, ...; None: not
        given) against this method's: defaults filled in, others refused."""
        known = {f.name for f in fields(Settings)} - {"weights"}
        takes = ", ".join(f"--{p.name}" for p in self.parameters) or "no parameters"
        for attribute, value in given.items():
            if attribute not in known:
                raise TypeError(f"no merge parameter {attribute!r}")
            if value is not None and not any(p.attribute == attribute for p in self.parameters):
                flag = _flag(attribute)
                raise UsageError(f"--{flag} does not apply to method {self.name} (it takes {takes})")
        resolved = {
            p.attribute: p.default if given.get(p.attribute) is None else given[p.attribute]
            for p in self.parameters
        }
        rank = given.get("rank")
        if resolved.get("rank") is not None and (isinstance(rank, bool) or resolved["rank"] < 1):
            raise UsageError(f"--rank must be at least 1, got {resolved['rank']}")
        density = resolved.get("density")
        if density is not None and not 0 < density <= 1:
            raise UsageError(f"--density must be in (0, 1] (the fraction of entries kept), got {density}")
        for p in self.parameters:
            value = resolved[p.attribute]
            problem = p.check(value) if p.check is not None and value is not None else None
            if problem:
                raise UsageError(f"--{p.name} {problem}, got {value}")
        settings = Settings(weights=tuple(weights), **resolved)
        if self.check_settings is not None:
            self.check_settings(settings)
        return settings


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
        import torch

        module = self.modules[i]
        if module is None:
            return None
        return module.scale * module.B.to(torch.float64), module.A.to(torch.float64)

    def delta(self, i: int) -> torch.Tensor:
        """dW_i, dense [out, in] float64; zeros where adapter i lacks the module."""
        import torch

        module = self.modules[i]
        return torch.zeros(self.shape, dtype=torch.float64) if module is None else module.delta()

    def deltas(self) -> list[torch.Tensor]:
        return [self.delta(i) for i in range(len(self.modules))]

    def linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """sum_i w_i dW_i as factors: B = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...], A = [A_1; A_2; ...] (float64).

        Kept until forget(): the method and the receipt both need it. Written in place, block by block: the
        values of w_i * (s_i * B_i), without the temporaries of converting, scaling and concatenating."""
        if "linear" not in self._memo:
            import torch

            present = [(w, m) for w, m in zip(self.weights, self.modules) if m is not None]
            B = torch.empty(self.shape[0], sum(m.rank for _, m in present), dtype=torch.float64)
            A = torch.empty(B.shape[1], self.shape[1], dtype=torch.float64)
            start = 0
            for weight, module in present:
                end = start + module.rank
                B[:, start:end].copy_(module.B).mul_(module.scale).mul_(weight)
                A[start:end].copy_(module.A)
                start = end
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
    # ||self - linear||_F / ||linear||_F where the method knows it exactly from its own computation (svd:
    # the tail of the linear sum's spectrum), so the receipt need not measure it again
    from_linear: float | None = None

    @classmethod
    def factored(cls, B: torch.Tensor, A: torch.Tensor) -> Update:
        import torch

        return cls(B=B.to(torch.float64), A=A.to(torch.float64))

    @classmethod
    def dense(cls, matrix: torch.Tensor) -> Update:
        import torch

        return cls(matrix=matrix.to(torch.float64))

    @classmethod
    def zero(cls, shape: tuple[int, int]) -> Update:
        """The zero update of a module, as factors of rank 0."""
        import torch

        zeros = torch.zeros
        return cls(B=zeros(shape[0], 0, dtype=torch.float64), A=zeros(0, shape[1], dtype=torch.float64))

    @property
    def is_factored(self) -> bool:
        return self.matrix is None

    def to_dense(self) -> torch.Tensor:
        return self.B @ self.A if self.matrix is None else self.matrix

    def norm(self) -> float:
        import torch

        from lrtool import lowrank

        if self.is_factored:
            return lowrank.norm(self.B, self.A)
        return float(torch.linalg.matrix_norm(self.matrix))

    def distance(self, B: torch.Tensor, A: torch.Tensor) -> float:
        """||self - B @ A||_F, in float64; from factors when self is factored (as norm_and_distance)."""
        import torch

        from lrtool import lowrank

        B, A = B.to(torch.float64), A.to(torch.float64)
        if not self.is_factored:
            return float(torch.linalg.matrix_norm(self.matrix - B @ A))
        if self.A.shape == A.shape and torch.equal(self.A, A):
            return lowrank.norm(self.B - B, A)
        if self.B.shape == B.shape and torch.equal(self.B, B):
            return lowrank.norm(B, self.A - A)
        return lowrank.distance(self.B, self.A, B, A)

    def norm_and_distance(self, B: torch.Tensor, A: torch.Tensor) -> tuple[float, float]:
        """(||self||_F, ||self - B @ A||_F), in float64: the receipt's norm and error of a stored module.

        From factors when self is factored (Frobenius norms from the Gram matrices of the factors,
        O(k^2 (out + in)), lowrank.py), never a dense [out, in] matrix. A factor kept bit for bit (linear
        stores the A_i as they are) leaves the other's difference alone: half the work of the stacked form,
        one Gram matrix shared by both figures, and no cancellation between two nearly equal norms."""
        import torch

        from lrtool import lowrank

        B, A = B.to(torch.float64), A.to(torch.float64)
        if not self.is_factored:
            return self.norm(), float(torch.linalg.matrix_norm(self.matrix - B @ A))
        if self.A.shape == A.shape and torch.equal(self.A, A):
            gram_a = self.A @ self.A.T
            if self.B.shape == B.shape and torch.equal(self.B, B):
                return _root(self.B.T @ self.B, gram_a), 0.0  # stored bit for bit
            difference = self.B - B
            return _root(self.B.T @ self.B, gram_a), _root(difference.T @ difference, gram_a)
        if self.B.shape == B.shape and torch.equal(self.B, B):
            gram_b = self.B.T @ self.B
            difference = self.A - A
            return _root(gram_b, self.A @ self.A.T), _root(gram_b, difference @ difference.T)
        return self.norm(), lowrank.distance(self.B, self.A, B, A)

    def truncated(self, rank: int) -> Update:
        """The best approximation of rank at most `rank`, balanced (`balanced`)."""
        import torch

        from lrtool import lowrank

        if self.is_factored:
            if self.B.shape[1] <= rank:
                return self
            U, S, Vh = lowrank.factored_svd(self.B, self.A)
        else:
            U, S, Vh = torch.linalg.svd(self.matrix, full_matrices=False)
        return balanced(U, S, Vh, rank)


def _root(gram_b: torch.Tensor, gram_a: torch.Tensor) -> float:
    """||B @ A||_F from B^T B and A A^T (lowrank.norm's arithmetic, the Gram matrices given)."""
    return max(float((gram_b * gram_a).sum()), 0.0) ** 0.5


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
