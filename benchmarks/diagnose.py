"""How long `lrtool diagnose` takes on a 7B-sized adapter, against dense SVDs of the same updates.

    .venv/bin/python benchmarks/diagnose.py        # about 2 minutes on 2 CPU cores; target: diagnose < 10 s

Builds a rank-16 PEFT adapter shaped like a Llama-2-7B one (32 layers x q, k, v, o [4096 x 4096], gate, up
[11008 x 4096], down [4096 x 11008]; 40M parameters, 160 MB in float32), writes it to a temporary
directory, and times the whole diagnosis through the function the CLI calls (reading included). The dense
side computes the same singular values with torch.linalg.svdvals on the dense dW (float32, which is faster
than float64) for one module of each shape and extrapolates to all 224 modules. Last, a pair of such
adapters: by default its sign-conflict rate is estimated from 2^20 sampled entries (labelled, with its 95%
interval), and with exact_sign_conflicts=True (--exact-sign-conflicts) counted over every dense entry, block
by block in float32 with a certified error bound. Target: the pair under 5 s.
"""

import math
import tempfile
import time
from pathlib import Path

import torch

from lrtool.adapters import Adapter, LoraModule, save_adapter
from lrtool.diagnose import diagnose

LAYERS, RANK, ALPHA = 32, 16, 32
HIDDEN, INTERMEDIATE = 4096, 11008
SHAPES = {  # module -> (out_features, in_features)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
DENSE_SAMPLE = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")  # one of each shape


def seven_b_adapter(seed: int = 0) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(LAYERS):
        for name, (out_features, in_features) in SHAPES.items():
            A = torch.randn(RANK, in_features, generator=generator) / math.sqrt(in_features)
            B = torch.randn(out_features, RANK, generator=generator) * 0.01
            modules[f"model.layers.{layer}.{name}"] = LoraModule(A=A, B=B, scale=ALPHA / RANK)
    return Adapter(modules=modules, base="llama-2-7b-shaped")


def main() -> None:
    adapter = seven_b_adapter()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "adapter"
        save_adapter(adapter, directory)
        size = sum(p.stat().st_size for p in directory.iterdir())
        print(
            f"adapter: {len(adapter.modules)} modules, rank {RANK}, "
            f"{adapter.num_parameters / 1e6:.1f}M parameters, {size / 1e6:.0f} MB"
        )
        start = time.perf_counter()
        report = diagnose([str(directory)])
        ours = time.perf_counter() - start
        save_adapter(seven_b_adapter(seed=1), Path(tmp) / "other")
        start = time.perf_counter()
        pair = diagnose([str(directory), str(Path(tmp) / "other")])["pairs"][0]
        pair_seconds = time.perf_counter() - start
        start = time.perf_counter()
        exact = diagnose([str(directory), str(Path(tmp) / "other")], exact_sign_conflicts=True)["pairs"][0]
        exact_seconds = time.perf_counter() - start
    entry = report["adapters"][0]
    assert len(entry["modules"]) == LAYERS * len(SHAPES) and not entry["findings"], entry["findings"][:3]
    print(f"diagnose (factored, float64, reading included): {ours:.2f} s  (target < 10 s)")

    dense_total, worst = 0.0, 0.0
    for name in DENSE_SAMPLE:
        module = adapter.modules[f"model.layers.0.{name}"]
        start = time.perf_counter()
        update = module.scale * (module.B @ module.A)
        # Tall orientation: LAPACK takes ~5x longer on a wide matrix with the same singular values.
        dense = torch.linalg.svdvals(update if update.shape[0] >= update.shape[1] else update.T)
        seconds = time.perf_counter() - start
        ours_values = torch.tensor(
            next(m for m in entry["modules"] if m["name"].endswith(f"0.{name}"))["singular_values"]
        )
        worst = max(worst, float(((dense[:RANK].double() - ours_values).abs() / ours_values[0]).max()))
        count = LAYERS * sum(SHAPES[other] == SHAPES[name] for other in SHAPES)
        dense_total += seconds * count
        print(f"dense svdvals of {name} {list(SHAPES[name])} (float32): {seconds:.2f} s  x {count} modules")
    print(f"dense, extrapolated to all {len(adapter.modules)} modules: {dense_total:.0f} s")
    print(f"ratio dense / factored: {dense_total / ours:.0f}x")
    print(f"largest difference of the sampled singular values (dense float32), relative to s_1: {worst:.1e}")
    estimate = pair["sign_conflict_estimate"]
    low, high = estimate["ci95"]
    verdict = "met" if pair_seconds < 5 else "MISSED"
    inside = "inside" if low <= exact["sign_conflict"] <= high else "OUTSIDE"
    print(
        f"a pair of such adapters (spectra of both and every pairwise figure): {pair_seconds:.1f}s "
        f"(target < 5 s: {verdict}); cosine {pair['cosine']:.3g}; sign conflicts estimated from "
        f"{estimate['sampled_entries']} of {estimate['of_entries']} entries: {pair['sign_conflict']:.4f}, "
        f"95% interval [{low:.4f}, {high:.4f}]"
    )
    print(
        f"the same pair with --exact-sign-conflicts (every dense entry, in float32 blocks): "
        f"{exact_seconds:.1f}s; sign conflicts {exact['sign_conflict']:.6f} ({inside} the estimate's range)"
    )


if __name__ == "__main__":
    main()
