"""Multi-adapter LoRA apply (eval, route): each token gets its own adapters, in one batch.

    y[t] += sum_j weights[t, j] * (x[t] @ A_all[e]) @ B_all[e],   e = indices[t, j]

Reads x [n, in], the stacked factors A_all [E, in, r] and B_all [E, r, out] as AdapterEngine holds them
(ranks zero-padded to the largest r, each adapter's scale already folded into B), indices [n, k] (the
adapter of token t in slot j; -1: none) and weights [n, k] (None: 1 each). Adds into y [n, out] in place;
rows with no adapter are not written.

One adapter per row (eval's systems) is k = 1 with weights None; a router's top-k mix is k > 1.

Kernel: per slot j, the tokens are sorted by adapter (a stable argsort of indices[:, j]), with each adapter's
count and start (`TokenMap`: scatter-add and cumulative sum, the layout of vLLM's LoRAKernelMeta, built with
no host sync, once per batch when layers share it). Then two kinds of launch:
- shrink, one launch for all slots: grid (token blocks x rank blocks, E, k); program (m, e, j) gathers the
  m-th block of the tokens of slot j that use adapter e and writes h[j, t] = weights[t, j] * x[t] @ A_all[e]
  (float32) for them only; a program past its adapter's count returns at once.
- expand, one launch per slot: grid (token blocks x out blocks, E); y[t] += h[j, t] @ B_all[e]. Slots get
  launches of their own so that two slots of one token never add into y at once (no atomics, and the sum is
  deterministic). k = 1 is thus two launches per layer; top-k is 1 + k launches, and computes only the
  adapters some token chose, never all E for every token.
Padding costs: an adapter of rank r_e computes as rank r (the zeros multiply too), r / r_e times its own
FLOPs and factor reads in both launches; with ranks 8 and 64 mixed, the rank-8 tokens cost 8x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrtool.kernels import dispatch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: the reference only
    triton = None


@dataclass(frozen=True)
class TokenMap:
    """Which adapters each token uses, with the tokens sorted by adapter for the kernels (vLLM's
    LoRAKernelMeta): built once per batch and reused by every layer that routes the same way.

    order [k, n]: per slot, the token indices sorted by adapter (stable; tokens without one, -1, first);
    counts, starts [k, E]: how many tokens of slot j use adapter e and where they start in order[j]. Built
    with scatter-add and a cumulative sum, no host sync: the kernels' grids do not depend on the counts."""

    indices: torch.Tensor  # [n, k]
    order: torch.Tensor
    counts: torch.Tensor
    starts: torch.Tensor

    @classmethod
    def build(cls, indices: torch.Tensor, adapters: int) -> TokenMap:
        """The map of indices [n, k] (values in -1 .. adapters - 1)."""
        slots = indices.T.to(torch.int64)  # [k, n]
        order = torch.argsort(slots, dim=1, stable=True)
        counts = torch.zeros(slots.shape[0], adapters + 1, dtype=torch.int64, device=indices.device)
        counts.scatter_add_(1, slots + 1, torch.ones_like(slots))  # column 0: no adapter
        starts = torch.cumsum(counts, dim=1) - counts
        return cls(indices, order.contiguous(), counts[:, 1:].contiguous(), starts[:, 1:].contiguous())

    @property
    def shape(self) -> torch.Size:
        return self.indices.shape


def lora_apply(
    x: torch.Tensor,
    y: torch.Tensor,
    A_all: torch.Tensor,
    B_all: torch.Tensor,
    indices: torch.Tensor | TokenMap,
    weights: torch.Tensor | None = None,
) -> None:
    """y += the chosen adapters' contributions (see the module's docstring): the kernel on CUDA. `indices`
    may be a TokenMap already built for A_all.shape[0] adapters (e.g. shared by all layers of a forward)."""
    dispatch.run("lora_apply", apply_triton, apply_reference, x, y, A_all, B_all, indices, weights)


