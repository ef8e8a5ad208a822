"""Side by side: `lrtool merge` against peft, plain file copies and dense references, on 7B-shaped (4096-wide)
adapters.

    .venv/bin/python benchmarks/merge.py        # about 6 minutes on 2 idle CPU cores (most of it part 3)

1. svd: lrtool's factored SVD (QR of the stacked factors, SVD of a 64 x 64 core) against peft's
   add_weighted_adapter(..., combination_type="svd"), which forms each dense 4096 x 4096 update and runs a
   full SVD on it (about 11 s a module on 2 idle cores, so SVD_MODULES = 5 modules keep this part near a
   minute).
   Four rank-16 adapters, weights 1/4, rank 16 kept. Prints both times, the ratio, and each result's
   relative distance from the exact weighted sum next to the optimum (Eckart-Young).
   Target: lrtool at least 50x faster at no worse error.
2. the receipt: `lrtool merge --method linear` and `--method svd` end to end (read, merge, write, receipt,
   manifest) against copying the same input files, LINEAR_MODULES modules each: in process, without the
   receipt (its errors from Gram matrices of the factors, the inputs' sha256), and as a whole process
   against `cp -r`, the interpreter's start-up (Python, torch) measured on its own.
   Target: linear within 2x, svd within 3x a copy, whole process.
3. factored vs dense: tsv, iso-c, iso-cts and core-space from the factors against the same definitions on
   dense updates (dense SVDs of 4096 x 4096 matrices: ~20 s each on 2 idle cores; ten of them), one module.
   Target: at least 20x faster, the same result to 1e-6 relative.
4. --into-base: the linear merge added to a float32 base of BASE_WEIGHTS 4096 x 4096 weights in two
   shards, against reading and writing that model once (safe_open + save_file per shard); each runs in a
   fresh process that reports its peak resident memory.
"""

import contextlib
import functools
import io
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lrtool import lowrank
from lrtool.adapters import Adapter, LoraModule, load_adapter, save_adapter
from lrtool.merge.plan import plan_merge

WIDTH, RANK, ADAPTERS = 4096, 16, 4
SVD_MODULES = 5
LINEAR_MODULES = 128
BASE_WEIGHTS, BASE_SHARDS = 16, 2
REPO = Path(__file__).resolve().parent.parent


def make_adapters(names: list[str], seed: int = 0) -> list[Adapter]:
    """ADAPTERS rank-RANK adapters on WIDTH x WIDTH modules, scaled like trained ones (alpha = 2r)."""
    generator = torch.Generator().manual_seed(seed)
    adapters = []
    for _ in range(ADAPTERS):
        modules = {
            name: LoraModule(
                A=torch.randn(RANK, WIDTH, generator=generator) / math.sqrt(WIDTH),
                B=torch.randn(WIDTH, RANK, generator=generator) * 0.01,
                scale=2.0,
            )
            for name in names
        }
        adapters.append(Adapter(modules=modules, metadata={"task_type": None}))
    return adapters


def relative_distance(B, A, linear) -> float:
    return lowrank.distance(B, A, *linear) / lowrank.norm(*linear)


def best_of(runs: int, work) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


# ---------------------------------------------------------------------------------------------------------


def bench_svd(tmp: Path) -> None:
    from peft import PeftModel

    names = [f"layers.{i}" for i in range(SVD_MODULES)]
    adapters = make_adapters(names)
    weights = [1 / ADAPTERS] * ADAPTERS

    start = time.perf_counter()
    plan = plan_merge(adapters, "svd", weights=weights, rank=RANK)
    result = plan.to_adapter()
    ours = time.perf_counter() - start
    linear = {name: plan.inputs[name].linear() for name in names}
    our_error = max(
        relative_distance(m.B.double() * m.scale, m.A.double(), linear[n])
        for n, m in result.adapter.modules.items()
    )
    optimum = 0.0
    for name in names:
        S = lowrank.factored_svd(*linear[name])[1]
        optimum = max(optimum, math.sqrt(float((S[RANK:] ** 2).sum() / (S**2).sum())))

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(
                torch.nn.utils.skip_init(torch.nn.Linear, WIDTH, WIDTH, bias=False) for _ in names
            )

    for i, adapter in enumerate(adapters):
        save_adapter(adapter, tmp / f"svd-{i}")
    model = PeftModel.from_pretrained(Stack(), tmp / "svd-0", adapter_name="a0")
    for i in range(1, ADAPTERS):
        model.load_adapter(tmp / f"svd-{i}", adapter_name=f"a{i}")
    start = time.perf_counter()
    model.add_weighted_adapter(
        [f"a{i}" for i in range(ADAPTERS)], weights, "merged", combination_type="svd", svd_rank=RANK
    )
    theirs = time.perf_counter() - start
    peft_error = 0.0
    for i, layer in enumerate(model.base_model.model.layers):
        B = layer.lora_B["merged"].weight.detach().double() * layer.scaling["merged"]
        peft_error = max(
            peft_error, relative_distance(B, layer.lora_A["merged"].weight.detach(), linear[names[i]])
        )

    print(
        f"\n1. svd: {ADAPTERS} adapters, rank {RANK}, {SVD_MODULES} modules of {WIDTH} x {WIDTH}, "
        f"rank {RANK} kept"
    )
    print(f"   {'':24}{'time':>10}{'max rel. error':>17}")
    print(f"   {'lrtool merge svd':24}{ours:>9.3f}s{our_error:>17.6f}")
    print(f"   {'peft svd':24}{theirs:>9.3f}s{peft_error:>17.6f}")
    print(f"   {'optimum (Eckart-Young)':24}{'':>10}{optimum:>17.6f}")
    verdict = "met" if theirs / ours >= 50 and our_error <= peft_error * (1 + 1e-4) else "MISSED"
    print(f"   ratio: lrtool is {theirs / ours:.0f}x faster (target >= 50x at no worse error: {verdict})")


