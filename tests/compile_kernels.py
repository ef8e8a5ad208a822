"""Compile every Triton kernel of lrtool.kernels for a CUDA GPU, on a machine without one.

Triton's interpreter (what the CPU tests run) accepts programs its compiler rejects, so this runs each
kernel module's launcher on small CPU tensors with Triton's launch replaced by a compilation for the given
target (default sm_90, the H200 of benchmarks/gpu.sh): Triton's front end, its GPU passes and ptxas (shipped
in the triton wheel) all run; nothing is launched. Prints one line per specialization compiled.

    python tests/compile_kernels.py [ARCH ...]       e.g. 90 80
"""

import inspect
import os
import sys

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: this compiles the kernels instead of interpreting them")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from lrtool.kernels import dense_merge, lora_apply, lora_linear  # noqa: E402

POINTER_TYPES = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "i1",
}
OPTIONS = ("num_warps", "num_stages", "num_ctas")
compiled: list[str] = []


def argument_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def compile_instead(targets):
    def run(self: JITFunction, *args, grid, warmup, **kwargs):
        options = {name: kwargs.pop(name) for name in OPTIONS if name in kwargs}
        bound = inspect.signature(self.fn).bind(*args, **kwargs)
        signature, constants = {}, {}
        for parameter, (name, value) in zip(self.params, bound.arguments.items()):
            if parameter.is_constexpr:
                signature[name], constants[name] = "constexpr", value
            else:
                signature[name] = argument_type(value)
        for arch in targets:
            source = ASTSource(fn=self, signature=signature, constexprs=constants)
            triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
            shown = ", ".join(f"{k}={v}" for k, v in constants.items() if not k.startswith("BLOCK"))
            compiled.append(f"sm_{arch} {self.fn.__name__}({shown})")

    return run


def main(targets) -> None:
    JITFunction.run = compile_instead(targets)
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=generator).to(dtype)

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x, y = randn(5, 32, dtype=dtype), randn(5, 48, dtype=dtype)
        A_all, B_all = randn(3, 32, 8, dtype=dtype), randn(3, 8, 48, dtype=dtype)
        indices = torch.tensor([[0, 1], [2, -1], [1, 0], [-1, -1], [0, 2]])
        lora_apply.apply_triton(x, y, A_all, B_all, indices[:, :1])
        lora_apply.apply_triton(x, y, A_all, B_all, indices, torch.rand(5, 2, generator=generator))
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        deltas = randn(3, 24, 40, dtype=dtype)
        keys = [(1, 2), (3, 4), (5, 6)]
        for method in dense_merge.METHODS:
            rule = dense_merge.keep_rule(deltas, method, 0.5, keys)
            dense_merge.merge_triton(deltas, [0.5, 0.3, 0.2], rule, sums=True)
        rule = dense_merge.keep_rule(deltas, "ties", 0.5)
        dense_merge.merge_triton(deltas, [0.5, 0.3, 0.2], rule, base=randn(40, 24, dtype=torch.bfloat16).T)
    for compute in (torch.float32, torch.bfloat16):
        dropout = lora_linear.Dropout(0.1, (7, 9))
        a, b, out = randn(6, 32), randn(32, 8, dtype=compute), randn(6, 8, dtype=torch.bfloat16)
        for operand in ("a", "b", "out"):
            mask = lora_linear.Masked(operand, dropout, 32)
            lora_linear._matmul_triton(a, b, out, 0.5, operand == "out", mask, compute)
        lora_linear._matmul_triton(a, b, out, 0.5, True, None, compute)
    print("\n".join(sorted(set(compiled))))


if __name__ == "__main__":
    main([int(arch) for arch in sys.argv[1:]] or [90])
