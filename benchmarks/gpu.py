"""lrtool's Triton kernels on a GPU: correctness against their references, then timings against the references
and against the machine's own measured ceilings. Run through benchmarks/gpu.sh (which sets up the dry run).

1. Correctness, every kernel and dtype: relative Frobenius error against a float64 reference (or, for the
   dense merge, the reference at the kernel's dtype), bounded by dtype; DARE's drops on the device are the
   CPU's (the same entries for one seed).
2. Ceilings: a device-to-device copy (bandwidth, bytes read + written) and a large bfloat16 matmul (FLOP/s).
3. Timings and the issue's targets:
   - multi-adapter apply, 8 adapters of rank 16, batch 64 (decode: 64 tokens; prefill: 64 x 32 tokens):
     on one 4096 -> 4096 layer, base matmul + lora_apply vs base matmul + a loop over adapters (>= 4x) and
     vs one merged model's matmul (>= 0.9x its throughput); then the same through eval's engine on a
     2-layer model of Llama-7B's width (every linear layer adapted)
   - fused dense merge, 4 adapters of 4096 x 4096: the pass's bytes / time vs the copy bandwidth (>= 50%),
     and the torch reference's time
   - fused LoRA linear, a training step (forward + backward) of one 4096 -> 4096 layer on 8192 tokens,
     bfloat16 base, float32 LoRA r16, dropout 0.1 and 0: fused vs peft's unfused layer (>= 1.25x)
Writes a markdown table to benchmarks/results/gpu-<date>.md (gpu-dry-run.md for --dry-run) and prints it.

    bash benchmarks/gpu.sh             # a CUDA machine, under 8 minutes on an H200
    bash benchmarks/gpu.sh --dry-run   # the CPU: Triton's interpreter, tiny shapes; the timing code runs but
                                       # measures nothing (interpreted kernels)
"""

