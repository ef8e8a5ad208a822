"""One base model in memory, many LoRA adapters applied per row or per token of a batch.

Reads nothing from disk: takes a loaded model and canonical `Adapter`s (lrtool.adapters). It hooks every
target linear layer so that its output becomes

    y = W x + sum_k g_k * scale_k * B_k (A_k x)

where g gives each row of the batch one adapter (systems: adapters, merges) or each token a weighted set of
adapters (routers). What applies to which rows is a `Plan` set for the next forward passes with
`engine.routing(plan)`: a list of row segments, each handled by a `Part` (one adapter, or a router that
returns top-k adapter indices and weights per token, or its own computation). Without a plan the model is
the base. No peft in the hot path and no copy of the base per adapter.

The CPU path (also the reference the kernels issue accelerates) computes each segment's rows with two small
matmuls per adapter: rows sorted by adapter make each segment a contiguous view, so nothing is gathered.
When every segment holds one adapter (or none) and all have as many rows, as eval's batches of several
systems do, the factors stacked per module (ranks zero-padded) serve all segments in two batched matmuls.
Per-token routing sorts the (token, slot) pairs by adapter and computes only the adapters chosen, so its cost
grows with top-k, not with the number of adapters.

Where kernels run (CUDA; lrtool.kernels.dispatch), the hooks hand the same work to the multi-adapter kernels
of lrtool.kernels.lora_apply instead: all rows of single adapters in one shrink and one expand launch per
layer, each router's rows in one shrink and k expand launches, on the same stacked factors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lrtool.adapters import Adapter, all_finite
from lrtool.errors import IncompatibleError
from lrtool.kernels import dispatch


@dataclass(eq=False)
class Factors:
    """One adapter's factors for one module, laid out for x @ A_t @ B_t (the scale folded into B_t)."""

    A_t: torch.Tensor  # [in, r]
    B_t: torch.Tensor  # [r, out], already multiplied by the adapter's scale

    def add_to(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """y += weight * (x @ A_t @ B_t) for 2-D x [n, in], y [n, out] (y may be a view into the output)."""
        h = x @ self.A_t
        if weight is not None:
            h = h * weight[:, None]  # [n, r]: scaling the narrow intermediate is cheaper than the output
        y.addmm_(h, self.B_t)


class Part:
    """What a segment of rows does: its `apply` adds the adapters' contribution to y for x."""

    def apply(self, engine: AdapterEngine, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        raise NotImplementedError

    def select(self, rows: torch.Tensor) -> Part:
        """The part for a subset of its rows (indices relative to the segment), e.g. when rows finish."""
        return self


@dataclass(eq=False)
class OneAdapter(Part):
    """Every token of the segment's rows gets adapter `index` with weight 1."""

    index: int

    def apply(self, engine, module, x, y):
        factors = engine.factors[module][self.index]
        if factors is not None:
            factors.add_to(x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1]))


