"""Fused dense merge (merge): one pass over a module's stacked updates computes a dense merge method's result,
optionally added into the base weight (--into-base), and the sums of squares the receipt needs.

Reads deltas [N, out, in] (dW_i = s_i B_i A_i, unweighted, zeros where adapter i lacks the module), one
weight per adapter, what each adapter keeps (`Keep`, decided before the pass) and optionally the base weight
[out, in] (any strides: a transposed view serves fan_in_fan_out bases). Writes the result [out, in] once:
the update (in the deltas' dtype) or, with a base, base + update cast to the base's dtype. With `sums`, also
returns float sums of squares [4]: ||update||^2, ||update - linear||^2, ||linear||^2 and ||result -
written||^2 (what the cast to the output's dtype lost), where linear = sum_i w_i dW_i and result is the
update, or base + update.

The methods, as lrtool/merge/ defines them (mergekit's conventions):

    linear            sum_i w_i dW_i
    magnitude-prune   sum_i w_i trim(dW_i)
    ties              disjoint mean of the w_i trim(dW_i) agreeing with the elected sign
    dare-linear       sum_i w_i drop(dW_i)
    dare-ties         disjoint mean of the w_i drop(dW_i) agreeing with the elected sign

trim keeps the int(D * numel) largest magnitudes of dW_i: a selection pass (`keep_rule`, torch, the same on
both paths) finds each adapter's threshold, the k-th largest magnitude, and the position of the last entry
equal to it that is kept (ties kept first in row-major order, as magnitude_prune.keep_largest does), so the
pass keeps |d| > threshold, or |d| == threshold at a position up to that one. drop keeps an entry where
counter_rng's bits for (the adapter's key, its row-major position) fall below round(D * 2^32) and divides it
by D: the same entries on every device and launch shape. The TIES sign is elected on the running sum of the
weighted values; the agreeing sums of each sign are kept apart in the same pass, so no input is read twice.

Kernel: a 1-D grid of blocks of BLOCK consecutive positions; each program reads its block of every delta
once (and of the base), keeps the per-entry sums in registers and writes its block of the result once, plus
one row of partial sums of squares when asked. float64 inputs are merged in float64, others in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrtool.kernels import counter_rng, dispatch

try:
    import triton
    import triton.language as tl

    from lrtool.kernels import _rng_triton
except ImportError:  # the CPU install: the reference only
    triton = None

TRIMS = ("magnitude-prune", "ties")
DROPS = ("dare-linear", "dare-ties")
ELECTS = ("ties", "dare-ties")
METHODS = ("linear", *TRIMS, *DROPS)


@dataclass(frozen=True)
class Keep:
    """What each adapter keeps in a merge, decided before the pass (`keep_rule`)."""

    method: str
    density: float
    thresholds: torch.Tensor | None = None  # [N], trimming methods: the k-th largest magnitude of dW_i
    last_tied: torch.Tensor | None = None  # [N] int64: the last position of an entry equal to it that is kept
    keys: torch.Tensor | None = None  # [N, 2] int32 bit patterns, DARE: each adapter's counter_rng key

    @property
    def trims(self) -> bool:
        return self.method in TRIMS

    @property
    def drops(self) -> bool:
        return self.method in DROPS

    @property
    def elects(self) -> bool:
        return self.method in ELECTS


def keep_rule(
    deltas: torch.Tensor, method: str, density: float = 1.0, keys: list[tuple[int, int]] | None = None
) -> Keep:
    """The selection pass: per adapter, its trimming threshold (trimming methods) or its key (DARE)."""
    if method not in METHODS:
        raise ValueError(f"dense_merge has no method {method!r} (it has {', '.join(METHODS)})")
    count, numel = deltas.shape[0], deltas[0].numel()
    if method in DROPS:
        if keys is None or len(keys) != count:
            raise ValueError("DARE needs one counter_rng key per adapter")
        words = [[counter_rng._signed(k0), counter_rng._signed(k1)] for k0, k1 in keys]
        return Keep(method, density, keys=torch.tensor(words, dtype=torch.int32, device=deltas.device))
    if method not in TRIMS:
        return Keep(method, density)
    kept = int(density * numel)
    thresholds = torch.empty(count, dtype=deltas.dtype, device=deltas.device)
    last_tied = torch.full((count,), -1, dtype=torch.int64, device=deltas.device)
    for i in range(count):
        if kept >= numel:
            thresholds[i] = float("-inf")  # everything is above it
            continue
        if kept == 0:
            thresholds[i] = float("inf")  # nothing is (inputs are finite)
            continue
        magnitude = deltas[i].reshape(-1).abs()
        threshold = torch.kthvalue(magnitude, numel - kept + 1).values
        above = int((magnitude > threshold).sum())
        tied = torch.nonzero(magnitude == threshold).squeeze(1)
        thresholds[i] = threshold
        last_tied[i] = tied[kept - above - 1]
    return Keep(method, density, thresholds=thresholds, last_tied=last_tied)


def dense_merge(
    deltas: torch.Tensor,
    weights,
    method: str,
    density: float = 1.0,
    keys: list[tuple[int, int]] | None = None,
    base: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    sums: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(result, sums of squares or None): the kernel on CUDA, the reference elsewhere (see dispatch).

    `out`, when given, receives the result (any strides, the base's dtype with a base); else it is new."""
    rule = keep_rule(deltas, method, density, keys)
    return dispatch.run("dense_merge", merge_triton, merge_reference, deltas, weights, rule, base, out, sums)


