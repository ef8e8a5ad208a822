"""A merge planned, then computed and stored one module at a time.

Planning does every check and computes nothing: the adapters belong together (one base, one layer type,
equal shapes per module, what the method itself requires), the weights and parameters are valid, and the
modules are lined up by name (kohya's mangled names matched to the base's or the other adapters' paths).

    plan = plan_merge(adapters, "ties", weights=[0.5, 0.5], density=0.3)
    plan.exact("model.layers.0.self_attn.q_proj")   # the method's result for one module (float64)
    result = plan.to_adapter()                       # the stored LoRA and its receipt (receipt.py)

Storage as a LoRA, always with scale 1 (B carries weights and scales, so peft applies exactly B @ A;
`save_adapter` never writes use_rslora): a factored result is stored as it is, or as its best rank-K
approximation when the method's `rank` parameter is a storage rank and --rank K is given; a dense result is
stored as its truncated SVD at rank K (default: the largest rank any input has for that module), which is
exact once K >= min(out, in). A truncated SVD is stored balanced (base.balanced), so neither factor
overflows a float16 that holds the inputs. Factors are stored in the inputs' common dtype, float32 when they
differ or are narrower than 16 bits (float8); integer (quantised) factors are refused. A stored factor that
does not fit its dtype is refused (InputError), never written as inf.

Reads nothing itself (the adapters come loaded); MergeResult.save writes the adapter and its receipt.
--into-base (into_base.py) writes a model from the same plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lrtool.adapters import (
    Adapter,
    LoraModule,
    all_finite,
    check_computable,
    match_module_names,
    same_base,
    save_as,
)
from lrtool.errors import IncompatibleError, InputError, UsageError
from lrtool.merge import fused, get, receipt
from lrtool.merge.base import (
    Method,
    ModuleInputs,
    Settings,
    Update,
    check_weights,
    overflow_message,
    relative,
)
from lrtool.model_files import ModelFiles


@dataclass
class MergeResult:
    """A merge stored as a LoRA: the adapter to save, and the receipt (merge_report.json's content)."""

    adapter: Adapter
    report: dict

    def save(self, directory: str | Path, format: str = "peft") -> None:
        """Write the adapter in `format` (a PEFT directory by default) and merge_report.json into
        `directory` (atomicity is the caller's)."""
        save_as(self.adapter, Path(directory), format)
        receipt.write(self.report, directory)


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
    notes: list[str] = field(default_factory=list)

    def exact(self, name: str) -> Update:
        """The method's exact result for module `name`, in float64 (by the fused kernel where kernels run:
        lrtool/merge/fused.py)."""
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
        norm, lost = exact.norm_and_distance(B, A)
        row = {
            "rank": B.shape[1],
            "error": relative(lost, norm),
            "from_linear": self.from_linear(inputs, exact),
            "norm": norm,
            "truncated": rank is not None and rank < min(inputs.shape),
        }
        kernel = next(m.kernel for m in inputs.modules if m is not None)  # plan_merge checked they agree
        return LoraModule(A=A, B=B, scale=1.0, kernel=kernel), row

    def from_linear(self, inputs: ModuleInputs, exact: Update) -> float:
        """||exact - linear||_F / ||linear||_F: how far the method's result is from sum_i w_i dW_i (as the
        method gives it, where it knows it: svd's spectrum)."""
        if exact.from_linear is not None:
            return exact.from_linear
        linear = Update.factored(*inputs.linear())
        if exact.is_factored:
            if exact.B is linear.B and exact.A is linear.A:
                return 0.0  # the linear method itself: the distance would be 0 too, after a Gram product
            if torch.equal(exact.B, linear.B) and torch.equal(exact.A, linear.A):
                return 0.0
            return relative(linear.distance(exact.B, exact.A), linear.norm())
        return relative(exact.distance(linear.B, linear.A), linear.norm())

    def to_adapter(self) -> MergeResult:
        """Compute every module and store the merge as a LoRA adapter (in memory), with its receipt."""
        modules, rows = {}, {}
        with receipt.hashing_in_background(self.adapters) as hashes:
            for name in self.inputs:
                modules[name], rows[name] = self.store(name)
            report = receipt.build(self, rows, hashes=hashes())
        adapter = Adapter(modules=modules, base=self.base, format="peft", metadata=dict(self.metadata))
        return MergeResult(adapter=adapter, report=report)


def plan_merge(
    adapters: Sequence[Adapter],
    method: str | Method,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    density: float | None = None,
    seed: int | None = None,
    into_base: bool = False,
    allow_base_mismatch: bool = False,
    **parameters,
) -> MergePlan:
    """Check that `adapters` can be merged with `method` and line them up by module; compute nothing.
    `parameters`: the method's other parameters by their Settings names (epsilon=, lambda_=, gamma=, t=).

    Raises UsageError (bad weights or parameters, a count of adapters the method does not take), InputError
    (non-finite values) or IncompatibleError (different bases, unless `allow_base_mismatch`; shapes or
    fan_in_fan_out; what the method itself refuses, e.g. unequal ranks).
    """
    if isinstance(method, str):
        method = get(method)
    adapters = list(adapters)
    if method.adapters is not None and len(adapters) != method.adapters:
        raise UsageError(f"{method.name} merges exactly {method.adapters} adapters, got {len(adapters)}")
    if method.fixed_weights is not None and weights is not None:
        raise UsageError(f"{method.name} takes no --weights: its parameters set the mix (see --list)")
    weights = check_weights(weights, len(adapters))
    settings = method.settings(weights, rank=rank, density=density, seed=seed, **parameters)
    if method.fixed_weights is not None:
        settings = replace(settings, weights=method.fixed_weights(settings))
        weights = settings.weights
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
    # peft's task_type says what the model is: a causal LM for LM adapters, none for a diffusers model's
    language_models = all(a.format in ("peft", "torchtune", "mlx") for a in adapters)
    plan = MergePlan(
        method=method,
        settings=settings,
        adapters=adapters,
        inputs=inputs,
        dtype=dtype,
        base=base,
        metadata={
            "fan_in_fan_out": fan_in_fan_out,
            "task_type": task_types[0] if task_types else "CAUSAL_LM" if language_models else None,
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
    # The weights' shapes: a conv layer's [out, in, *kernel] differs from a linear layer's [out, in].
    shapes = [(m.weight_shape, s) for m, s in zip(modules, sources) if m is not None]
    for shape, source in shapes[1:]:
        if shape != shapes[0][0]:
            first = list(shapes[0][0])
            label = "(out, in)" if len(first) == 2 else "(out, in, *kernel)"
            raise IncompatibleError(
                f"module '{name}' is {first} {label} in {shapes[0][1]} but {list(shape)} in {source}: "
                "adapters for different bases"
            )
    first = next(m for m in modules if m is not None)
    return (first.out_features, first.in_features)


def match_names(adapters: Sequence[Adapter], base: ModelFiles | None) -> list[Adapter]:
    """The adapters with kohya's underscore-mangled module names matched to the base's module paths (to the
    other adapters' dotted paths without a base)."""
    if base is not None:
        module_names = base.module_names
    else:  # without a base, the other adapters' dotted paths are the names to match
        module_names = sorted({name for a in adapters for name in a.modules if "." in name})
    return [match_module_names(adapter, module_names) for adapter in adapters]


def check_names_matched(adapters: Sequence[Adapter], base: ModelFiles | None, format: str = "peft") -> None:
    """A kohya module name still underscore-mangled after matching would be written under a name no model
    has: refuse it rather than write an adapter peft cannot apply. Written as kohya (`format`), kohya names
    are what the file should hold: two kohya files merge by their names."""
    if format == "kohya" and base is None:
        return
    for adapter in adapters:
        if adapter.format != "kohya":
            continue
        unmatched = [name for name in adapter.modules if "." not in name]
        if unmatched:
            where = (
                f"the base {base.source}"
                if base is not None
                else "the other adapters (or pass --into-base BASE, or --format kohya)"
            )
            raise IncompatibleError(
                f"{adapter.source}: kohya module '{unmatched[0]}' matches no module path of {where}; "
                "kohya names can only be merged into another format once matched to the model's module paths"
            )