def bench_receipt(tmp: Path) -> None:
    from lrtool.cli import main

    names = [f"layers.{i}" for i in range(LINEAR_MODULES)]
    directories = []
    for i, adapter in enumerate(make_adapters(names, seed=1)):
        save_adapter(adapter, tmp / f"linear-{i}")
        directories.append(tmp / f"linear-{i}")
    size = sum(p.stat().st_size for d in directories for p in d.iterdir())
    arguments = [*map(str, directories), "--force", "-q"]

    def copy():
        target = tmp / "copied"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        for i, directory in enumerate(directories):
            for path in directory.iterdir():
                shutil.copyfile(path, target / f"{i}-{path.name}")

    def merge(method):
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the CLI prints the output path
                main(["merge", *arguments, "--method", method, "-o", str(tmp / "merged")])
        except SystemExit as exit:
            assert exit.code == 0, exit.code

    def without_receipt(method):
        """The same loader, checks, method and writer, without the receipt's errors and hashes."""
        plan = plan_merge([load_adapter(d) for d in directories], method)
        modules = {}
        for name, inputs in plan.inputs.items():
            update = plan.exact(name)
            modules[name] = LoraModule(A=update.A.float(), B=update.B.float(), scale=1.0)
            inputs.forget()
        save_adapter(Adapter(modules=modules), tmp / "bare")

    def process(command):
        return lambda: subprocess.run(command, check=True, cwd=REPO, capture_output=True)

    copied = best_of(3, copy)
    (tmp / "cp-copy").mkdir()
    copied_process = best_of(3, process(["cp", "-r", *map(str, directories), str(tmp / "cp-copy")]))
    startup = best_of(3, process([sys.executable, "-c", "import lrtool.cli, lrtool.merge.run"]))
    print(
        f"\n2. the receipt: {ADAPTERS} adapters x {LINEAR_MODULES} modules of {WIDTH} x {WIDTH}, "
        f"rank {RANK}, {size / 1e6:.0f} MB in (best of 3)"
    )
    line = "   {:<48}{:7.3f}s  {}"
    print(line.format("copy the input files (in process)", copied, f"({size / copied / 1e9:.2f} GB/s)"))
    print(line.format("cp -r of the input directories (a process)", copied_process, ""))
    print(
        line.format(
            "start-up: python, import lrtool and torch", startup, f"{startup / copied_process:.1f}x cp"
        )
    )
    for method, target in (("linear", 2), ("svd", 3)):
        merged = best_of(3, functools.partial(merge, method))
        bare = best_of(3, functools.partial(without_receipt, method))
        command = [
            sys.executable,
            "-m",
            "lrtool",
            "merge",
            *arguments,
            "--method",
            method,
            "-o",
            str(tmp / "p"),
        ]
        whole = best_of(3, process(command))
        verdict = "met" if whole / copied_process <= target else "MISSED"
        print(line.format(f"{method}: merge in process", merged, f"{merged / copied:.1f}x the copy"))
        print(
            line.format(f"{method}:   without the receipt and hashes", bare, f"{bare / copied:.1f}x the copy")
        )
        print(
            line.format(
                f"{method}: whole process, start-up included",
                whole,
                f"{whole / copied_process:.1f}x cp (target <= {target}x: {verdict}); without start-up "
                f"{(whole - startup) / copied_process:.1f}x; receipt and hashes {merged - bare:.2f}s",
            )
        )


