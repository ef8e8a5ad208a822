"""Benchmark: eval throughput of an Arrow top-2 router over 4, 8 and 16 adapters, against one adapter and
against peft's Arrow (`create_arrow_model`), on the same prompts.

Same base (the tiny Llama, pretrained here for a few steps), same prompts (a gen-data twohop split), random
rank-16 adapters on every linear layer, batches of 64 left-padded prompts. What is timed is eval's forward
pass over the prompts, the part every way shares (generation lengths would depend on what each system
predicts, which is not what is compared):

  one adapter        lrtool's engine, one adapter on every row
  arrow E            lrtool's engine with the Arrow top-2 router over E adapters (lrtool route's core)
  peft arrow E       peft's create_arrow_model (top-2), the same batches

Prints prompts per second and the ratios: arrow 8 / one adapter (target <= 1.3x the time), arrow 16 / arrow 4
(target: flat), peft arrow E / arrow E (target: lrtool faster at 8 and 16).

    .venv/bin/python benchmarks/route.py [--examples 256] [--threads 2] [--repeats 3]
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
sys.path.insert(0, str(REPO / "benchmarks"))
BATCH = 64
COUNTS = (4, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    from eval import random_adapters, world_and_base  # benchmarks/eval.py: the same set-up
    from peft import ArrowConfig, create_arrow_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrtool.adapters import load_adapter
    from lrtool.decoding import left_padded, positions
    from lrtool.encoding import prompt_ids
    from lrtool.engine import AdapterEngine, OneAdapter, Plan
    from lrtool.routers.base import RoutingContext
    from lrtool.routers.build import build_router, load_for_eval

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = world_and_base(tmp)
        lines = (tmp / "world" / "twohop.jsonl").read_text().splitlines()[: options.examples]
        prompts = [json.loads(line)["prompt"] for line in lines]
        adapters = random_adapters(base, tmp, max(COUNTS), 16)
        for count in COUNTS:
            router = build_router([str(p) for p in adapters[:count]], "arrow", {"top_k": 2})
            (tmp / f"arrow{count}").mkdir()
            router.save(tmp / f"arrow{count}")
        tokenizer = AutoTokenizer.from_pretrained(base)
        peft_models = {
            count: create_arrow_model(
                AutoModelForCausalLM.from_pretrained(base),
                [str(p) for p in adapters[:count]],
                ArrowConfig(top_k=2, router_temperature=1.0, rng_seed=0),
            ).eval()
            for count in COUNTS
        }
        ids = [prompt_ids(tokenizer, prompt) for prompt in prompts]
        batches = [
            left_padded(ids[i : i + BATCH], tokenizer.pad_token_id, "cpu") for i in range(0, len(ids), BATCH)
        ]

        def forward(net, engine=None, part=None):
            with torch.inference_mode():
                for batch_ids, mask in batches:
                    inputs = dict(input_ids=batch_ids, attention_mask=mask, position_ids=positions(mask))
                    if engine is None:
                        net(**inputs, logits_to_keep=1)
                        continue
                    with engine.routing(Plan.by_row([part] * len(batch_ids))):
                        net(**inputs, logits_to_keep=1)

        # Each lrtool way gets its own model and engine, built (adapters read, router loaded) before the timer
        # starts, as peft's models are: only the forward passes are timed.
        def prepared_one_adapter():
            net = AutoModelForCausalLM.from_pretrained(base).eval()
            return net, AdapterEngine(net, [load_adapter(adapters[0])]), OneAdapter(0)

        def prepared_arrow(count: int):
            net = AutoModelForCausalLM.from_pretrained(base).eval()
            _, held, make_routing = load_for_eval(str(tmp / f"arrow{count}"))
            engine = AdapterEngine(net, held)
            part = make_routing(list(range(len(held))), RoutingContext(engine, net, tokenizer)).part([])
            return net, engine, part

        prepared = {"one adapter": prepared_one_adapter()}
        prepared.update({f"arrow {count}": prepared_arrow(count) for count in COUNTS})
        ways = {label: (lambda way=way: forward(*way)) for label, way in prepared.items()}
        ways.update(
            {f"peft arrow {count}": (lambda count=count: forward(peft_models[count])) for count in COUNTS}
        )
        best: dict[str, float] = {}
        for _ in range(options.repeats):  # alternate the ways; keep each one's best time
            for label, way in ways.items():
                start = time.perf_counter()
                way()
                best[label] = min(best.get(label, float("inf")), time.perf_counter() - start)
        for _, engine, _ in prepared.values():
            engine.close()

    print(
        f"tiny Llama, random rank-16 adapters on every linear layer, forward passes over {len(prompts)} "
        f"prompts, batch {BATCH}, {options.threads} threads, best of {options.repeats} alternating runs"
    )
    print(f"{'':20}{'seconds':>10}{'prompts/s':>12}")
    for label, seconds in best.items():
        print(f"{label:20}{seconds:10.3f}{len(prompts) / seconds:12.1f}")
    print(f"arrow 8 / one adapter, time: {best['arrow 8'] / best['one adapter']:.2f}x (target <= 1.3x)")
    print(f"arrow 16 / arrow 4, time: {best['arrow 16'] / best['arrow 4']:.2f}x (target: flat, ~1x)")
    for count in COUNTS:
        ratio = best[f"peft arrow {count}"] / best[f"arrow {count}"]
        print(f"peft arrow {count} / lrtool arrow {count}, time: {ratio:.2f}x (target > 1 at 8 and 16)")


if __name__ == "__main__":
    main()
