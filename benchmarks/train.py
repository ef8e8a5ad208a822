"""Benchmark: `lrtool train` against a plain peft + transformers loop written the obvious way.

Same base (the tiny Llama, pretrained here for a few steps), same data (a gen-data hop1 split), same LoRA
(rank 16, all linear layers), batch, learning rate and number of steps, in one run. Prints answer tokens per
second of the training loop of each (set-up excluded on both sides) and their ratio.

    .venv/bin/python benchmarks/train.py [--steps 100] [--batch-size 64] [--threads 2] [--repeats 3]
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run(args: list[str]) -> None:
    from lrtool.cli import main

    try:
        main(args)
    except SystemExit as done:
        if done.code:
            raise


def plain_loop(base: Path, data: Path, steps: int, batch_size: int, lr: float) -> tuple[float, int]:
    """The obvious loop: tokenize each batch with padding, mask prompt and padding, pass labels."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(0)
    model.train()
    tokens = 0
    start = time.perf_counter()
    for _ in range(steps):
        batch = rng.sample(rows, batch_size)
        texts = [f"{r['prompt']} {r['answer']}{tokenizer.eos_token}" for r in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        for i, r in enumerate(batch):
            labels[i, : len(tokenizer(r["prompt"])["input_ids"])] = -100
        loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += int(enc["attention_mask"].sum())
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    from lrtool.train import TrainSettings, train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run(["gen-data", "two-hop", "--seed", "1", "-q", "-o", str(tmp / "world")])
        run(
            [
                "train",
                str(tmp / "world" / "pretrain.jsonl"),
                "--base",
                "tiny",
                "--full",
                "--vocab-from",
                str(tmp / "world"),
                "--max-steps",
                "20",
                "-q",
                "-o",
                str(tmp / "base"),
            ]
        )
        data = tmp / "world" / "hop1.jsonl"

        settings = TrainSettings(
            data=[str(data)],
            base=str(tmp / "base"),
            max_steps=options.steps,
            batch_size=options.batch_size,
            warmup=0,
            schedule="constant",
            lr=5e-4,
        )
        # Alternate the two and keep each one's best run: the machine's other load and warm-up effects
        # otherwise decide the ratio.
        ours_runs, plain_runs = [], []
        for repeat in range(options.repeats):
            plain_runs.append(plain_loop(tmp / "base", data, options.steps, options.batch_size, 5e-4))
            ours_runs.append(train(settings, tmp / f"ours{repeat}"))
        ours = max(ours_runs, key=lambda r: r.tokens_per_second)
        seconds, tokens = min(plain_runs)

    plain_rate = tokens / seconds
    print(
        f"tiny Llama (2.8M parameters), LoRA r16 all-linear, {options.steps} steps x batch "
        f"{options.batch_size}, {options.threads} threads"
    )
    print(f"best of {options.repeats} alternating runs each")
    print(f"{'':24}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'lrtool train':24}{ours.seconds:10.2f}{ours.tokens_per_second:12.0f}")
    print(f"{'plain peft loop':24}{seconds:10.2f}{plain_rate:12.0f}")
    print(f"ratio (lrtool / plain): {ours.tokens_per_second / plain_rate:.2f}x tokens per second")


if __name__ == "__main__":
    main()
