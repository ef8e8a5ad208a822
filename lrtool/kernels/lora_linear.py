"""Fused LoRA linear for training (train): a LoRA layer's forward and backward without the dropout copy.

    y = x W^T + bias + scale * (dropout(x) A^T) B^T

Reads x [..., in], the frozen base weight W [out, in] and bias, the trained factors A [r, in] and B [out, r]
(peft's lora_A.weight and lora_B.weight), the scale and the dropout probability p with a counter_rng key.
Returns y [..., out] in x's dtype; backward gives the gradients of x, A and B (W and bias are frozen).

`LoraLinearFunction` (a torch autograd Function) runs the base product and its gradient x-wise (gy W) with
torch's matmul (cuBLAS does those best) and the LoRA side through one masked-matmul kernel:

    forward   h = dropout(x) A^T          the mask drawn in the kernel from (key, position in x), never stored
              y += scale * h B^T          accumulated into the base's output in place
    backward  gh = scale * gy B
              gB = scale * gy^T h         h saved from the forward: the r-wide intermediate is made once
              gA = gh^T dropout(x)        the same mask drawn again from the key
              gx += (gh A) * mask         into gy W, in place

The LoRA side computes in A's dtype (as peft casts x to lora_A's dtype) with float32 accumulation. dropout(x)
keeps an entry with probability 1 - p (counter_rng: bits below round((1 - p) * 2^32) for the key and the
entry's row-major position in x flattened to [n, in]) and divides the kept ones by 1 - p. peft's unfused layer
instead stores a dropped copy of x (and a float32 copy when the adapter is float32) and makes [n, out]
temporaries for B's product, its scaling and the sum.

`fuse_peft_layers(model)` routes a peft model's LoRA linear layers through this Function where kernels run
(lrtool train on CUDA); a layer in any other state (merged, disabled, DoRA, several adapters) keeps peft's
forward.

Kernel: `_masked_matmul_kernel`, out (+)= alpha * op(a) @ op(b), grid (M blocks x N blocks); the dropout mask
is applied to a, to b or to the product, by the x position each element stands for.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lrtool.kernels import counter_rng, dispatch

try:
    import triton
    import triton.language as tl

    from lrtool.kernels import _rng_triton
except ImportError:  # the CPU install: the reference only
    triton = None


@dataclass(frozen=True)
class Dropout:
    """LoRA dropout: probability p, and the counter_rng key its mask is drawn from (None when p is 0)."""

    p: float = 0.0
    key: tuple[int, int] | None = None

    @property
    def active(self) -> bool:
        return self.p > 0

    def mask(self, rows: int, columns: int, device) -> torch.Tensor:
        """The keep mask of an x of [rows, columns] (bool)."""
        return counter_rng.keep(self.key, 0, rows * columns, 1 - self.p, device).reshape(rows, columns)


@dataclass(frozen=True)
class Masked:
    """Which matmul operand stands for x (rows x columns, flattened) and so takes the dropout mask."""

    operand: str  # "a" (a is x), "b" (b is x), "out" (the product is shaped as x)
    dropout: Dropout
    columns: int  # x's in_features: position = row * columns + column


# ---------------------------------------------------------------------------------------------------------
# The layer: forward and backward in terms of masked_matmul


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    dropout: Dropout = Dropout(),
) -> torch.Tensor:
    """y = x W^T + bias + scale * (dropout(x) A^T) B^T, differentiable in x, A and B (W, bias frozen)."""
    return LoraLinearFunction.apply(x, weight, bias, A, B, scale, dropout)


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, dropout):
        features = x.shape[-1]
        x2 = x.reshape(-1, features)
        y = torch.nn.functional.linear(x2, weight, bias)
        h = torch.empty(x2.shape[0], A.shape[0], dtype=A.dtype, device=x.device)
        masked_matmul(x2, A.T, h, mask=Masked("a", dropout, features), compute=A.dtype)
        masked_matmul(h, B.T, y, alpha=scale, accumulate=True, compute=A.dtype)
        ctx.save_for_backward(x2, weight, A, B, h)
        ctx.scale, ctx.dropout, ctx.shape = scale, dropout, x.shape
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x2, weight, A, B, h = ctx.saved_tensors
        scale, dropout, features = ctx.scale, ctx.dropout, x2.shape[1]
        gy2 = gy.reshape(-1, gy.shape[-1])
        gh = torch.empty(gy2.shape[0], A.shape[0], dtype=A.dtype, device=gy.device)
        masked_matmul(gy2, B, gh, alpha=scale, compute=A.dtype)
        gx = gA = gB = None
        if ctx.needs_input_grad[4]:
            gB = torch.empty_like(B)
            masked_matmul(gy2.T, h, gB, alpha=scale, compute=A.dtype)
        if ctx.needs_input_grad[3]:
            gA = torch.empty_like(A)
            masked_matmul(gh.T, x2, gA, mask=Masked("b", dropout, features), compute=A.dtype)
        if ctx.needs_input_grad[0]:
            gx = gy2 @ weight.to(gy2.dtype)
            masked_matmul(gh, A, gx, accumulate=True, mask=Masked("out", dropout, features), compute=A.dtype)
            gx = gx.reshape(ctx.shape)
        return gx, None, None, gA, gB, None, None


def lora_linear_reference(x, weight, bias, A, B, scale, dropout: Dropout = Dropout()) -> torch.Tensor:
    """The same layer in plain differentiable torch (the tests' reference, at any dtype)."""
    x2 = x.reshape(-1, x.shape[-1]).to(A.dtype)
    if dropout.active:
        x2 = torch.where(dropout.mask(*x2.shape, x.device), x2 / (1 - dropout.p), 0.0)
    lora = (x2 @ A.T) @ B.T
    y = torch.nn.functional.linear(x, weight, bias)
    return (y + scale * lora.reshape(*y.shape[:-1], -1)).to(y.dtype)


# ---------------------------------------------------------------------------------------------------------
# The one primitive: out (+)= alpha * a @ b, the dropout mask on a, on b or on the product


def masked_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    alpha: float = 1.0,
    accumulate: bool = False,
    mask: Masked | None = None,
    compute: torch.dtype | None = None,
) -> None:
    """out = alpha * a' @ b' (+ out when accumulating), where the operand or product `mask` names is x with
    its dropout applied; the operands are cast to `compute` (default b's dtype) and the products accumulated
    in float32."""
    if mask is not None and not mask.dropout.active:
        mask = None
    compute = compute or b.dtype
    dispatch.run(
        "lora_linear", _matmul_triton, _matmul_reference, a, b, out, alpha, accumulate, mask, compute
    )