import argparse
import datetime
import functools
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BOUNDS = {"float64": 1e-12, "float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}  # relative error by dtype


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU: the interpreter, tiny shapes")
    parser.add_argument(
        "--out", type=Path, default=None, help="the markdown table (default: benchmarks/results/)"
    )
    args = parser.parse_args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu.py: no CUDA device, nothing measured (bash benchmarks/gpu.sh --dry-run checks the kernels)"
        )
        return 0
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("gpu.py --dry-run needs TRITON_INTERPRET=1 set before Python starts (gpu.sh sets it)")
    bench = Bench(torch, dry=args.dry_run)
    bench.correctness()
    bench.ceilings()
    bench.lora_apply_timings()
    bench.engine_timings()
    bench.dense_merge_timings()
    bench.lora_linear_timings()
    today = datetime.date.today().isoformat()
    out = args.out or REPO / "benchmarks" / "results" / (
        "gpu-dry-run.md" if args.dry_run else f"gpu-{today}.md"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    text = bench.report(today)
    out.write_text(text, encoding="utf-8")
    print(text)
    print(f"written to {out}")
    return 1 if bench.failures else 0


class Bench:
    def __init__(self, torch, dry: bool):
        import triton

        self.torch, self.dry = torch, dry
        self.device = "cpu" if dry else "cuda"
        torch.manual_seed(0)
        self.rows_correct: list[tuple] = []  # kernel, case, dtype, error, bound, ok
        self.rows_time: list[tuple] = []  # what, lrtool, alternative, ratio, target, met
        self.ceiling: dict[str, float] = {}
        self.failures = 0
        name = "CPU (Triton interpreter)" if dry else torch.cuda.get_device_name()
        self.header = f"torch {torch.__version__}, triton {triton.__version__}, {name}"

    # ------------------------------------------------------------------------------------------- helpers

    def randn(self, *shape, dtype=None, scale=1.0):
        torch = self.torch
        return (torch.randn(*shape, device=self.device) * scale).to(dtype or torch.float32)

    def check(self, kernel: str, case: str, dtype, actual, expected) -> None:
        torch = self.torch
        actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
        finite = bool(torch.isfinite(actual).all())
        error = (
            float((actual - expected).norm() / expected.norm().clamp_min(1e-300)) if finite else float("inf")
        )
        bound = BOUNDS[str(dtype).removeprefix("torch.")]
        ok = error <= bound
        self.failures += not ok
        self.rows_correct.append((kernel, case, str(dtype).removeprefix("torch."), error, bound, ok))

    def seconds(self, work, repeat: int = 20) -> float:
        """The median time of one call of `work` (CUDA events on the GPU), after warm-up calls."""
        torch = self.torch
        repeat = 2 if self.dry else repeat
        for _ in range(1 if self.dry else 3):
            work()
        times = []
        for _ in range(repeat):
            if self.dry:
                start = time.perf_counter()
                work()
                times.append(time.perf_counter() - start)
                continue
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            work()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end) / 1000)
        return statistics.median(times)

    def timing(self, what: str, ours: float, other: float, target: float | None) -> None:
        ratio = other / ours
        met = None if target is None else ratio >= target
        self.rows_time.append((what, ours, other, ratio, target, met))

    # --------------------------------------------------------------------------------------- correctness

    def dtypes(self):
        torch = self.torch
        return [torch.float32, torch.float16] if self.dry else [torch.float32, torch.float16, torch.bfloat16]

    def correctness(self) -> None:
        torch = self.torch
        from lrtool.kernels import counter_rng, dense_merge, lora_apply, lora_linear

        tokens, features, out_features = (40, 48, 64) if self.dry else (4096, 1024, 1536)
        ranks = (4, 16, 8, 16, 2, 16, 16, 12)
        for dtype in self.dtypes():
            for k in (1, 2):
                A_all = torch.zeros(8, features, 16, device=self.device)
                B_all = torch.zeros(8, 16, out_features, device=self.device)
                for e, r in enumerate(ranks):  # mixed ranks, padded with zeros
                    A_all[e, :, :r] = self.randn(features, r, scale=features**-0.5)
                    B_all[e, :r] = self.randn(r, out_features)
                indices = torch.stack([torch.randperm(8, device=self.device)[:k] for _ in range(tokens)])
                indices[torch.rand(tokens, k, device=self.device) < 0.1] = -1
                weights = torch.rand(tokens, k, device=self.device) if k > 1 else None
                x, y = (
                    self.randn(tokens, features, dtype=dtype),
                    self.randn(tokens, out_features, dtype=dtype),
                )
                expected = y.double()
                lora_apply.apply_reference(
                    x.double(),
                    expected,
                    A_all.double(),
                    B_all.double(),
                    indices,
                    None if k == 1 else weights.double(),
                )
                actual = y.clone()
                lora_apply.apply_triton(
                    x, actual, A_all.to(dtype), B_all.to(dtype), indices, weights,
                    h=torch.full((k, tokens, 16), float("nan"), device=self.device),
                )  # fmt: skip
                self.check(
                    "lora_apply", f"8 adapters, ranks 2-16, top-{k}", dtype, actual - y, expected - y.double()
                )

        rows, columns = (24, 40) if self.dry else (2048, 4096)
        weights = [0.5, 0.3, -0.2, 0.4]
        keys = [(i + 1, 2**31 + i) for i in range(4)]
        for dtype in [torch.float64, *self.dtypes()]:
            deltas = self.randn(4, rows, columns, dtype=torch.float64).to(dtype)
            base = self.randn(columns, rows, dtype=torch.bfloat16).T  # an [in, out] weight: added transposed
            for method in dense_merge.METHODS:
                rule = dense_merge.keep_rule(deltas, method, 0.4, keys)
                for into in (None, base):
                    expected, _ = dense_merge.merge_reference(deltas, weights, rule, base=into)
                    out = torch.full_like(expected, float("nan"))
                    actual, _ = dense_merge.merge_triton(deltas, weights, rule, base=into, out=out)
                    case = method + (" into a bfloat16 base" if into is not None else "")
                    self.check(
                        "dense_merge", case, torch.bfloat16 if into is not None else dtype, actual, expected
                    )
        # DARE: the device drops the entries the CPU drops, for one seed
        deltas = self.randn(1, rows, columns, dtype=torch.float64)
        rule = dense_merge.keep_rule(deltas, "dare-linear", 0.3, [(123, 456)])
        on_device, _ = dense_merge.merge_triton(deltas, [1.0], rule)
        on_cpu = counter_rng.keep((123, 456), 0, rows * columns, 0.3).reshape(rows, columns)
        same = bool(torch.equal(on_device.cpu() != 0, on_cpu))
        self.failures += not same
        self.rows_correct.append(
            ("counter_rng", "DARE keeps on the device = on the CPU", "-", 0.0 if same else 1.0, 0.0, same)
        )

        n, features, out_features = (18, 40, 24) if self.dry else (4096, 1024, 1024)
        for dtype in self.dtypes():
            for p in (0.0, 0.1):
                x = self.randn(n, features, dtype=dtype).requires_grad_()
                weight = self.randn(out_features, features, dtype=dtype, scale=features**-0.5)
                bias = self.randn(out_features, dtype=dtype)
                A = self.randn(16, features, scale=features**-0.5).requires_grad_()
                B = self.randn(out_features, 16).requires_grad_()
                dropout = lora_linear.Dropout(p, (5, 6) if p else None)
                y = lora_linear.lora_linear(x, weight, bias, A, B, 2.0, dropout)
                upstream = self.randn(*y.shape, dtype=dtype)
                grads = torch.autograd.grad(y, (x, A, B), upstream)
                exact = [t.detach().double().requires_grad_() for t in (x, A, B)]
                reference = lora_linear.lora_linear_reference(
                    exact[0], weight.double(), bias.double(), exact[1], exact[2], 2.0, dropout
                )
                expected = torch.autograd.grad(reference, exact, upstream.double())
                for name, actual, wanted in zip(
                    ("y", "grad x", "grad A", "grad B"), (y, *grads), (reference, *expected)
                ):
                    self.check("lora_linear", f"{name}, dropout {p}", dtype, actual, wanted)

    # ------------------------------------------------------------------------------------------ ceilings

    def ceilings(self) -> None:
        torch = self.torch
        size = (1 << 20) if self.dry else (1 << 30)
        source = torch.empty(size, dtype=torch.uint8, device=self.device)
        target = torch.empty_like(source)
        self.ceiling["copy_bytes_per_s"] = 2 * size / self.seconds(lambda: target.copy_(source))
        n = 256 if self.dry else 8192
        a, b = self.randn(n, n, dtype=torch.bfloat16), self.randn(n, n, dtype=torch.bfloat16)
        self.ceiling["bf16_flop_per_s"] = 2 * n**3 / self.seconds(lambda: a @ b, repeat=10)

    # ----------------------------------------------------------------------------------- multi-adapter apply

    def lora_apply_timings(self) -> None:
        torch = self.torch
        from lrtool.kernels.lora_apply import apply_reference, lora_apply

        features = 64 if self.dry else 4096
        dtype = torch.float32 if self.dry else torch.bfloat16
        weight = self.randn(features, features, dtype=dtype, scale=features**-0.5)
        merged = weight + 0.01
        A_all = self.randn(9, features, 16, dtype=dtype, scale=features**-0.5)  # 8 adapters + the empty slot
        B_all = self.randn(9, 16, features, dtype=dtype, scale=0.01)
        for shape, tokens_per_row in (("decode", 1), ("prefill", 4 if self.dry else 32)):
            tokens = 64 * tokens_per_row
            x = self.randn(tokens, features, dtype=dtype)
            rows = torch.arange(64, device=self.device) % 8  # 8 rows per adapter
            one = rows.repeat_interleave(tokens_per_row)[:, None]
            other = (one + 1 + torch.randint(0, 7, one.shape, device=self.device)) % 8  # a distinct second
            routed = torch.cat([one, other], dim=1), torch.rand(tokens, 2, device=self.device)
            for k, (indices, weights) in ((1, (one, None)), (2, routed)):
                arguments = (x, weight, A_all, B_all, indices, weights)
                ours = self.seconds(functools.partial(adapted_layer, lora_apply, *arguments))
                loop = self.seconds(functools.partial(adapted_layer, apply_reference, *arguments))
                what = f"apply, 8 adapters r16, batch 64 {shape} ({tokens} tokens), top-{k}"
                self.timing(f"{what}: vs a loop over adapters", ours, loop, 4.0)
                if k == 1:
                    alone = self.seconds(functools.partial(torch.matmul, x, merged.T))
                    self.timing(f"{what}: vs one merged model (throughput)", ours, alone, 0.9)

    def engine_timings(self) -> None:
        """eval's engine on a 2-layer model of Llama-7B's width, 8 adapters of rank 16 on every linear layer,
        batch 64 (8 rows per adapter): the kernels vs a loop over adapters (one forward of 8 rows per
        adapter) and vs one merged model (the base's forward: a merged model costs the same)."""
        torch = self.torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from lrtool.adapters import Adapter, LoraModule
        from lrtool.engine import AdapterEngine, OneAdapter, Plan, linear_shape

        hidden, intermediate, heads = (64, 128, 4) if self.dry else (4096, 11008, 32)
        config = LlamaConfig(
            vocab_size=1024,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=heads,
        )
        dtype = torch.float32 if self.dry else torch.bfloat16
        model = LlamaForCausalLM(config).to(dtype).to(self.device).eval()
        targets = {
            n: linear_shape(m) for n, m in model.named_modules() if ".layers." in n and linear_shape(m)
        }
        adapters = []
        for _ in range(8):
            modules = {
                name: LoraModule(torch.randn(16, fan_in) / fan_in**0.5, torch.randn(fan_out, 16) * 0.01, 2.0)
                for name, (fan_in, fan_out) in targets.items()
            }
            adapters.append(Adapter(modules=modules))
        engine = AdapterEngine(model, adapters)
        mixed = Plan.by_row([OneAdapter(row // 8) for row in range(64)])
        alone = [Plan.by_row([OneAdapter(a)] * 8) for a in range(8)]

        def forward(ids, plan, kernels):
            os.environ["LRTOOL_KERNELS"] = kernels
            with torch.no_grad(), engine.routing(plan):
                model(input_ids=ids)

        def loop(ids):
            for a, plan in enumerate(alone):
                forward(ids[8 * a : 8 * a + 8], plan, "off")

        mode = os.environ.get("LRTOOL_KERNELS", "auto")
        ids = torch.randint(0, 1024, (64, 8), device=self.device)
        logits = {}
        for kernels in (mode, "off"):
            os.environ["LRTOOL_KERNELS"] = kernels
            with torch.no_grad(), engine.routing(mixed):
                logits[kernels] = model(input_ids=ids).logits
        self.check("engine (eval)", "logits, kernels vs the torch path", dtype, logits[mode], logits["off"])
        for shape, length in (("decode", 1), ("prefill", 4 if self.dry else 32)):
            ids = torch.randint(0, 1024, (64, length), device=self.device)
            ours = self.seconds(functools.partial(forward, ids, mixed, mode), 10)
            what = f"engine, 2 layers {hidden} wide, 8 adapters r16, batch 64 {shape} ({64 * length} tokens)"
            self.timing(
                f"{what}: vs a loop over adapters", ours, self.seconds(functools.partial(loop, ids), 10), 4.0
            )
            merged = self.seconds(functools.partial(forward, ids, None, mode), 10)
            self.timing(f"{what}: vs one merged model (throughput)", ours, merged, 0.9)
            batched = self.seconds(functools.partial(forward, ids, mixed, "off"), 10)
            self.timing(f"{what}: vs the engine's torch path (stacked bmm)", ours, batched, None)
        os.environ["LRTOOL_KERNELS"] = mode
        engine.close()

    # --------------------------------------------------------------------------------------- dense merge

    def dense_merge_timings(self) -> None:
        torch = self.torch
        from lrtool.kernels import dense_merge

        size = 64 if self.dry else 4096
        weights, keys = [0.4, 0.3, 0.2, 0.1], [(i, i + 1) for i in range(4)]
        copy = self.ceiling["copy_bytes_per_s"]
        for dtype in (torch.float64, torch.float32):
            deltas = self.randn(4, size, size, dtype=dtype)
            base = self.randn(size, size, dtype=torch.bfloat16)
            cases = (("ties", None), ("dare-ties", None), ("magnitude-prune", base), ("linear", base))
            for method, into in cases:
                rule = dense_merge.keep_rule(deltas, method, 0.3, keys)
                out = torch.empty(size, size, dtype=dtype if into is None else into.dtype, device=self.device)
                moved = sum(t.numel() * t.element_size() for t in (deltas, out, into) if t is not None)
                arguments = (deltas, weights, rule, into, out)
                ours = self.seconds(functools.partial(dense_merge.merge_triton, *arguments), 10)
                reference = self.seconds(functools.partial(dense_merge.merge_reference, *arguments), 3)
                into_text = " into a bf16 base" if into is not None else ""
                what = f"merge {method}{into_text}, 4 x {size}^2 {str(dtype).removeprefix('torch.')}"
                share = moved / ours / copy
                self.rows_time.append(
                    (f"{what}: pass bandwidth / copy", ours, None, share, 0.5, share >= 0.5)
                )
                self.timing(f"{what}: vs the torch reference", ours, reference, None)
                if method == "ties":
                    selection = self.seconds(functools.partial(dense_merge.keep_rule, deltas, method, 0.3), 3)
                    self.rows_time.append(
                        (f"{what}: its selection pass, for scale", selection, None, None, None, None)
                    )

    # ------------------------------------------------------------------------------------ fused LoRA linear

    def lora_linear_timings(self) -> None:
        torch = self.torch
        from peft import LoraConfig, get_peft_model

        from lrtool.kernels.lora_linear import fuse_peft_layers

        features, tokens = (48, 64) if self.dry else (4096, 8192)
        dtype = torch.float32 if self.dry else torch.bfloat16
        x = self.randn(tokens, features, dtype=dtype).requires_grad_()
        upstream = self.randn(tokens, features, dtype=dtype)
        for p in (0.1, 0.0):
            steps = {}
            for kind in ("peft", "fused"):
                torch.manual_seed(0)
                layer = torch.nn.Sequential()
                layer.add_module("proj", torch.nn.Linear(features, features, bias=False))
                config = LoraConfig(r=16, lora_alpha=32, lora_dropout=p, target_modules=["proj"])
                model = get_peft_model(layer.to(dtype), config).to(self.device).train()
                if kind == "fused":
                    fuse_peft_layers(model)
                steps[kind] = self.seconds(functools.partial(training_step, model, x, upstream))
            what = f"LoRA linear train step, {features}->{features} on {tokens} tokens, r16, dropout {p}"
            self.timing(f"{what}: fused vs peft", steps["fused"], steps["peft"], 1.25)

    # -------------------------------------------------------------------------------------------- report

    def report(self, today: str) -> str:
        from lrtool.kernels import dispatch

        if dispatch.failed():  # a kernel fell back to its reference: its timings would be the reference's
            self.failures += 1
            self.rows_correct.append(
                (
                    "dispatch",
                    f"kernels that failed: {', '.join(sorted(dispatch.failed()))}",
                    "-",
                    1.0,
                    0.0,
                    False,
                )
            )

        def number(value, digits=3):
            return "-" if value is None else f"{value:.{digits}g}"

        lines = [
            f"# lrtool kernels on {'the CPU (dry run)' if self.dry else 'a GPU'}, {today}",
            "",
            self.header,
            "",
        ]
        if self.dry:
            lines += [
                "Dry run: every kernel ran in Triton's interpreter at tiny shapes. The correctness rows "
                "hold; the timing rows only show that the timing code runs (interpreted kernels measure "
                "nothing).",
                "",
            ]
        lines += [
            "## Correctness",
            "",
            "| kernel | case | dtype | relative error | bound | ok |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for kernel, case, dtype, error, bound, ok in self.rows_correct:
            lines.append(
                f"| {kernel} | {case} | {dtype} | {error:.2e} | {bound:.0e} | {'yes' if ok else 'NO'} |"
            )
        copy, flops = self.ceiling["copy_bytes_per_s"], self.ceiling["bf16_flop_per_s"]
        lines += [
            "",
            "## Ceilings",
            "",
            f"- device-to-device copy: {copy / 1e9:.1f} GB/s (bytes read + written)",
            f"- bfloat16 matmul: {flops / 1e12:.3g} TFLOP/s",
            "",
            "## Timings",
            "",
            "| what | lrtool (ms) | other (ms) | ratio | target | met |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for what, ours, other, ratio, target, met in self.rows_time:
            other_ms = None if other is None else other * 1e3
            shown = "-" if met is None or self.dry else ("yes" if met else "no")
            cells = (what, number(ours * 1e3), number(other_ms), number(ratio), number(target), shown)
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            f"{self.failures} correctness check(s) failed."
            if self.failures
            else "Every correctness check passed.",
        ]
        return "\n".join(lines) + "\n"


def adapted_layer(apply, x, weight, A_all, B_all, indices, weights) -> None:
    """One layer of a mixed batch: the base's matmul, then the adapters' contributions."""
    y = x @ weight.T
    apply(x, y, A_all, B_all, indices, weights)


def training_step(model, x, upstream) -> None:
    """Forward and backward of one layer (gradients of x and the LoRA factors)."""
    model(x).backward(upstream)


if __name__ == "__main__":
    sys.exit(main())