class TokenRouter(Part):
    """A per-token router: `weights(module, x)` -> (indices [n, k], weights [n, k]) for x [n, in].

    Subclasses (lrtool.routers) decide the adapters and weights; the engine computes only the adapters that
    some token chose. An index of -1 means "no adapter" for that slot. A subclass that combines the chosen
    adapters otherwise than by summing their weighted outputs overrides `apply`; the kernels' path (which sums
    outputs) then hands its rows to that `apply` (`mixes_outputs`).
    """

    @property
    def mixes_outputs(self) -> bool:
        """Whether this router sums its chosen adapters' weighted outputs: it keeps TokenRouter's apply."""
        return type(self).apply is TokenRouter.apply

    def weights(self, module: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def apply(self, engine, module, x, y):
        flat_x = x.reshape(-1, x.shape[-1])
        indices, weights = self.weights(module, flat_x)
        engine.add_top_k(module, flat_x, y.view(-1, y.shape[-1]), indices, weights)


@dataclass(frozen=True)
class Segment:
    start: int
    stop: int
    part: Part | None  # None: the base alone


@dataclass
class Plan:
    """Which rows of the next batches use what: segments in row order, covering `batch_size` rows."""

    segments: tuple[Segment, ...]
    batch_size: int

    @classmethod
    def by_row(cls, parts: Sequence[Part | None]) -> Plan:
        """One part per row (the same object on consecutive rows becomes one segment)."""
        segments, start = [], 0
        for row in range(1, len(parts) + 1):
            if row == len(parts) or parts[row] is not parts[start]:
                segments.append(Segment(start, row, parts[start]))
                start = row
        return cls(tuple(segments), len(parts))

    def stacked_slots(self, none_slot: int) -> list[int] | None:
        """When every segment is one adapter (or the base, as slot `none_slot`) and all have the same number
        of rows: each segment's adapter slot, so one batched matmul can serve them all; else None."""
        sizes = {segment.stop - segment.start for segment in self.segments}
        if len(self.segments) < 2 or len(sizes) != 1:
            return None
        slots = []
        for segment in self.segments:
            if segment.part is None:
                slots.append(none_slot)
            elif isinstance(segment.part, OneAdapter):
                slots.append(segment.part.index)
            else:
                return None
        return slots

    def select(self, rows: Sequence[int]) -> Plan:
        """The plan for the kept rows (in increasing order), as when finished rows leave a generation."""
        kept, segments, start = list(rows), [], 0
        for segment in self.segments:
            mine = [r - segment.start for r in kept if segment.start <= r < segment.stop]
            if not mine:
                continue
            part = segment.part
            if part is not None and len(mine) < segment.stop - segment.start:
                part = part.select(torch.tensor(mine))
            segments.append(Segment(start, start + len(mine), part))
            start += len(mine)
        return Plan(tuple(segments), len(kept))


def linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear layer: torch's Linear, or transformers' Conv1D (GPT-2), which
    stores its weight as [in, out]. None for any other module."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return tuple(module.weight.shape)
    return None


class AdapterEngine:
    """Hooks `adapters` into `model`'s target layers; `routing(plan)` says which rows use which.

    Factors are held in the model's dtype on its device. Raises IncompatibleError when an adapter names a
    module the model lacks, one that is not a linear layer, or one whose shape differs.
    """

    def __init__(self, model: torch.nn.Module, adapters: Sequence[Adapter]):
        self.model = model
        self.adapters = list(adapters)
        modules = dict(model.named_modules())
        parameter = next(model.parameters())
        count = len(self.adapters)
        for index, adapter in enumerate(self.adapters):
            for name, lora in adapter.modules.items():
                shape = linear_shape(modules[name]) if name in modules else None
                where = adapter.source or f"adapter {index + 1}"
                if lora.kernel is not None:  # a conv layer's LoRA (a diffusion model's), not an LM's
                    kernel = "x".join(map(str, lora.kernel))
                    raise IncompatibleError(
                        f"{where}: module '{name}' is a conv layer's LoRA (kernel {kernel}); eval applies "
                        "LoRA to the linear layers of causal language models"
                    )
                if name not in modules:
                    raise IncompatibleError(f"{where}: module '{name}' is not in the base model")
                if shape is None:
                    raise IncompatibleError(
                        f"{where}: module '{name}' is a {type(modules[name]).__name__} in the base, "
                        "not a linear layer"
                    )
                if (lora.in_features, lora.out_features) != shape:
                    raise IncompatibleError(
                        f"{where}: module '{name}' maps {lora.in_features} -> {lora.out_features} features "
                        f"but the base's layer maps {shape[0]} -> {shape[1]}: an adapter for another model"
                    )
        # Per module, every adapter's factors stacked along a first axis, ranks zero-padded to the largest,
        # plus a last all-zero slot for rows without an adapter: [adapters + 1, in, r] and [.., r, out].
        # Each adapter's own Factors are views into the stacks.
        self.stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.factors: dict[str, list[Factors | None]] = {}
        for name in sorted({name for adapter in self.adapters for name in adapter.modules}):
            loras = [adapter.modules.get(name) for adapter in self.adapters]
            present = [lora for lora in loras if lora is not None]
            rank = max(lora.rank for lora in present)
            A_all = torch.zeros(count + 1, present[0].in_features, rank, dtype=parameter.dtype)
            B_all = torch.zeros(count + 1, rank, present[0].out_features, dtype=parameter.dtype)
            for index, lora in enumerate(loras):
                if lora is not None:
                    A_all[index, :, : lora.rank] = lora.A.T.to(parameter.dtype)
                    B_all[index, : lora.rank] = (lora.B.double() * lora.scale).T.to(parameter.dtype)
                    if not (all_finite(A_all[index]) and all_finite(B_all[index])):
                        raise IncompatibleError(
                            f"{self.adapters[index].source or 'an adapter'}: module '{name}' overflows "
                            f"{parameter.dtype} once scaled (a huge lora_alpha?); it cannot be applied"
                        )
            A_all, B_all = A_all.to(parameter.device), B_all.to(parameter.device)
            self.stacks[name] = (A_all, B_all)
            self.factors[name] = [
                None if lora is None else Factors(A_all[i, :, : lora.rank], B_all[i, : lora.rank])
                for i, lora in enumerate(loras)
            ]
        self._plan: Plan | None = None
        self._slots: torch.Tensor | slice | None = None
        self._kernel_rows: tuple[torch.Tensor, dict] | None = None  # the kernels' path (_rows_for_kernels)
        self._hooks = [modules[name].register_forward_hook(self._hook(name)) for name in sorted(self.factors)]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            plan = self._plan
            if plan is None:
                return None
            x = inputs[0]
            if x.shape[0] != plan.batch_size:
                raise RuntimeError(
                    f"{name}: the plan is for {plan.batch_size} rows but the layer sees {x.shape[0]}"
                )
            if not output.is_contiguous():
                output = output.contiguous()
            if dispatch.wanted(x):  # CUDA: the multi-adapter kernels (lrtool.kernels.lora_apply)
                self._apply_kernels(name, plan, x, output)
                return output
            if self._slots is not None:  # equal segments of single adapters: one batched matmul for all
                A_all, B_all = self.stacks[name]
                segments = len(plan.segments)
                rows = x.reshape(segments, -1, x.shape[-1])
                output.view(segments, -1, output.shape[-1]).baddbmm_(
                    torch.bmm(rows, A_all[self._slots]), B_all[self._slots]
                )
                return output
            for segment in plan.segments:
                if segment.part is not None:
                    segment.part.apply(
                        self, name, x[segment.start : segment.stop], output[segment.start : segment.stop]
                    )
            return output

        return hook

    def _apply_kernels(self, name: str, plan: Plan, x: torch.Tensor, y: torch.Tensor) -> None:
        """The kernels' path: every row of a single adapter in one lora_apply call (k = 1), each router's
        rows in one more (its top-k); any other part computes itself."""
        from lrtool.kernels.lora_apply import TokenMap, lora_apply

        A_all, B_all = self.stacks[name]
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        per_row = flat_x.shape[0] // plan.batch_size
        if self._kernel_rows is not None:
            # One token map per plan and row length, shared by every layer (an adapter lacking this module
            # has a zero slot: its rows cost a padded rank's work here rather than a map per module).
            rows, maps = self._kernel_rows
            if per_row not in maps:
                maps[per_row] = TokenMap.build(rows.repeat_interleave(per_row)[:, None], A_all.shape[0])
            lora_apply(flat_x, flat_y, A_all, B_all, maps[per_row])
        for segment in plan.segments:
            rows = slice(segment.start * per_row, segment.stop * per_row)
            if isinstance(segment.part, TokenRouter) and segment.part.mixes_outputs:
                indices, weights = segment.part.weights(name, flat_x[rows])
                lora_apply(flat_x[rows], flat_y[rows], A_all, B_all, indices, weights)
            elif segment.part is not None and not isinstance(segment.part, OneAdapter):
                segment.part.apply(
                    self, name, x[segment.start : segment.stop], y[segment.start : segment.stop]
                )

    @contextlib.contextmanager
    def routing(self, plan: Plan | None) -> Iterator[None]:
        """Apply `plan` to the forward passes inside the block (None: the base alone)."""
        previous = self._plan, self._slots, self._kernel_rows
        self._plan, self._slots, self._kernel_rows = (
            plan,
            self._stacked_slots(plan),
            self._rows_for_kernels(plan),
        )
        try:
            yield
        finally:
            self._plan, self._slots, self._kernel_rows = previous

    def _rows_for_kernels(self, plan: Plan | None) -> tuple[torch.Tensor, dict] | None:
        """For the kernels' path: each row's adapter index (-1 for rows of the base or of other parts) and
        an empty cache of token maps; None when no row has a single adapter or kernels do not run on the
        factors' device."""
        if plan is None or not self.stacks or not any(isinstance(s.part, OneAdapter) for s in plan.segments):
            return None
        device = next(iter(self.stacks.values()))[0].device
        if not dispatch.wanted(device):
            return None
        rows = [-1] * plan.batch_size
        for segment in plan.segments:
            if isinstance(segment.part, OneAdapter):
                rows[segment.start : segment.stop] = [segment.part.index] * (segment.stop - segment.start)
        return torch.tensor(rows, device=device), {}

    def _stacked_slots(self, plan: Plan | None) -> torch.Tensor | slice | None:
        """How the stacks are indexed for `plan`'s batched path: a slice when its adapters are consecutive
        (a view, nothing copied), else an index tensor; None when the plan needs the per-segment path."""
        slots = plan.stacked_slots(len(self.adapters)) if plan is not None and self.stacks else None
        if slots is None:
            return None
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return slice(slots[0], slots[0] + len(slots))
        device = next(iter(self.stacks.values()))[0].device
        return torch.tensor(slots, device=device)

    def add_top_k(
        self, module: str, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
    ) -> None:
        """y[t] += sum_j weights[t, j] * delta_{indices[t, j]}(x[t]) for x [n, in], indices/weights [n, k].

        The (token, slot) pairs are sorted by adapter (a stable sort, then counts and starts, as vLLM's
        LoRA kernels arrange them); each chosen adapter computes only its own tokens. When the groups are
        about even (routers spread tokens), they are laid out in one zero-padded block per adapter and
        computed in two batched matmuls, a constant number of operations whatever the number of adapters;
        otherwise one pair of small matmuls per chosen adapter.
        """
        A_all, B_all = self.stacks[module]
        none = A_all.shape[0] - 1  # the all-zero slot: "no adapter"
        flat = indices.reshape(-1)
        flat = torch.where(flat < 0, torch.full_like(flat, none), flat)
        order = torch.argsort(flat, stable=True)
        grouped = flat[order]
        counts = torch.bincount(grouped, minlength=none + 1)
        tokens = order // indices.shape[1]
        pair_weights = weights.reshape(-1)[order].to(x.dtype)
        widest = int(counts.max())
        if widest * (none + 1) <= 2 * len(flat):  # little padding: one batched pass for every adapter
            starts = torch.cumsum(counts, 0) - counts
            cells = grouped * widest + (torch.arange(len(grouped), device=x.device) - starts[grouped])
            rows = torch.zeros((none + 1) * widest, x.shape[1], dtype=x.dtype, device=x.device)
            rows[cells] = x[tokens]
            out = torch.bmm(torch.bmm(rows.view(none + 1, widest, -1), A_all), B_all)
            y.index_add_(0, tokens, out.view(-1, y.shape[1])[cells] * pair_weights[:, None])
            return
        slots, start = self.factors[module], 0
        for adapter, count in enumerate(counts.tolist()):
            pairs = slice(start, start + count)
            start += count
            if count == 0 or adapter == none or slots[adapter] is None:
                continue
            contribution = torch.zeros(count, y.shape[1], dtype=y.dtype, device=y.device)
            slots[adapter].add_to(x[tokens[pairs]], contribution, pair_weights[pairs])
            y.index_add_(0, tokens[pairs], contribution)

    def close(self) -> None:
        """Remove the hooks: the model is the base again."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
