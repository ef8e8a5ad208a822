"""Centroid: retrieval-style selection, per example, by the base's hidden states.

Built from a few examples per adapter (`examples ADAPTER=FILE.jsonl`): each adapter's centroid is the mean,
over its examples, of the base's hidden state at `layer` (default: the last) averaged over the prompt's
tokens. An input goes to the `top_k` adapters whose centroids have the highest cosine with its own mean
hidden state, weighted by softmax(cosine / temperature); every token of the example uses that mixture.
Reads the base and the example files; writes `centroids` [adapters, hidden] (float32).
"""

from __future__ import annotations

import torch

from lrtool.errors import UsageError
from lrtool.routers.base import (
    CHAT_TEMPLATE,
    BuildInputs,
    Parameter,
    Router,
    RouterMethod,
    Routing,
    RoutingContext,
    RowMixture,
    adapter_named,
)


def parse_examples(items: list[str], names: list[str]) -> dict[str, str]:
    """`ADAPTER=FILE.jsonl` items -> {adapter name: file}; every adapter needs its examples."""
    files = {}
    for item in items:
        adapter, equals, path = item.partition("=")
        if not equals or not path.strip():
            raise UsageError(f"--examples takes ADAPTER=FILE.jsonl for router centroid; got {item!r}")
        files[adapter_named(adapter, names, f"--examples {item}")] = path.strip()
    missing = [n for n in names if n not in files]
    if missing:
        raise UsageError(f"router centroid needs --examples for every adapter; none for {', '.join(missing)}")
    return files


def build(inputs: BuildInputs) -> tuple[dict, dict[str, torch.Tensor]]:
    from lrtool.decoding import mean_hidden_states
    from lrtool.encoding import check_chat_template, prompt_ids
    from lrtool.io import read_jsonl
    from lrtool.models import load_base

    top_k, temperature = int(inputs.option("top_k", 1)), float(inputs.option("temperature", 1.0))
    layer = int(inputs.option("layer", -1))
    names = [ref.name for ref in inputs.refs]
    if not 1 <= top_k <= len(names):
        raise UsageError(f"--top-k must be between 1 and the {len(names)} adapters, got {top_k}")
    if not temperature > 0:
        raise UsageError("--temperature must be positive")
    files = parse_examples(list(inputs.option("examples", [])), names)
    chat_template = bool(inputs.option("chat_template", False))
    model, tokenizer = load_base(inputs.base)
    check_chat_template(tokenizer, chat_template, inputs.base)
    model.eval()
    centroids = []
    with torch.inference_mode():
        for name in names:
            prompts = [prompt_ids(tokenizer, obj["prompt"], chat_template) for obj in read_jsonl(files[name])]
            if not prompts:
                raise UsageError(f"--examples {name}={files[name]}: no examples")
            hidden = mean_hidden_states(model, prompts, pad_id=tokenizer.pad_token_id, layer=layer)
            centroids.append(hidden.mean(0))
            inputs.log(f"centroid of {name}: {len(prompts)} examples")
    parameters = {"top_k": top_k, "temperature": temperature, "layer": layer, "examples": files}
    if chat_template:  # recorded only when used: routers built without it keep their bytes
        parameters["chat_template"] = True
    return parameters, {"centroids": torch.stack(centroids)}


class CentroidRouting(Routing):
    """Per batch: the base's mean hidden states of the rows' prompts, cosines to the centroids, top-k."""

    def __init__(self, router: Router, slots: list[int], context: RoutingContext):
        self.context, self.slots = context, torch.tensor(slots)
        self.centroids = torch.nn.functional.normalize(router.tensor("centroids").float(), dim=1)
        self.top_k = int(router.parameters["top_k"])
        self.temperature = float(router.parameters["temperature"])
        self.layer = int(router.parameters["layer"])

    def choose(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(engine slots [n, k], weights [n, k]) for prompts (token ids), from the base alone."""
        from lrtool.decoding import mean_hidden_states

        with self.context.engine.routing(None):
            hidden = mean_hidden_states(
                self.context.model, prompts, pad_id=self.context.tokenizer.pad_token_id, layer=self.layer
            )
        cosines = torch.nn.functional.normalize(hidden.cpu(), dim=1) @ self.centroids.T
        top, chosen = cosines.topk(min(self.top_k, cosines.shape[1]), dim=1)
        return self.slots[chosen], torch.softmax(top / self.temperature, dim=1)

    def part(self, examples):
        indices, weights = self.choose([list(example.prompt) for example in examples])
        return RowMixture(indices, weights)


def routing(router: Router, slots: list[int], context: RoutingContext):
    return CentroidRouting(router, slots, context)


METHOD = RouterMethod(
    name="centroid",
    summary="per example, the top-k adapters whose examples' mean hidden state is nearest (cosine)",
    parameters=(
        Parameter("examples", [], "ADAPTER=FILE.jsonl, a few prompts per adapter (repeat for each adapter)"),
        Parameter("layer", -1, "the hidden layer compared (0 = the embeddings, -1 = the last)"),
        Parameter("top_k", 1, "adapters mixed per example"),
        Parameter("temperature", 1.0, "softmax temperature over the kept cosines"),
        CHAT_TEMPLATE,
    ),
    build=build,
    routing=routing,
    needs_base=True,
    per_token=False,
)