def _dropped(x: torch.Tensor, mask: Masked, rows: int, columns: int) -> torch.Tensor:
    keep = mask.dropout.mask(rows, columns, x.device)
    return torch.where(keep, x * (1 / (1 - mask.dropout.p)), 0.0)


def _matmul_reference(a, b, out, alpha, accumulate, mask, compute) -> None:
    accumulator = torch.float64 if compute == torch.float64 else torch.float32
    a, b = a.to(compute).to(accumulator), b.to(compute).to(accumulator)
    if mask is not None and mask.operand == "a":
        a = _dropped(a, mask, *a.shape)
    if mask is not None and mask.operand == "b":
        b = _dropped(b, mask, *b.shape)
    product = alpha * (a @ b)
    if mask is not None and mask.operand == "out":
        product = _dropped(product, mask, *product.shape)
    out.copy_(out.to(accumulator) + product if accumulate else product)


if triton is not None:

    @triton.jit(do_not_specialize=["key0", "key1", "keep_below"])
    def _masked_matmul_kernel(
        a_ptr,
        b_ptr,
        out_ptr,
        M,
        N,
        K,
        a_stride0,
        a_stride1,
        b_stride0,
        b_stride1,
        out_stride0,
        out_stride1,
        alpha,
        key0,
        key1,
        keep_below,
        keep_scale,  # 1 / (1 - p)
        x_columns,
        MASK: tl.constexpr,  # 0 none, 1 on a, 2 on b, 3 on the product
        ACCUMULATE: tl.constexpr,
        COMPUTE: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        blocks_n = tl.cdiv(N, BLOCK_N)
        m = (tl.program_id(0) // blocks_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = (tl.program_id(0) % blocks_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        m64 = m.to(tl.int64)
        n64 = n.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k64 = k.to(tl.int64)
            a = tl.load(
                a_ptr + m64[:, None] * a_stride0 + k64[None, :] * a_stride1,
                mask=(m[:, None] < M) & (k[None, :] < K),
                other=0.0,
            ).to(COMPUTE)
            if MASK == 1:
                keep = _rng_triton.kept(key0, key1, m64[:, None] * x_columns + k64[None, :], keep_below)
                a = tl.where(keep, a * keep_scale, 0.0).to(COMPUTE)
            b = tl.load(
                b_ptr + k64[:, None] * b_stride0 + n64[None, :] * b_stride1,
                mask=(k[:, None] < K) & (n[None, :] < N),
                other=0.0,
            ).to(COMPUTE)
            if MASK == 2:
                keep = _rng_triton.kept(key0, key1, k64[:, None] * x_columns + n64[None, :], keep_below)
                b = tl.where(keep, b * keep_scale, 0.0).to(COMPUTE)
            acc += tl.dot(a, b, input_precision=PRECISION)
        acc = acc * alpha
        if MASK == 3:
            keep = _rng_triton.kept(key0, key1, m64[:, None] * x_columns + n64[None, :], keep_below)
            acc = tl.where(keep, acc * keep_scale, 0.0)
        where = out_ptr + m64[:, None] * out_stride0 + n64[None, :] * out_stride1
        inside = (m[:, None] < M) & (n[None, :] < N)
        if ACCUMULATE:
            acc += tl.load(where, mask=inside, other=0.0).to(tl.float32)
        tl.store(where, acc.to(out_ptr.dtype.element_ty), mask=inside)


COMPUTE_TYPES = {}  # torch dtype -> Triton dtype, filled when Triton is imported
if triton is not None:
    COMPUTE_TYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _block(size: int, largest: int) -> int:
    return max(16, min(largest, triton.next_power_of_2(max(1, size))))


def _matmul_triton(a, b, out, alpha, accumulate, mask, compute) -> None:
    (M, K), N = a.shape, b.shape[1]
    if M == 0 or N == 0:
        return
    operand = {None: 0, "a": 1, "b": 2, "out": 3}[mask.operand if mask is not None else None]
    dropout = mask.dropout if mask is not None else Dropout()
    key = dropout.key or (0, 0)
    block_m, block_n = _block(M, 64), _block(N, 64)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _masked_matmul_kernel[grid](
        a,
        b,
        out,
        M,
        N,
        K,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        float(alpha),
        counter_rng._signed(key[0]),
        counter_rng._signed(key[1]),
        counter_rng.keep_threshold(1 - dropout.p),
        1 / (1 - dropout.p),
        mask.columns if mask is not None else 0,
        MASK=operand,
        ACCUMULATE=accumulate,
        COMPUTE=COMPUTE_TYPES[compute],
        PRECISION="ieee" if compute == torch.float32 else "tf32",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=_block(K, 32),
    )


# ---------------------------------------------------------------------------------------------------------
# Wiring into a peft model (lrtool train)


def fuse_peft_layers(model: torch.nn.Module) -> int:
    """Route the forward of every peft LoRA linear layer of `model` through LoraLinearFunction whenever
    the layer is in the plain state (one active adapter, not merged, no DoRA, a frozen nn.Linear base) and
    kernels run on its input's device; peft's own forward otherwise. Returns the number of layers routed."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    fused = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and isinstance(module.base_layer, torch.nn.Linear):
            module.forward = functools.partial(_fused_forward, module, module.forward)
            fused += 1
    return fused


def _fused_forward(layer, peft_forward, x, *args, **kwargs):
    plain = (
        not args
        and not kwargs
        and not layer.disable_adapters
        and not layer.merged
        and len(layer.active_adapters) == 1
        and layer.active_adapters[0] in layer.lora_A
        and layer.active_adapters[0] not in getattr(layer, "lora_variant", {})
        and not layer.base_layer.weight.requires_grad
        and (layer.base_layer.bias is None or not layer.base_layer.bias.requires_grad)
        and layer.lora_A[layer.active_adapters[0]].weight.dtype in COMPUTE_TYPES
        and dispatch.wanted(x)
    )
    if not plain:
        return peft_forward(x, *args, **kwargs)
    name = layer.active_adapters[0]
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    dropout_layer = layer.lora_dropout[name]
    p = dropout_layer.p if isinstance(dropout_layer, torch.nn.Dropout) and dropout_layer.training else 0.0
    # the key comes from torch's CPU generator: seeded by --seed and saved in checkpoints, so a resumed run
    # draws the same masks
    key = tuple(int(v) for v in torch.randint(0, 1 << 32, (2,), dtype=torch.int64)) if p > 0 else None
    base = layer.base_layer
    return lora_linear(x, base.weight, base.bias, A, B, layer.scaling[name], Dropout(p, key))
