"""What every merge method shares: adapters lined up by module, weights, parameters, storage, the receipt.

A merge is planned first, with every check done and nothing written, then computed one module at a time:

    plan = plan_merge(adapters, "ties", weights=[0.5, 0.5], density=0.3)
    plan.exact("model.layers.0.self_attn.q_proj")   # the method's result for one module (float64)
    result = plan.to_adapter()                       # the stored LoRA and its receipt

Definitions every method follows:

- dW_i = scale_i * B_i @ A_i, the update adapter i applies to a module; a module an adapter lacks counts as
  zero there. Weights default to 1/N each; negative weights are allowed.
- A method computes, per module, its exact result in float64, either factored (B @ A: linear, svd,
  factor-avg, knots) or dense (ties, dare-*, magnitude-prune).
- Storage as a LoRA, always with scale 1 (B carries weights and scales, so peft applies exactly B @ A;
  `save_adapter` never writes use_rslora): a factored result is stored as it is, or as its best rank-K
  approximation when the method's `rank` parameter is a storage rank and --rank K is given; a dense result
  is stored as its truncated SVD at rank K (default: the largest rank any input has for that module), which
  is exact once K >= min(out, in). A truncated SVD is stored balanced, B = U_K diag(sqrt(S_K)),
  A = diag(sqrt(S_K)) Vh_K: each factor carries the square root of the update's size, as trained factors do,
  so neither overflows a float16 that holds the inputs. Factors are stored in the inputs' common dtype,
  float32 when they differ or are narrower than 16 bits (float8); integer (quantised) factors are refused.
  A stored factor that does not fit its dtype is refused (InputError), never written as inf.
- The receipt (merge_report.json) gives per module `error` = ||stored - exact||_F / ||exact||_F (what
  storage lost: dtype rounding, truncation; 0 when exact is 0) and `from_linear` = ||exact - linear||_F /
  ||linear||_F (how far the method's definition is from the weighted sum of the updates), both computed in
  float64 from factors where the result is factored (lrtool.lowrank), densely otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lrtool import lowrank
from lrtool.adapters import (
    Adapter,
    LoraModule,
    all_finite,
    check_computable,
    load_adapter,
    match_module_names,
    same_base,
    save_adapter,
)
from lrtool.errors import IncompatibleError, InputError, UsageError
from lrtool.io import dumps_report, sha256_path

REPORT = "merge_report.json"
DIGITS = 6  # significant digits of the receipt's floats
EXACT = 1e-6  # a stored module whose relative error is below this is reported as exact (float rounding)


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


def rounded(value: float | None) -> float | None:
    """`value` to DIGITS significant digits; None (JSON null) for None, NaN and inf, which JSON lacks."""
    return None if value is None or not math.isfinite(value) else float(f"{value:.{DIGITS}g}")


# ---------------------------------------------------------------------------------------------------------
# Planning: every check before anything is computed or written


@dataclass
class MergeResult:
    """A merge stored as a LoRA: the adapter to save, and the receipt (merge_report.json's content)."""

    adapter: Adapter
    report: dict

    def save(self, directory: str | Path) -> None:
        """Write the PEFT directory and merge_report.json into `directory` (atomicity is the caller's)."""
        save_adapter(self.adapter, Path(directory))
        (Path(directory) / REPORT).write_text(dumps_report(self.report), encoding="utf-8")


@dataclass
class MergePlan:
    """Adapters checked to belong together, lined up by module, with the method and its settings."""

    method: Method
    settings: Settings
    adapters: list[Adapter]
    inputs: dict[str, ModuleInputs]  # by module path, sorted
    dtype: torch.dtype  # what the stored factors are written in
    base: str | None  # the base the adapters name, when any does
    metadata: dict  # fan_in_fan_out, task_type: what the output adapter keeps
    base_model: object | None = None  # a models.ModelFiles when the merge goes into a base's weights
    notes: list[str] = field(default_factory=list)

    def exact(self, name: str) -> Update:
        """The method's exact result for module `name`, in float64 (by the fused kernel where kernels run:
        lrtool/merge/fused.py)."""
        from lrtool.merge import fused

        device = fused.device_for(self, into_base=False)
        if device is not None:
            return fused.exact(self, name, device)
        return self.method.compute(self.inputs[name], self.settings)

    def storage_rank(self, inputs: ModuleInputs, update: Update) -> int | None:
        """The rank module `inputs` is stored at; None: as it is (a factored result without --rank)."""
        if not update.is_factored:
            return self.settings.rank or inputs.max_rank
        parameter = self.method.parameter("rank")
        return self.settings.rank if parameter is not None and parameter.storage else None

    def store(self, name: str) -> tuple[LoraModule, dict]:
        """Module `name` as stored (factors in the output dtype, scale 1) and its receipt row."""
        try:
            return self._store(self.inputs[name])
        finally:
            self.inputs[name].forget()

    def _store(self, inputs: ModuleInputs) -> tuple[LoraModule, dict]:
        name = inputs.name
        exact = self.exact(name)
        rank = self.storage_rank(inputs, exact)
        kept = exact if rank is None else exact.truncated(rank)
        B, A = kept.B, kept.A
        if B.shape[1] == 0:  # a zero update: peft needs rank >= 1
            B, A = torch.zeros(B.shape[0], 1, dtype=B.dtype), torch.zeros(1, A.shape[1], dtype=A.dtype)
        B, A = B.to(self.dtype).contiguous(), A.to(self.dtype).contiguous()
        if not (all_finite(B) and all_finite(A)):
            raise InputError(
                overflow_message(name, "stored factors", self.dtype, "convert the adapters to float32 first")
            )
        norm = exact.norm()
        row = {
            "rank": B.shape[1],
            "error": relative(exact.distance(B, A), norm),
            "from_linear": self.from_linear(inputs, exact),
            "norm": norm,
            "truncated": rank is not None and rank < min(inputs.shape),
        }
        return LoraModule(A=A, B=B, scale=1.0), row

    def from_linear(self, inputs: ModuleInputs, exact: Update) -> float:
        """||exact - linear||_F / ||linear||_F: how far the method's result is from sum_i w_i dW_i."""
        linear = Update.factored(*inputs.linear())
        if exact.is_factored:
            if torch.equal(exact.B, linear.B) and torch.equal(exact.A, linear.A):
                return 0.0  # the linear method itself: the distance would be 0 too, after a Gram product
            return relative(linear.distance(exact.B, exact.A), linear.norm())
        return relative(exact.distance(linear.B, linear.A), linear.norm())

    def to_adapter(self) -> MergeResult:
        """Compute every module and store the merge as a LoRA adapter (in memory), with its receipt."""
        modules, rows = {}, {}
        for name in self.inputs:
            modules[name], rows[name] = self.store(name)
        adapter = Adapter(modules=modules, base=self.base, format="peft", metadata=dict(self.metadata))
        return MergeResult(adapter=adapter, report=self.report(rows, output="adapter"))

    def write(self, directory: str | Path) -> dict:
        """Write the merge into `directory` (a PEFT adapter, or the base model with --into-base) and
        merge_report.json; return the receipt."""
        if self.base_model is not None:
            from lrtool.merge.into_base import write_model

            rows = write_model(self, self.base_model, Path(directory))
            report = self.report(rows, output="model")
            (Path(directory) / REPORT).write_text(dumps_report(report), encoding="utf-8")
            return report
        result = self.to_adapter()
        result.save(directory)
        return result.report

    # ---------------------------------------------------------------------------------------- the receipt

    def report(self, rows: dict[str, dict], output: str) -> dict:
        """The receipt: method, weights, parameters, seed, inputs (with sha256), per-module rows, summary."""
        parameters = {p.name: getattr(self.settings, p.name) for p in self.method.parameters}
        inputs = []
        for adapter in self.adapters:
            path = Path(adapter.source) if adapter.source else None
            inputs.append(
                {
                    "path": adapter.source or None,
                    "sha256": sha256_path(path) if path is not None and path.exists() else None,
                    "format": adapter.format,
                    "base": adapter.base,
                    "modules": len(adapter.modules),
                    "rank": adapter.rank,
                }
            )
        errors = {name: row["error"] for name, row in rows.items()}
        worst = max(errors, key=lambda name: (errors[name], name))
        departures = [row["from_linear"] for row in rows.values()]
        summary = {
            "modules": len(rows),
            "error_max": rounded(errors[worst]),
            "error_max_module": worst,
            "error_mean": rounded(sum(errors.values()) / len(errors)),
            "exact_modules": sum(error < EXACT for error in errors.values()),
            "from_linear_max": rounded(max(departures)),
            "from_linear_mean": rounded(sum(departures) / len(departures)),
        }
        if output == "adapter":
            summary["rank_max"] = max(row["rank"] for row in rows.values())
            summary["stored_parameters"] = sum(
                row["rank"] * sum(self.inputs[name].shape) for name, row in rows.items()
            )
        report = {
            "method": self.method.name,
            "parameters": parameters,
            "weights": list(self.settings.weights),
            "seed": self.settings.seed,
            "inputs": inputs,
            "output": {
                "kind": "peft-adapter" if output == "adapter" else "model",
                "dtype": str(self.dtype).removeprefix("torch.") if output == "adapter" else None,
                "base": self.base,
            },
            "modules": {
                name: {k: rounded(v) if isinstance(v, float) else v for k, v in row.items()}
                for name, row in rows.items()
            },
            "summary": summary,
            "notes": self.notes + self.result_notes(rows, output),
            "precision": f"floats rounded to {DIGITS} significant digits",
        }
        if self.base_model is not None:
            report["into_base"] = {
                "path": self.base_model.source,
                "sha256": sha256_path(self.base_model.source),
            }
        return report

    def result_notes(self, rows: dict[str, dict], output: str) -> list[str]:
        notes = []
        truncated = [name for name, row in rows.items() if row.get("truncated") and row["error"] >= EXACT]
        if truncated:
            worst = max(truncated, key=lambda name: rows[name]["error"])
            notes.append(
                f"{len(truncated)} of {len(rows)} modules are stored at a rank below their full rank, an "
                f"approximation of the method's result (largest error {rounded(rows[worst]['error'])} in "
                f"{worst}); a --rank at least min(out, in) stores them exactly, --into-base adds the exact "
                "update"
            )
        if output == "model":
            notes.append(
                "error compares the change written into each base weight (after casting to its dtype) "
                "with the method's exact update"
            )
        return notes


def plan_merge(
    adapters: Sequence[Adapter],
    method: str | Method,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    density: float | None = None,
    seed: int | None = None,
    into_base: bool = False,
    allow_base_mismatch: bool = False,
) -> MergePlan:
    """Check that `adapters` can be merged with `method` and line them up by module; compute nothing.

    Raises UsageError (bad weights or parameters), InputError (non-finite values) or IncompatibleError
    (different bases, unless `allow_base_mismatch`; shapes or fan_in_fan_out; what the method itself
    refuses, e.g. unequal ranks).
    """
    if isinstance(method, str):
        from lrtool.merge import get

        method = get(method)
    adapters = list(adapters)
    weights = check_weights(weights, len(adapters))
    settings = method.settings(weights, rank=rank, density=density, seed=seed)
    rank_parameter = method.parameter("rank")
    if into_base and rank is not None and rank_parameter is not None and rank_parameter.storage:
        raise UsageError(
            f"--rank sets the rank {method.name} is stored at; --into-base adds the exact update, "
            "so drop --rank"
        )
    for adapter in adapters:
        check_computable(adapter)
    base = _common_base(adapters, allow_base_mismatch)
    fan_in_fan_out = _common_flag(adapters, "fan_in_fan_out")
    sources = tuple(a.source or f"adapter {i + 1}" for i, a in enumerate(adapters))
    inputs = {}
    for name in sorted({name for adapter in adapters for name in adapter.modules}):
        modules = tuple(adapter.modules.get(name) for adapter in adapters)
        inputs[name] = ModuleInputs(
            name=name,
            shape=_common_shape(name, modules, sources),
            modules=modules,
            weights=weights,
            sources=sources,
        )
        if method.check is not None:
            method.check(inputs[name])
    dtypes = {dtype for adapter in adapters for dtype in adapter.dtypes}
    mixed_dtypes = len(dtypes) > 1
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    narrow = dtype.itemsize < 2  # float8: too coarse for a merge's result (and no arithmetic in torch)
    dtype = torch.float32 if narrow else dtype
    task_types = [a.metadata.get("task_type") for a in adapters if a.metadata.get("task_type")]
    plan = MergePlan(
        method=method,
        settings=settings,
        adapters=adapters,
        inputs=inputs,
        dtype=dtype,
        base=base,
        metadata={
            "fan_in_fan_out": fan_in_fan_out,
            "task_type": task_types[0] if task_types else "CAUSAL_LM",
        },
    )
    plan.notes.extend(_plan_notes(plan, mixed_dtypes=mixed_dtypes, narrow=narrow))
    return plan


def _plan_notes(plan: MergePlan, mixed_dtypes: bool, narrow: bool = False) -> list[str]:
    notes = list(plan.method.notes)
    partial = sum(any(m is None for m in inputs.modules) for inputs in plan.inputs.values())
    if partial:
        notes.append(f"{partial} modules are missing from some adapters and count as zero there")
    if mixed_dtypes:
        notes.append("the inputs' dtypes differ: stored in float32")
    if narrow:
        notes.append("the inputs are stored in fewer than 16 bits (float8): stored in float32")
    if plan.method.divides_by_weights and any(w < 0 for w in plan.settings.weights):
        notes.append(
            f"{plan.method.name} divides by the sum of the agreeing entries' weights (mergekit's "
            "convention), so a negative weight does not negate an adapter here; use linear or dare-linear "
            "for task negation"
        )
    return notes


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


def _common_base(adapters: Sequence[Adapter], allow_mismatch: bool = False) -> str | None:
    known = [(a.base.rstrip("/"), a.source or f"adapter {i + 1}") for i, a in enumerate(adapters) if a.base]
    for base, source in known[1:]:
        if not same_base(base, known[0][0]) and not allow_mismatch:
            raise IncompatibleError(
                f"adapters for different bases: {known[0][1]} is for '{known[0][0]}' but {source} is for "
                f"'{base}'; if these name one model, pass --allow-base-mismatch"
            )
    return known[0][0] if known else None


def _common_flag(adapters: Sequence[Adapter], key: str) -> bool:
    values = {bool(a.metadata.get(key, False)) for a in adapters}
    if len(values) > 1:
        on = next(a.source for a in adapters if a.metadata.get(key))
        off = next(a.source for a in adapters if not a.metadata.get(key))
        raise IncompatibleError(f"{on} sets {key} but {off} does not: adapters for different model types")
    return values.pop()


def _common_shape(name: str, modules: Sequence[LoraModule | None], sources: Sequence[str]) -> tuple[int, int]:
    shapes = [((m.out_features, m.in_features), s) for m, s in zip(modules, sources) if m is not None]
    for shape, source in shapes[1:]:
        if shape != shapes[0][0]:
            first = list(shapes[0][0])
            raise IncompatibleError(
                f"module '{name}' is {first} (out, in) in {shapes[0][1]} but {list(shape)} in {source}: "
                "adapters for different bases"
            )
    return shapes[0][0]


def prepare(
    paths: Sequence[str | Path],
    method: str | Method,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    density: float | None = None,
    seed: int | None = None,
    into_base: str | Path | None = None,
    allow_base_mismatch: bool = False,
) -> MergePlan:
    """Load the adapters (and open the base for --into-base) and plan the merge; write nothing.

    kohya's underscore-mangled module names are matched to the base's module paths (to the other adapters'
    dotted paths without a base). With a base, every merged module must be a weight of it, of the right shape.
    """
    adapters = [load_adapter(path) for path in paths]
    base_model = None
    if into_base is not None:
        from lrtool.merge.into_base import open_base

        base_model = open_base(into_base)
        module_names = base_model.module_names
    else:  # without a base, the other adapters' dotted paths are the names to match
        module_names = sorted({name for a in adapters for name in a.modules if "." in name})
    adapters = [match_module_names(adapter, module_names) for adapter in adapters]
    plan = plan_merge(
        adapters,
        method,
        weights,
        rank,
        density,
        seed,
        into_base=base_model is not None,
        allow_base_mismatch=allow_base_mismatch,
    )
    # Also when no name is dotted (only kohya inputs, no base): the names would stay mangled.
    _check_names_matched(adapters, base_model.source if base_model is not None else None)
    if base_model is not None:
        from lrtool.merge.into_base import check_fits

        check_fits(plan, base_model)
        plan.base_model = base_model
    return plan


def _check_names_matched(adapters: Sequence[Adapter], base: str | None) -> None:
    """A kohya module name still underscore-mangled after matching would be written under a name no model
    has: refuse it rather than write an adapter peft cannot apply."""
    for adapter in adapters:
        if adapter.format != "kohya":
            continue
        unmatched = [name for name in adapter.modules if "." not in name]
        if unmatched:
            where = f"the base {base}" if base else "the other adapters (or pass --into-base BASE)"
            raise IncompatibleError(
                f"{adapter.source}: kohya module '{unmatched[0]}' matches no module path of {where}; "
                "kohya names can only be merged once matched to the model's module paths"
            )


def summary_lines(report: dict) -> list[str]:
    """A few lines for people (the CLI logs them to stderr): what was merged, how exact it is, notes."""
    result = report["summary"]
    parameters = ", ".join(f"{k} {v}" for k, v in report["parameters"].items() if v is not None)
    weights = ", ".join(f"{w:g}" for w in report["weights"])
    what = "adapter" if report["output"]["kind"] == "peft-adapter" else "model"
    lines = [
        f"merged {len(report['inputs'])} adapters into one {what} with {report['method']} "
        f"(weights {weights}{'; ' + parameters if parameters else ''}): {result['modules']} modules"
        + (f", rank up to {result['rank_max']}" if "rank_max" in result else ""),
        f"stored vs exact: relative error max {result['error_max']:.3g} ({result['error_max_module']}), "
        f"mean {result['error_mean']:.3g}; {result['exact_modules']} of {result['modules']} modules exact",
        f"distance from the linear sum: mean {result['from_linear_mean']:.3g}, "
        f"max {result['from_linear_max']:.3g}",
    ]
    return lines + [f"note: {note}" for note in report["notes"]]
