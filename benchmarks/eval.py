"""Benchmark: `lrtool eval` of 8 adapter systems against the obvious ways to do it with peft + transformers.

Same base (the tiny Llama, pretrained here for a few steps), same prompts (a gen-data twohop split), 8
random rank-16 adapters on every linear layer, greedy decoding of at most --max-new-tokens, batches of 64
rows, in one run. Every way scores each prompt under each adapter (8 x N rows) and prints rows per second:

  (a)  lrtool: the 8 systems as mixed batches of one base (lrtool.evaluate.run.score, adapter loading and
       tokenization included)
  (b)  peft: the 8 adapters loaded in one PeftModel, `set_adapter` per adapter, `generate` per batch
  (c)  peft: mixed batches, `generate(..., adapter_names=[...])` (peft's own mixed-batch forward)
  (d)  one merged model (`merge_and_unload`), `generate` over the same number of rows: the ceiling
  (d') lrtool's loop with 8 systems that are the base itself: lrtool's own ceiling (no adapter work)

and the ratios (a)/(b), (a)/(c), (a)/(d), (a)/(d'). (a) and (c) must predict the same tokens: checked.

    .venv/bin/python benchmarks/eval.py [--examples 256] [--adapters 8] [--threads 2] [--repeats 2]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BATCH = 64


def run(args: list[str]) -> None:
    import contextlib
    import io

    from lrtool.cli import main

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the output paths each verb prints
            main(args)
    except SystemExit as done:
        if done.code:
            raise


def random_adapters(base: Path, root: Path, count: int, rank: int) -> list[Path]:
    """`count` peft LoRAs of rank `rank` on every linear layer, with small seeded random factors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(count):
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        model.save_pretrained(root / f"adapter{i}")
        paths.append(root / f"adapter{i}")
    return paths


def hf_generate(model, tokenizer, prompts: list[str], max_new: int, adapter_names=None) -> list[list[int]]:
    """transformers' generate on left-padded batches of BATCH prompts (the obvious loop)."""
    outputs = []
    for start in range(0, len(prompts), BATCH):
        batch = prompts[start : start + BATCH]
        encoded = tokenizer(batch, return_tensors="pt", padding=True)
        extra = {"adapter_names": adapter_names[start : start + BATCH]} if adapter_names else {}
        with torch.inference_mode():
            out = model.generate(
                **encoded,
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **extra,
            )
        for row in out[:, encoded["input_ids"].shape[1] :].tolist():
            outputs.append(row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row)
    return outputs


def timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def world_and_base(tmp: Path) -> Path:
    """A two-hop world (seed 1) in tmp/world and the tiny base pretrained on it for 60 steps: tmp/base."""
    run(["gen-data", "two-hop", "--seed", "1", "-q", "-o", str(tmp / "world")])
    run(
        [
            "train", str(tmp / "world" / "pretrain.jsonl"), "--base", "tiny", "--full",
            "--vocab-from", str(tmp / "world"), "--max-steps", "60", "-q", "-o", str(tmp / "base"),
        ]
    )  # fmt: skip
    return tmp / "base"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrtool.evaluate.datasets import read_datasets
    from lrtool.evaluate.run import RunSettings, score
    from lrtool.evaluate.systems import SystemSpec

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = world_and_base(tmp)
        data = tmp / "data.jsonl"
        lines = (tmp / "world" / "twohop.jsonl").read_text().splitlines()[: options.examples]
        data.write_text("\n".join(lines) + "\n")
        prompts = [json.loads(line)["prompt"] for line in lines]
        adapters = random_adapters(base, tmp, options.adapters, options.rank)
        names = [f"adapter{i}" for i in range(options.adapters)]
        datasets = read_datasets([str(data)])
        settings = RunSettings(batch_size=BATCH, max_new_tokens=options.max_new_tokens, device="cpu")
        specs = [SystemSpec(n, "adapter", str(p)) for n, p in zip(names, adapters)]
        ceiling_specs = [SystemSpec(f"base{i}", "base") for i in range(options.adapters)]

        tokenizer = AutoTokenizer.from_pretrained(base)
        tokenizer.padding_side = "left"
        peft = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base), adapters[0], adapter_name=names[0]
        )
        for name, path in zip(names[1:], adapters[1:]):
            peft.load_adapter(path, adapter_name=name)
        peft.eval()
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[0])
        merged = merged.merge_and_unload().eval()
        rows_prompts = [p for _ in names for p in prompts]
        rows_adapters = [n for n in names for _ in prompts]

        def switching():
            out = []
            for name in names:
                peft.set_adapter(name)
                out += hf_generate(peft, tokenizer, prompts, options.max_new_tokens)
            return out

        ways = {
            "(a) lrtool mixed batch": lambda: score(str(base), specs, datasets, settings),
            "(b) peft set_adapter": switching,
            "(c) peft adapter_names": lambda: hf_generate(
                peft, tokenizer, rows_prompts, options.max_new_tokens, rows_adapters
            ),
            "(d) merged model": lambda: hf_generate(merged, tokenizer, rows_prompts, options.max_new_tokens),
            "(d') lrtool, no adapters": lambda: score(str(base), ceiling_specs, datasets, settings),
        }
        best: dict[str, float] = {}
        results = {}
        for _ in range(options.repeats):  # alternate the ways; keep each one's best time
            for label, way in ways.items():
                seconds, results[label] = timed(way)
                best[label] = min(best.get(label, float("inf")), seconds)

    ours = results["(a) lrtool mixed batch"]
    ours_predictions = [
        ours.outcomes[(s, 0, e)].prediction for s in range(len(names)) for e in range(len(prompts))
    ]
    theirs = [
        tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in results["(c) peft adapter_names"]
    ]
    same = sum(a == b for a, b in zip(ours_predictions, theirs))
    rows = len(names) * len(prompts)
    print(
        f"tiny Llama, {len(names)} random rank-{options.rank} adapters on every linear layer, "
        f"{len(prompts)} prompts x {len(names)} systems = {rows} rows, greedy up to {options.max_new_tokens} "
        f"new tokens, batch {BATCH}, {options.threads} threads; best of {options.repeats} alternating runs"
    )
    print(f"{'':28}{'seconds':>10}{'rows/s':>10}")
    for label, seconds in best.items():
        print(f"{label:28}{seconds:10.2f}{rows / seconds:10.1f}")
    a = best["(a) lrtool mixed batch"]
    for label, target in (("(b)", 4), ("(c)", 1.5), ("(d)", 0.9), ("(d')", None)):
        other = next(v for k, v in best.items() if k.startswith(label))
        goal = f" (target >= {target})" if target else ""
        print(f"ratio (a)/{label} rows per second: {other / a:.2f}x{goal}")
    print(f"(a) and (c) predict the same text for {same} of {rows} rows")


if __name__ == "__main__":
    main()