# The new SVD-based methods on dense updates: each paper's definition with dense SVDs of [out, in] matrices,
# as their reference code computes it (with lrtool's rule of keeping numerically non-zero singular values).


def _rank(S: torch.Tensor, shape) -> int:
    return int((S > S[0] * max(shape) * torch.finfo(torch.float64).eps).sum())


def _polar(X: torch.Tensor) -> torch.Tensor:
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def dense_tsv(deltas, weights):
    k = min(deltas[0].shape) // len(deltas)
    Us, Ss, Vhs = [], [], []
    for weight, delta in zip(weights, deltas):
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        j = min(k, _rank(S, delta.shape))
        Us.append(U[:, :j]), Ss.append(weight * S[:j]), Vhs.append(Vh[:j])
    return (_polar(torch.cat(Us, dim=1)) * torch.cat(Ss)) @ _polar(torch.cat(Vhs))


def dense_iso_c(deltas, weights):
    U, S, Vh = torch.linalg.svd(sum(w * d for w, d in zip(weights, deltas)), full_matrices=False)
    k = _rank(S, deltas[0].shape)
    return S[:k].mean() * U[:, :k] @ Vh[:k]


def dense_iso_cts(deltas, weights):
    U, S, Vh = torch.linalg.svd(sum(w * d for w, d in zip(weights, deltas)), full_matrices=False)
    k, tasks = _rank(S, deltas[0].shape), len(deltas)
    common = k - round((k - int(0.8 * k)) / tasks) * tasks
    Uc = U[:, :common]
    Us, Ss, Vhs = [], [], []
    for weight, delta in zip(weights, deltas):
        Ut, St, Vht = torch.linalg.svd(weight * delta - Uc @ (Uc.T @ (weight * delta)), full_matrices=False)
        j = min((k - common) // tasks, int((St > (weight * delta).norm() * max(delta.shape) * 2.2e-16).sum()))
        Us.append(Ut[:, :j]), Ss.append(St[:j]), Vhs.append(Vht[:j])
    Us.append(Uc), Ss.append(S[:common]), Vhs.append(Vh[:common])
    return torch.cat(Ss).mean() * _polar(torch.cat(Us, dim=1)) @ _polar(torch.cat(Vhs))


def dense_core_space(modules, weights, density=0.5):
    """The bases from the stacked factors (as the paper's code), the cores from the dense updates."""
    from lrtool.merge.sparsify import ties_merge

    U, S, _ = torch.linalg.svd(torch.cat([m.B.double() for m in modules], dim=1), full_matrices=False)
    U = U[:, : _rank(S, U.shape)]
    _, S, Vh = torch.linalg.svd(torch.cat([m.A.double() for m in modules]), full_matrices=False)
    Vh = Vh[: _rank(S, Vh.shape)]
    cores = [U.T @ m.delta() @ Vh.T for m in modules]
    return U @ ties_merge(cores, weights, density) @ Vh


def _exact_afresh(plan):
    plan.inputs["layers.0"].forget()
    return plan.exact("layers.0")


def bench_factored(tmp: Path) -> None:
    adapters = make_adapters(["layers.0"], seed=4)
    weights = [1 / ADAPTERS] * ADAPTERS
    modules = [a.modules["layers.0"] for a in adapters]
    references = {
        "tsv": lambda: dense_tsv([m.delta() for m in modules], weights),
        "iso-c": lambda: dense_iso_c([m.delta() for m in modules], weights),
        "iso-cts": lambda: dense_iso_cts([m.delta() for m in modules], weights),
        "core-space": lambda: dense_core_space(modules, weights),
    }
    print(
        f"\n3. factored vs dense: {ADAPTERS} adapters, rank {RANK}, one {WIDTH} x {WIDTH} module, weights "
        f"1/{ADAPTERS}; the dense reference forms every update and takes dense SVDs (once), the factored "
        "method best of 3"
    )
    print(f"   {'method':12}{'factored':>11}{'dense':>11}{'ratio':>9}{'rel. difference':>18}")
    for method, dense in references.items():
        plan = plan_merge(adapters, method, weights=weights)
        factored = best_of(3, functools.partial(_exact_afresh, plan))
        start = time.perf_counter()
        expected = dense()
        seconds = time.perf_counter() - start
        ours = plan.exact("layers.0").to_dense()
        difference = float((ours - expected).norm() / expected.norm())
        verdict = "met" if seconds / factored >= 20 and difference <= 1e-6 else "MISSED"
        print(
            f"   {method:12}{factored:>10.3f}s{seconds:>10.1f}s{seconds / factored:>8.0f}x{difference:>18.1e}"
            f"  (target >= 20x at <= 1e-6: {verdict})"
        )


def in_fresh_process(code: str) -> dict:
    """Run `code` in a new Python; it leaves its result in `result`; add its time and peak RSS.

    The peak is VmHWM of /proc/self/status: getrusage's ru_maxrss would carry this (large) process's peak
    over the fork into the child.
    """
    wrapper = (
        "import json, re, time\n"
        "start = time.perf_counter()\n"
        f"{code}\n"
        "result['seconds'] = time.perf_counter() - start\n"
        "status = open('/proc/self/status').read()\n"
        "result['peak_mb'] = int(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1)) / 1024\n"
        "print(json.dumps(result))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper], capture_output=True, text=True, cwd=REPO, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_into_base(tmp: Path) -> None:
    names = [f"layers.{i}" for i in range(BASE_WEIGHTS)]
    base = tmp / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "bench"}\n')
    generator = torch.Generator().manual_seed(2)
    per_shard = BASE_WEIGHTS // BASE_SHARDS
    weight_map = {}
    for shard in range(BASE_SHARDS):
        shard_name = f"model-{shard + 1:05d}-of-{BASE_SHARDS:05d}.safetensors"
        tensors = {
            f"{name}.weight": torch.randn(WIDTH, WIDTH, generator=generator) * 0.02
            for name in names[shard * per_shard : (shard + 1) * per_shard]
        }
        save_file(tensors, base / shard_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard_name))
        del tensors
    index = {"metadata": {"total_size": BASE_WEIGHTS * WIDTH * WIDTH * 4}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    adapters = []
    for i, adapter in enumerate(make_adapters(names, seed=3)):
        save_adapter(adapter, tmp / f"base-adapter-{i}")
        adapters.append(str(tmp / f"base-adapter-{i}"))
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))

    imports = in_fresh_process("import torch, lrtool.cli, lrtool.merge.run\nresult = {}")
    copy = in_fresh_process(
        "from pathlib import Path\nfrom safetensors import safe_open\n"
        "from safetensors.torch import save_file\n"
        f"base, out = Path({str(base)!r}), Path({str(tmp / 'copied-model')!r})\nout.mkdir()\n"
        "for shard in sorted(base.glob('*.safetensors')):\n"
        "    with safe_open(str(shard), framework='pt') as f:\n"
        "        tensors = {key: f.get_tensor(key) for key in f.keys()}\n"
        "    save_file(tensors, str(out / shard.name), metadata={'format': 'pt'})\n"
        "    del tensors\n"
        "result = {}"
    )
    merged = in_fresh_process(
        "from lrtool.cli import main\n"
        f"args = ['merge', *{adapters!r}, '--method', 'linear', '--into-base', {str(base)!r},\n"
        f"        '-o', {str(tmp / 'merged-model')!r}, '-q']\n"
        "try:\n    main(args)\nexcept SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
        "result = {}"
    )
    shard_mb, weight_mb = size / BASE_SHARDS / 1e6, WIDTH * WIDTH * 4 / 1e6
    print(
        f"\n4. --into-base: {ADAPTERS} adapters (linear) into a {size / 1e9:.2f} GB float32 base, "
        f"{BASE_WEIGHTS} weights of {weight_mb:.0f} MB in {BASE_SHARDS} shards of {shard_mb:.0f} MB"
    )
    print(f"   {'':34}{'time':>9}{'throughput':>12}{'peak RSS':>11}{'above imports':>15}")
    for label, run in (("read + write once (save_file)", copy), ("lrtool merge --into-base", merged)):
        print(
            f"   {label:34}{run['seconds']:>8.2f}s{size / run['seconds'] / 1e9:>8.2f} GB/s"
            f"{run['peak_mb']:>8.0f} MB{run['peak_mb'] - imports['peak_mb']:>12.0f} MB"
        )
    print(f"   (a process that only imports torch and lrtool peaks at {imports['peak_mb']:.0f} MB)")
    print(
        f"   ratio: --into-base takes {merged['seconds'] / copy['seconds']:.2f}x the time of reading and "
        "writing the model once (it also loads and hashes the adapters, hashes the base for lrtool.json, "
        "computes each update)"
    )


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        bench_svd(Path(tmp))
        bench_receipt(Path(tmp))
        bench_factored(Path(tmp))
        bench_into_base(Path(tmp))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