def _accumulator(deltas: torch.Tensor) -> torch.dtype:
    return torch.float64 if deltas.dtype == torch.float64 else torch.float32


def _output(deltas: torch.Tensor, base: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        out = torch.empty(
            deltas.shape[1:], dtype=deltas.dtype if base is None else base.dtype, device=deltas.device
        )
    if out.shape != deltas.shape[1:]:
        raise ValueError(f"out is {list(out.shape)}, the updates are {list(deltas.shape[1:])}")
    return out


# ---------------------------------------------------------------------------------------------------------
# The reference (torch)


def merge_reference(
    deltas: torch.Tensor,
    weights,
    rule: Keep,
    base: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    sums: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the kernel computes, with whole-tensor torch operations."""
    out = _output(deltas, base, out)
    accumulator = _accumulator(deltas)
    count, rows, columns = deltas.shape
    w = torch.as_tensor(weights, dtype=accumulator).to(deltas.device)
    position = torch.arange(rows * columns, device=deltas.device).reshape(rows, columns)
    weighted = []
    for i in range(count):
        delta = deltas[i].to(accumulator)
        if rule.trims:
            magnitude = delta.abs()
            threshold = rule.thresholds[i].to(accumulator)
            keep = (magnitude > threshold) | ((magnitude == threshold) & (position <= rule.last_tied[i]))
            delta = torch.where(keep, delta, 0.0)
        elif rule.drops:
            key = (int(rule.keys[i, 0]) & counter_rng.MASK, int(rule.keys[i, 1]) & counter_rng.MASK)
            keep = counter_rng.keep(key, 0, rows * columns, rule.density, deltas.device).reshape(
                rows, columns
            )
            delta = torch.where(keep, delta / rule.density, 0.0)
        weighted.append(w[i] * delta)
    if rule.elects:
        total = torch.zeros((rows, columns), dtype=accumulator, device=deltas.device)
        for value in weighted:
            total += value
        elected = total >= 0  # zero counts as positive
        agreeing = torch.zeros_like(total)
        divisor = torch.zeros_like(total)
        for i, value in enumerate(weighted):
            agrees = torch.where(elected, value > 0, value < 0)
            agreeing += torch.where(agrees, value, 0.0)
            divisor += torch.where(agrees, w[i], 0.0)
        update = agreeing / torch.where(divisor == 0, 1.0, divisor)
    else:
        update = torch.zeros((rows, columns), dtype=accumulator, device=deltas.device)
        for value in weighted:
            update += value
    result = update if base is None else base.to(accumulator) + update
    out.copy_(result)
    if not sums:
        return out, None
    linear = torch.zeros_like(update)
    for i in range(count):
        linear += w[i] * deltas[i].to(accumulator)
    lost = result - out.to(accumulator)
    squares = [
        update.square().sum(),
        (update - linear).square().sum(),
        linear.square().sum(),
        lost.square().sum(),
    ]
    return out, torch.stack(squares)


# ---------------------------------------------------------------------------------------------------------
# The kernel (Triton)

BLOCK = 1024  # positions per program
SUMS = 4  # partial sums of squares per program

if triton is not None:

    @triton.jit
    def _merge_kernel(
        deltas_ptr,  # [N, numel] contiguous
        weights_ptr,  # [N], the accumulator dtype
        density_ptr,  # [1], the accumulator dtype: DARE divides by it (a float argument would be float32)
        thresholds_ptr,  # [N]
        last_tied_ptr,  # [N] int64
        keys_ptr,  # [N, 2] int32
        base_ptr,
        out_ptr,
        sums_ptr,  # [programs, SUMS]
        count,
        numel,
        columns,
        keep_below,  # int64: counter_rng.keep_threshold(density)
        base_stride0,
        base_stride1,
        out_stride0,
        out_stride1,
        TRIM: tl.constexpr,
        DROP: tl.constexpr,
        ELECT: tl.constexpr,
        INTO_BASE: tl.constexpr,
        WITH_SUMS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        program = tl.program_id(0)
        position = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = position < numel
        acc_type = weights_ptr.dtype.element_ty
        update = tl.zeros([BLOCK], dtype=acc_type)  # the sum (linear, prune, dare-linear); ties: all values
        positive = tl.zeros([BLOCK], dtype=acc_type)  # ties: sums of the positive values and their weights
        positive_weight = tl.zeros([BLOCK], dtype=acc_type)
        negative = tl.zeros([BLOCK], dtype=acc_type)
        negative_weight = tl.zeros([BLOCK], dtype=acc_type)
        linear = tl.zeros([BLOCK], dtype=acc_type)
        density = tl.load(density_ptr)
        for i in range(count):
            delta = tl.load(deltas_ptr + i * numel + position, mask=inside, other=0.0).to(acc_type)
            weight = tl.load(weights_ptr + i)
            value = delta
            if TRIM:
                threshold = tl.load(thresholds_ptr + i).to(acc_type)
                magnitude = tl.abs(delta)
                keep = (magnitude > threshold) | (
                    (magnitude == threshold) & (position <= tl.load(last_tied_ptr + i))
                )
                value = tl.where(keep, delta, 0.0)
            if DROP:
                keep = _rng_triton.kept(
                    tl.load(keys_ptr + 2 * i), tl.load(keys_ptr + 2 * i + 1), position, keep_below
                )
                value = tl.where(keep, delta / density, 0.0)
            weighted = weight * value
            update += weighted
            if ELECT:
                positive += tl.where(weighted > 0, weighted, 0.0)
                positive_weight += tl.where(weighted > 0, weight, 0.0)
                negative += tl.where(weighted < 0, weighted, 0.0)
                negative_weight += tl.where(weighted < 0, weight, 0.0)
            if WITH_SUMS:
                linear += weight * delta
        if ELECT:
            positive_weight = tl.where(positive_weight == 0, 1.0, positive_weight)
            negative_weight = tl.where(negative_weight == 0, 1.0, negative_weight)
            update = tl.where(update >= 0, positive / positive_weight, negative / negative_weight)
        row = position // columns
        column = position % columns
        result = update
        if INTO_BASE:
            base = tl.load(base_ptr + row * base_stride0 + column * base_stride1, mask=inside, other=0.0)
            result = base.to(acc_type) + update
        out_type = out_ptr.dtype.element_ty
        if out_type == tl.float64:
            written = result.to(out_type)
        else:  # as torch casts float64: through float32 (the same bits; float64 -> bfloat16 directly differs)
            written = result.to(tl.float32).to(out_type)
        tl.store(out_ptr + row * out_stride0 + column * out_stride1, written, mask=inside)
        lost = result - written.to(acc_type)  # what the cast lost (the receipt's error, into a base)
        if WITH_SUMS:
            sums = sums_ptr + program * 4
            tl.store(sums, tl.sum(update * update))
            tl.store(sums + 1, tl.sum((update - linear) * (update - linear)))
            tl.store(sums + 2, tl.sum(linear * linear))
            tl.store(sums + 3, tl.sum(lost * lost))


def merge_triton(
    deltas: torch.Tensor,
    weights,
    rule: Keep,
    base: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    sums: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel: one launch, every input read once, the result written once."""
    out = _output(deltas, base, out)
    accumulator = _accumulator(deltas)
    deltas = deltas.contiguous()
    count, rows, columns = deltas.shape
    numel = rows * columns
    device = deltas.device
    w = torch.as_tensor(weights, dtype=accumulator).to(device)
    density = torch.tensor([rule.density], dtype=accumulator, device=device)
    placeholder = torch.zeros(1, dtype=torch.int64, device=device)  # for pointers a method does not read
    programs = triton.cdiv(numel, BLOCK)
    partial = torch.empty(programs if sums else 1, SUMS, dtype=accumulator, device=device)
    base_view = base if base is not None else out
    _merge_kernel[(programs,)](
        deltas,
        w,
        density,
        rule.thresholds if rule.trims else w,
        rule.last_tied if rule.trims else placeholder,
        rule.keys if rule.drops else placeholder,
        base_view,
        out,
        partial,
        count,
        numel,
        columns,
        counter_rng.keep_threshold(rule.density),
        base_view.stride(0),
        base_view.stride(1),
        out.stride(0),
        out.stride(1),
        TRIM=rule.trims,
        DROP=rule.drops,
        ELECT=rule.elects,
        INTO_BASE=base is not None,
        WITH_SUMS=sums,
        BLOCK=BLOCK,
    )
    return out, partial.sum(dim=0, dtype=torch.float64) if sums else None
