"""Batched greedy generation and teacher-forced log-likelihoods for a causal LM, adapters applied by a plan.

Reads nothing from disk: takes a loaded model (and, for systems that share a base, the `AdapterEngine` with
the batch's `Plan`) and token ids made by lrtool.encoding. Rows are left-padded and positions counted from
each row's first real token, so padding never reaches attention or positions: a row's result does not
depend on what else is in its batch (up to float rounding). Generation keeps the KV cache, stops a row at
its first stop token (or after `max_new_tokens`) and drops finished rows once they are half the batch.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lrtool.engine import AdapterEngine, Plan


@dataclass
class Generated:
    tokens: list[list[int]]  # per row, the generated ids before the first stop token
    scores: list[list[float]] | None  # per row, log p(token | prompt) of the requested first tokens


@functools.cache
def _forward_arguments(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def _cache_argument(model) -> str:
    """transformers 5 calls the KV cache `cache`; earlier versions `past_key_values`."""
    return "cache" if "cache" in _forward_arguments(type(model)) else "past_key_values"


def left_padded(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position counted from its row's first real token (pads get 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _run(model, engine: AdapterEngine | None, plan: Plan | None, keep: int | None, **inputs):
    """One forward pass under `plan`; returns (logits of the last `keep` positions, the cache)."""
    if keep is not None and "logits_to_keep" in _forward_arguments(type(model)):
        inputs["logits_to_keep"] = keep
    routing = engine.routing(plan) if engine is not None else contextlib.nullcontext()
    with routing:
        out = model(**inputs)
    logits = out.logits if keep is None else out.logits[:, -keep:]
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    return logits, cache


def greedy(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    stop_ids: set[int],
    max_new_tokens: int,
    engine: AdapterEngine | None = None,
    plan: Plan | None = None,
    score_tokens: Sequence[Sequence[int]] | None = None,
) -> Generated:
    """Greedy continuations of `prompts` (token ids), each row under its part of `plan`.

    `score_tokens[i]` lists token ids whose log-probability as the first answer token of row i is returned
    (read off the prompt's forward pass, so single-token candidates cost nothing extra).
    """
    device = next(model.parameters()).device
    ids, mask = left_padded(prompts, pad_id, device)
    cache_argument = _cache_argument(model)
    logits, cache = _run(
        model,
        engine,
        plan,
        1,
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions(mask),
        use_cache=True,
    )
    last = logits[:, -1]
    scores = None
    if score_tokens is not None:
        logprobs = torch.log_softmax(last.float(), dim=-1).cpu()
        scores = [logprobs[i, list(tokens)].tolist() for i, tokens in enumerate(score_tokens)]
    tokens: list[list[int]] = [[] for _ in prompts]
    alive = list(range(len(prompts)))  # original row of each row still in the batch
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # has said a stop token
    stops = torch.tensor(sorted(stop_ids), device=device)
    for step in range(max_new_tokens):
        chosen = last.argmax(-1)
        stopped = torch.isin(chosen, stops)
        for row, token, ended in zip(alive, chosen.tolist(), (done | stopped).tolist()):
            if not ended:
                tokens[row].append(token)
        done |= stopped
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if 2 * int(done.sum()) >= len(alive):
            # Finished rows leave once they are half the batch: dropping each as it ends would cost a
            # cache copy per step and split the plan's even segments.
            keep = (~done).nonzero().flatten()
            cache.batch_select_indices(keep)
            mask, chosen, done = mask[keep], chosen[keep], done[keep]
            plan = plan.select(keep.tolist()) if plan is not None else None
            alive = [alive[i] for i in keep.tolist()]
        logits, cache = _run(
            model,
            engine,
            plan,
            1,
            input_ids=chosen[:, None],
            attention_mask=mask,
            position_ids=positions(mask)[:, -1:],
            use_cache=True,
            **{cache_argument: cache},
        )
        last = logits[:, -1]
    return Generated(tokens, scores)


def continuation_logliks(
    model,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int,
    engine: AdapterEngine | None = None,
    plan: Plan | None = None,
) -> list[float]:
    """sum_t log p(continuation_t | prompt, continuation_<t) of each (prompt ids, continuation ids) row.

    One teacher-forced pass: rows are left-padded so that every continuation ends at the last position.
    """
    device = next(model.parameters()).device
    ids, mask = left_padded([list(p) + list(c) for p, c in rows], pad_id, device)
    longest = max(len(c) for _, c in rows)
    logits, _ = _run(
        model,
        engine,
        plan,
        longest + 1,
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions(mask),
        use_cache=False,
    )
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # position j predicts the token at j + 1
    totals = []
    for i, (_, continuation) in enumerate(rows):
        n = len(continuation)
        targets = torch.tensor(list(continuation), device=device)
        predicted = logprobs[i, longest - n : longest]
        totals.append(float(predicted.gather(1, targets[:, None]).double().sum()))
    return totals


def mean_hidden_states(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    layer: int = -1,
    batch_size: int = 64,
) -> torch.Tensor:
    """[prompts, hidden]: each prompt's hidden state at `layer` (0 = the embeddings, -1 = the last layer),
    averaged over its tokens (float32; padding left out)."""
    device = next(model.parameters()).device
    means = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_padded(prompts[start : start + batch_size], pad_id, device)
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions(mask), output_hidden_states=True
        )
        hidden = out.hidden_states[layer].float()
        weights = mask.unsqueeze(-1).float()
        means.append((hidden * weights).sum(1) / weights.sum(1))
    return torch.cat(means)
