"""`lrtool route --explain`: what a router decides for each example of a dataset.

Reads a router directory (lrtool.routers.build.load_for_eval), a base and JSONL datasets; yields one JSON
object per example: its dataset and line, and for a router that picks per example the adapters chosen
with their weights; for a per-token router, per layer (the target modules of one block, averaged) the mean
weight of each adapter over the prompt's tokens and each adapter's share of tokens as the top-1 choice.
Writes nothing itself (the CLI prints the lines). One forward pass of the prompts per batch.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import torch

from lrtool.engine import AdapterEngine, Plan, TokenRouter
from lrtool.routers.base import RoutingContext, RowMixture

log = logging.getLogger(__name__)
LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")  # a module's block: the path up to its first index


def explain(
    directory: str, data: list[str], base: str, batch_size: int = 64, chat_template: bool = False
) -> Iterator[dict]:
    from lrtool.adapters import match_module_names
    from lrtool.encoding import check_chat_template, prompt_ids_within
    from lrtool.evaluate.datasets import prompt_too_long, read_datasets
    from lrtool.models import load_base, module_names
    from lrtool.routers.build import load_for_eval, prompt_format_mismatch

    datasets = read_datasets(data)
    router, held, make_routing = load_for_eval(directory)
    mismatch = prompt_format_mismatch(router, chat_template)
    if mismatch:
        log.warning("router %s: %s", directory, mismatch)
    model, tokenizer = load_base(base)
    check_chat_template(tokenizer, chat_template, base)
    positions = getattr(model.config, "max_position_embeddings", None)
    model.eval()
    names = module_names(model)
    engine = AdapterEngine(model, [match_module_names(adapter, names) for adapter in held])
    routing = make_routing(list(range(len(held))), RoutingContext(engine, model, tokenizer))
    labels = router.names if len(held) == len(router.names) else [f"{router.method}"]
    weights_of = router.tensors.get("weights")
    for dataset in datasets:
        items = []
        for example in dataset.examples:
            ids = prompt_ids_within(tokenizer, example.prompt, chat_template, positions)
            if ids is None:
                raise prompt_too_long(dataset, example, positions)
            items.append(_Example(ids, example.meta, example.line))
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            with torch.inference_mode():  # a per-example router runs the base on the prompts
                part = routing.part(batch)
            base_line = {"router": router.method, "adapters": router.names}
            if isinstance(part, RowMixture):
                for row, example in enumerate(batch):
                    chosen = [
                        {"adapter": labels[int(i)] if int(i) >= 0 else None, "weight": float(w)}
                        for i, w in zip(part.indices[row], part.row_weights[row])
                    ]
                    yield {**base_line, "dataset": dataset.name, "line": example.line, "chosen": chosen}
            elif isinstance(part, TokenRouter):
                yield from _per_token(model, engine, part, batch, dataset.name, labels, tokenizer, base_line)
            else:  # one adapter for every row (lorahub's combined adapter)
                chosen = (
                    [{"adapter": n, "weight": float(w)} for n, w in zip(router.names, weights_of.tolist())]
                    if weights_of is not None
                    else [{"adapter": labels[0], "weight": 1.0}]
                )
                for example in batch:
                    yield {**base_line, "dataset": dataset.name, "line": example.line, "chosen": chosen}
    engine.close()


class _Example:
    def __init__(self, prompt: list[int], meta: dict, line: int):
        self.prompt, self.meta, self.line = prompt, meta, line


def _per_token(model, engine, part, batch, dataset, labels, tokenizer, base_line) -> Iterator[dict]:
    """Run the batch's prompts once, recording the router's choices at every module, and summarise per row."""
    from lrtool.decoding import left_padded, positions

    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    choose = part.weights

    def recording(module, x):
        indices, weights = choose(module, x)
        seen[module] = (indices.cpu(), weights.float().cpu())
        return indices, weights

    part.weights = recording
    ids, mask = left_padded(
        [example.prompt for example in batch], tokenizer.pad_token_id, next(model.parameters()).device
    )
    with torch.inference_mode(), engine.routing(Plan.by_row([part] * len(batch))):
        model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=1)
    part.weights = choose
    width, count = ids.shape[1], len(labels)
    real = mask.bool().cpu().reshape(-1)
    for row, example in enumerate(batch):
        layers: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for module, (indices, weights) in seen.items():
            rows = slice(row * width, (row + 1) * width)
            keep = real[rows]
            match = LAYER.match(module)
            layers.setdefault(match.group(1) if match else module, []).append(
                (indices[rows][keep], weights[rows][keep])
            )
        summary = []
        for layer, choices in layers.items():
            mean = torch.zeros(count, dtype=torch.float64)
            top1 = torch.zeros(count, dtype=torch.float64)
            for indices, weights in choices:
                valid = indices >= 0
                mean.index_add_(0, indices[valid], weights[valid].double())
                best = indices[torch.arange(len(indices)), weights.argmax(dim=1)]
                top1.index_add_(0, best[best >= 0], torch.ones(int((best >= 0).sum()), dtype=torch.float64))
            tokens = sum(len(indices) for indices, _ in choices)
            summary.append(
                {
                    "layer": layer,
                    "mean_weight": {labels[e]: float(mean[e]) / max(1, tokens) for e in range(count)},
                    "top1_share": {labels[e]: float(top1[e]) / max(1, tokens) for e in range(count)},
                }
            )
        yield {**base_line, "dataset": dataset, "line": example.line, "layers": summary}