def _check(x, y, A_all, B_all, indices, weights) -> None:
    n, k = indices.shape
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != n or y.shape[0] != n:
        raise ValueError(f"x {list(x.shape)}, y {list(y.shape)} and indices {list(indices.shape)} disagree")
    if A_all.shape[1] != x.shape[1] or B_all.shape[2] != y.shape[1] or A_all.shape[2] != B_all.shape[1]:
        raise ValueError(f"A_all {list(A_all.shape)} and B_all {list(B_all.shape)} do not map x to y")
    if weights is not None and weights.shape != indices.shape:
        raise ValueError(f"weights {list(weights.shape)} and indices {list(indices.shape)} differ")
    if isinstance(indices, TokenMap) and indices.counts.shape[1] != A_all.shape[0]:
        raise ValueError(
            f"the token map is for {indices.counts.shape[1]} adapters, A_all has {A_all.shape[0]}"
        )


# ---------------------------------------------------------------------------------------------------------
# The reference (torch)


def apply_reference(x, y, A_all, B_all, indices, weights=None) -> None:
    """Per slot, each chosen adapter's tokens in two small matmuls (the engine's add_top_k, on stacks)."""
    _check(x, y, A_all, B_all, indices, weights)
    if isinstance(indices, TokenMap):
        indices = indices.indices
    for j in range(indices.shape[1]):
        column = indices[:, j]
        order = torch.argsort(column, stable=True)
        chosen, counts = torch.unique_consecutive(column[order], return_counts=True)
        start = 0
        for adapter, count in zip(chosen.tolist(), counts.tolist()):
            tokens = order[start : start + count]
            start += count
            if adapter < 0:
                continue
            h = x[tokens] @ A_all[adapter]
            if weights is not None:
                h = h * weights[tokens, j, None].to(h.dtype)
            y.index_add_(0, tokens, h @ B_all[adapter])


# ---------------------------------------------------------------------------------------------------------
# The kernel (Triton)


if triton is not None:

    @triton.jit
    def _program(order_ptr, counts_ptr, starts_ptr, slot, adapters, tokens, size, BLOCK_T, BLOCK):
        """This program's adapter (axis 1), its block along `size` (axis 0 mod the blocks), how many tokens
        chose the adapter in `slot`, and the block of BLOCK_T of them (axis 0 div) with which are real."""
        blocks = tl.cdiv(size, BLOCK)
        block_t = tl.program_id(0) // blocks
        adapter = tl.program_id(1)
        count = tl.load(counts_ptr + slot * adapters + adapter)
        start = tl.load(starts_ptr + slot * adapters + adapter)
        offsets = block_t * BLOCK_T + tl.arange(0, BLOCK_T)
        mine = offsets < count
        token = tl.load(order_ptr + slot * tokens + start + offsets, mask=mine, other=0)
        return adapter, tl.program_id(0) % blocks, block_t * BLOCK_T < count, token, mine

    @triton.jit
    def _shrink_kernel(
        x_ptr,
        a_ptr,
        h_ptr,
        weights_ptr,
        order_ptr,
        counts_ptr,
        starts_ptr,
        tokens,
        features,
        rank,
        adapters,
        x_stride_t,
        x_stride_d,
        a_stride_e,
        a_stride_d,
        a_stride_r,
        h_stride_j,
        h_stride_t,
        weights_stride_t,
        weights_stride_j,
        WEIGHTED: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        slot = tl.program_id(2)
        adapter, block_r, active, token, mine = _program(
            order_ptr, counts_ptr, starts_ptr, slot, adapters, tokens, rank, BLOCK_T, BLOCK_R
        )
        if active == 0:
            return
        r = block_r * BLOCK_R + tl.arange(0, BLOCK_R)
        h = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        a_base = a_ptr + adapter.to(tl.int64) * a_stride_e
        for d0 in range(0, features, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(
                x_ptr + token[:, None] * x_stride_t + d[None, :] * x_stride_d,
                mask=mine[:, None] & (d[None, :] < features),
                other=0.0,
            )
            a = tl.load(
                a_base + d[:, None] * a_stride_d + r[None, :] * a_stride_r,
                mask=(d[:, None] < features) & (r[None, :] < rank),
                other=0.0,
            )
            h += tl.dot(x, a, input_precision=PRECISION)
        if WEIGHTED:
            weight = tl.load(
                weights_ptr + token * weights_stride_t + slot * weights_stride_j, mask=mine, other=0.0
            )
            h = h * weight.to(tl.float32)[:, None]
        tl.store(
            h_ptr + slot * h_stride_j + token[:, None] * h_stride_t + r[None, :],
            h,
            mask=mine[:, None] & (r[None, :] < rank),
        )

    @triton.jit(do_not_specialize=["slot"])
    def _expand_kernel(
        h_ptr,
        b_ptr,
        y_ptr,
        order_ptr,
        counts_ptr,
        starts_ptr,
        slot,
        tokens,
        out_features,
        rank,
        adapters,
        h_stride_j,
        h_stride_t,
        b_stride_e,
        b_stride_r,
        b_stride_o,
        y_stride_t,
        y_stride_o,
        PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_O: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        adapter, block_o, active, token, mine = _program(
            order_ptr, counts_ptr, starts_ptr, slot, adapters, tokens, out_features, BLOCK_T, BLOCK_O
        )
        if active == 0:
            return
        o = block_o * BLOCK_O + tl.arange(0, BLOCK_O)
        b_base = b_ptr + adapter.to(tl.int64) * b_stride_e
        acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            h = tl.load(
                h_ptr + slot * h_stride_j + token[:, None] * h_stride_t + r[None, :],
                mask=mine[:, None] & (r[None, :] < rank),
                other=0.0,
            )
            b = tl.load(
                b_base + r[:, None] * b_stride_r + o[None, :] * b_stride_o,
                mask=(r[:, None] < rank) & (o[None, :] < out_features),
                other=0.0,
            )
            acc += tl.dot(h.to(b.dtype), b, input_precision=PRECISION)
        where = y_ptr + token[:, None] * y_stride_t + o[None, :] * y_stride_o
        inside = mine[:, None] & (o[None, :] < out_features)
        y = tl.load(where, mask=inside, other=0.0)
        tl.store(where, (y.to(tl.float32) + acc).to(y.dtype), mask=inside)


def _block(size: int, smallest: int, largest: int) -> int:
    return max(smallest, min(largest, triton.next_power_of_2(max(1, size))))


def apply_triton(x, y, A_all, B_all, indices, weights=None, h: torch.Tensor | None = None) -> None:
    """The kernel: one shrink launch, one expand launch per slot. `h`, the float32 intermediate [k, n, r]
    (contiguous), may be given to reuse one buffer across layers; it is overwritten where tokens have an
    adapter and read nowhere else."""
    _check(x, y, A_all, B_all, indices, weights)
    n, k = indices.shape
    adapters, features, rank = A_all.shape
    out_features = y.shape[1]
    if n == 0 or rank == 0:
        return
    if h is None:
        h = torch.empty(k, n, rank, dtype=torch.float32, device=x.device)
    token_map = indices if isinstance(indices, TokenMap) else TokenMap.build(indices, adapters)
    order, counts, starts = token_map.order, token_map.counts, token_map.starts
    # float32 inputs multiply in full precision, as torch's matmul does by default (TF32 would cost ~1e-3)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    block_t = _block(n, 16, 64)
    block_r = _block(rank, 16, 64)
    rank_blocks = triton.cdiv(rank, block_r)
    token_blocks = triton.cdiv(n, block_t)
    weight_strides = (weights.stride(0), weights.stride(1)) if weights is not None else (0, 0)
    _shrink_kernel[(token_blocks * rank_blocks, adapters, k)](
        x,
        A_all,
        h,
        weights if weights is not None else x,
        order,
        counts,
        starts,
        n,
        features,
        rank,
        adapters,
        x.stride(0),
        x.stride(1),
        A_all.stride(0),
        A_all.stride(1),
        A_all.stride(2),
        h.stride(0),
        h.stride(1),
        *weight_strides,
        WEIGHTED=weights is not None,
        PRECISION=precision,
        BLOCK_T=block_t,
        BLOCK_R=block_r,
        BLOCK_D=_block(features, 16, 64),
    )
    block_o = _block(out_features, 16, 128)
    for slot in range(k):
        _expand_kernel[(token_blocks * triton.cdiv(out_features, block_o), adapters)](
            h,
            B_all,
            y,
            order,
            counts,
            starts,
            slot,
            n,
            out_features,
            rank,
            adapters,
            h.stride(0),
            h.stride(1),
            B_all.stride(0),
            B_all.stride(1),
            B_all.stride(2),
            y.stride(0),
            y.stride(1),
            PRECISION=precision,
            BLOCK_T=block_t,
            BLOCK_O=block_o,
            BLOCK_R=block_r,
        )
