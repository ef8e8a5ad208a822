"""Score every system on every example: greedy predictions and, when asked, answer log-likelihoods.

Reads the base and every system (through lrtool.models and lrtool.adapters; peft:DIR through peft), holds
the base once with all adapter systems hooked into it (lrtool.engine), and runs each model system (model:,
peft:) as its own model. Rows are
(system, example) pairs: sorted by prompt length, cut into batches of `batch_size` rows holding whole
examples (every system's row of an example; a batch mixes systems and pads little), each batch's rows
ordered by system so every system's rows are one contiguous segment of the same size.
Under torchrun, rank r scores batches r, r + W, ...: the batches are the ones a single process makes, so the
numbers are too. Returns one `Outcome` per (system, dataset, example); writes nothing.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lrtool.errors import UsageError
from lrtool.evaluate.datasets import Dataset, candidate_pools, candidates_for, prompt_too_long, task_of
from lrtool.evaluate.systems import SystemSpec

log = logging.getLogger(__name__)

EXTRA_NEW_TOKENS = 16  # default --max-new-tokens: the longest answer (with EOS) plus this many


@dataclass
class Outcome:
    prediction: str | None = None
    correct: bool | None = None
    loglik: float | None = None  # sum of log p over the answer's tokens (EOS excluded)
    answer_tokens: int | None = None
    choice_correct: bool | None = None  # the answer's loglik beats every other candidate's


@dataclass
class RunSettings:
    exact: bool = True
    loglik: bool = False
    choices: str | None = None
    max_choices: int = 100
    batch_size: int = 64
    max_new_tokens: int | None = None
    chat_template: bool = False
    device: str = "auto"
    dtype: str | None = None
    seed: int = 0
    trust_remote_code: bool = False


@dataclass
class Loaded:
    """One model in memory and the systems that run on it (the part each applies to its rows)."""

    model: object
    tokenizer: object
    engine: object | None
    systems: list[tuple[int, object | None]]  # (system index, engine Part or None)


@dataclass
class Scored:
    outcomes: dict[tuple[int, int, int], Outcome]  # (system, dataset, example) -> outcome
    max_new_tokens: int | None
    described: list[dict] = field(default_factory=list)  # per system: what was loaded


def score(
    base: str,
    specs: list[SystemSpec],
    datasets: list[Dataset],
    settings: RunSettings,
    on_progress: Callable[[int, int], None] | None = None,
) -> Scored:
    """Load the base and the systems, score each on each dataset (see the module's docstring)."""
    import torch

    from lrtool.models import tiny_preset
    from lrtool.train import Distributed, pick_device

    if tiny_preset(base):
        raise UsageError(f"--base {base} makes a new, untrained model; evaluate a trained base directory")
    pools = candidate_pools(datasets, settings.choices) if settings.loglik else {}
    dist = Distributed.from_env()
    device = pick_device(settings.device, dist)
    if dist.world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype = getattr(torch, settings.dtype) if settings.dtype else None
    runs, described = _load(base, specs, settings, device, dtype)
    jobs = [_Job(loaded, datasets, pools, settings) for loaded in runs]
    total = sum(job.size for job in jobs)
    done = 0

    def advance(rows: int) -> None:
        nonlocal done
        done += rows
        if on_progress:
            on_progress(done, total)

    outcomes: dict[tuple[int, int, int], Outcome] = {}
    with torch.inference_mode():
        for job in jobs:
            outcomes.update(job.run(dist, advance))
    if dist.world_size > 1:
        gathered = [None] * dist.world_size if dist.is_main else None
        torch.distributed.gather_object(outcomes, gathered, dst=0)
        if dist.is_main:
            outcomes = {key: value for part in gathered for key, value in part.items()}
    max_new = max((job.max_new_tokens for job in jobs), default=None) if settings.exact else None
    return Scored(outcomes, max_new, described)


def _load(base: str, specs: list[SystemSpec], settings: RunSettings, device, dtype):
    """The base with every adapter system hooked in, and each model system; what each system is."""
    from lrtool.adapters import check_computable, load_adapter, match_module_names
    from lrtool.engine import AdapterEngine, OneAdapter
    from lrtool.models import module_names
    from lrtool.routers.base import RoutingContext
    from lrtool.routers.build import load_for_eval, prompt_format_mismatch

    model, tokenizer = _model(base, settings, dtype, device)
    names = module_names(model)
    adapters, shared, described, runs, routers = [], [], [], [], []
    for index, spec in enumerate(specs):
        if spec.kind == "adapter":
            adapter = match_module_names(load_adapter(spec.path), names)
            check_computable(adapter)
            shared.append((index, OneAdapter(len(adapters))))
            adapters.append(adapter)
            described.append(
                {
                    "kind": "adapter",
                    "format": adapter.format,
                    "modules": len(adapter.modules),
                    "rank": adapter.rank,
                    "declared_base": adapter.base,
                }
            )
        elif spec.kind == "router":
            router, held, make_routing = load_for_eval(spec.path)
            mismatch = prompt_format_mismatch(router, settings.chat_template)
            if mismatch:
                log.warning("router %s: %s", spec.path, mismatch)
            slots = list(range(len(adapters), len(adapters) + len(held)))
            adapters.extend(match_module_names(adapter, names) for adapter in held)
            routers.append((index, slots, make_routing))
            shared.append((index, None))  # its routing, once the engine exists
            parameters = {k: v for k, v in router.parameters.items() if k != "search"}
            described.append(
                {
                    "kind": "router",
                    "method": router.method,
                    "adapters": router.names,
                    "parameters": parameters,
                }
            )
        elif spec.kind == "base":
            shared.append((index, None))
            described.append({"kind": "base"})
        elif spec.kind == "peft":
            other, other_tokenizer = _peft_model(base, spec.path, settings, dtype, device)
            runs.append(Loaded(other, other_tokenizer, None, [(index, None)]))
            described.append({"kind": "peft", "features": _peft_features(spec.path)})
        else:  # model
            other, other_tokenizer = _model(spec.path, settings, dtype, device)
            runs.append(Loaded(other, other_tokenizer, None, [(index, None)]))
            described.append({"kind": "model", "parameters": sum(p.numel() for p in other.parameters())})
    if shared:
        engine = AdapterEngine(model, adapters) if adapters else None
        context = RoutingContext(engine, model, tokenizer)
        routings = {index: make_routing(slots, context) for index, slots, make_routing in routers}
        shared = [(index, routings.get(index, part)) for index, part in shared]
        runs.insert(0, Loaded(model, tokenizer, engine, shared))
    return runs, described


def _model(path: str, settings: RunSettings, dtype, device):
    from lrtool.encoding import check_chat_template
    from lrtool.models import load_base

    model, tokenizer = load_base(path, trust_remote_code=settings.trust_remote_code, dtype=dtype)
    check_chat_template(tokenizer, settings.chat_template, path)
    model.to(device)
    model.eval()
    return model, tokenizer


def _peft_model(base: str, path: str, settings: RunSettings, dtype, device):
    """A fresh copy of the base with the PEFT adapter at `path` applied by peft and merged into it."""
    from peft import PeftModel

    from lrtool.errors import InputError

    model, tokenizer = _model(base, settings, dtype, "cpu")
    try:
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise InputError(f"peft:{path}: peft cannot apply it to {base}: {error}") from None
    model.to(device)
    model.eval()
    return model, tokenizer


def _peft_features(path: str) -> list[str]:
    """What the adapter's config holds beyond plain LoRA (trainable tokens, DoRA...), for the report."""
    from lrtool.adapters.grammar import CONFIG_FEATURES

    try:
        config = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [feature for key, feature in CONFIG_FEATURES if config.get(key)]


@dataclass
class _Item:
    dataset: int
    example: int
    prompt: list[int]  # the prompt's tokens
    candidates: list[list[int]]  # the answer's continuation tokens (EOS excluded) first, then the others
    answer: str  # stripped
    meta: dict  # the example's (routers that route by label read it)


class _Job:
    """Everything one loaded model scores: its systems x every example."""

    def __init__(self, loaded: Loaded, datasets: list[Dataset], pools: dict, settings: RunSettings):
        from lrtool.encoding import answers_after, prompt_ids_within

        self.loaded, self.settings = loaded, settings
        tokenizer, chat = loaded.tokenizer, settings.chat_template
        self.examples: list[_Item] = []
        longest, positions = 0, getattr(loaded.model.config, "max_position_embeddings", None)
        for d, dataset in enumerate(datasets):
            for e, example in enumerate(dataset.examples):
                head = prompt_ids_within(tokenizer, example.prompt, chat, positions)
                if head is None:
                    raise prompt_too_long(dataset, example, positions)
                texts = [example.answer]
                if settings.loglik:
                    pool = pools[(dataset.name, task_of(example))]
                    texts += candidates_for(dataset, example, pool, settings.max_choices, settings.seed)[1:]
                tails = answers_after(tokenizer, head, example.prompt, texts, chat)
                longest = max(longest, len(tails[0]))
                candidates = _distinct([tail[:-1] for tail in tails])  # without EOS
                self.examples.append(_Item(d, e, head, candidates, example.answer.strip(), example.meta))
        self.max_new_tokens = (
            settings.max_new_tokens if settings.max_new_tokens is not None else longest + EXTRA_NEW_TOKENS
        )
        for item in self.examples if positions is not None else []:  # room for what follows the prompt
            room = max(self.max_new_tokens if settings.exact else 0, *(len(c) + 1 for c in item.candidates))
            if len(item.prompt) + room > positions:
                dataset = datasets[item.dataset]
                raise prompt_too_long(
                    dataset, dataset.examples[item.example], positions, len(item.prompt), room
                )
        self.rows = [(s, i) for s, _ in loaded.systems for i in range(len(self.examples))]
        self.long_rows = [  # (system, example, candidate) scored by a teacher-forced pass of their own
            (s, i, c)
            for s, _ in loaded.systems
            for i, item in enumerate(self.examples)
            for c, ids in enumerate(item.candidates)
            if len(ids) != 1
        ]
        self.size = len(self.rows) + len(self.long_rows)

    def run(self, dist, advance) -> dict[tuple[int, int, int], Outcome]:
        from lrtool.decoding import continuation_logliks, greedy
        from lrtool.encoding import decode_answer

        loaded, settings = self.loaded, self.settings
        tokenizer = loaded.tokenizer
        stop_ids = _stop_ids(loaded.model, tokenizer)
        logliks: dict[tuple[int, int], dict[int, float]] = {}
        outcomes: dict[tuple[int, int], Outcome] = {}
        items = self.examples
        by_length = sorted(self.rows, key=lambda row: (len(items[row[1]].prompt), row[1], row[0]))
        systems = len(loaded.systems)
        for number, batch in enumerate(_batches(by_length, settings.batch_size, systems)):
            if number % dist.world_size != dist.rank:
                continue
            batch.sort(key=lambda row: row[0])  # one contiguous segment per system
            single = [[c for c, ids in enumerate(items[i].candidates) if len(ids) == 1] for _, i in batch]
            generated = greedy(
                loaded.model,
                [items[i].prompt for _, i in batch],
                pad_id=tokenizer.pad_token_id,
                stop_ids=stop_ids,
                max_new_tokens=self.max_new_tokens if settings.exact else 0,
                engine=loaded.engine,
                plan=self.plan([(s, i) for s, i in batch]),
                score_tokens=(
                    [[items[i].candidates[c][0] for c in cs] for (_, i), cs in zip(batch, single)]
                    if settings.loglik
                    else None
                ),
            )
            for row, (s, i) in enumerate(batch):
                outcome = outcomes.setdefault((s, i), Outcome())
                if settings.exact:
                    outcome.prediction = decode_answer(tokenizer, generated.tokens[row])
                    # Exact match: prediction and answer agree once surrounding whitespace is stripped.
                    outcome.correct = outcome.prediction.strip() == items[i].answer
                if settings.loglik:
                    logliks.setdefault((s, i), {}).update(zip(single[row], generated.scores[row]))
            advance(len(batch))
        by_length = sorted(
            self.long_rows, key=lambda r: (len(items[r[1]].prompt) + len(items[r[1]].candidates[r[2]]), r)
        )
        for number, batch in enumerate(_batches(by_length, settings.batch_size)):
            if number % dist.world_size != dist.rank:
                continue
            batch.sort(key=lambda row: row[0])
            values = continuation_logliks(
                loaded.model,
                [(items[i].prompt, items[i].candidates[c]) for _, i, c in batch],
                pad_id=tokenizer.pad_token_id,
                engine=loaded.engine,
                plan=self.plan([(s, i) for s, i, _ in batch]),
            )
            for (s, i, c), value in zip(batch, values):
                logliks.setdefault((s, i), {})[c] = value
            advance(len(batch))
        return self._finish(outcomes, logliks)

    def plan(self, rows: list[tuple[int, int]]):
        """The engine plan of a batch's (system, item) rows, sorted by system: each system's part, a router's
        made for the rows it routes."""
        from lrtool.engine import Plan
        from lrtool.routers.base import Routing

        parts, systems = [], dict(self.loaded.systems)
        for system, group in itertools.groupby(rows, key=lambda row: row[0]):
            mine = [self.examples[i] for _, i in group]
            entry = systems[system]
            part = entry.part(mine) if isinstance(entry, Routing) else entry
            parts.extend([part] * len(mine))
        return Plan.by_row(parts)

    def _finish(self, outcomes, logliks) -> dict[tuple[int, int, int], Outcome]:
        """Key outcomes by (system, dataset, example) and fill in what the scores say."""
        finished = {}
        for (s, i), outcome in outcomes.items():
            item = self.examples[i]
            if self.settings.loglik:
                scores = logliks[(s, i)]
                outcome.loglik = scores[0]
                outcome.answer_tokens = len(item.candidates[0])
                outcome.choice_correct = all(scores[0] > scores[c] for c in range(1, len(item.candidates)))
            finished[(s, item.dataset, item.example)] = outcome
        return finished


def _distinct(candidates: list[list[int]]) -> list[list[int]]:
    """The answer's tokens first, then each other candidate whose tokens differ from every earlier one (two
    strings that tokenize alike are one candidate: neither could beat the other)."""
    seen, kept = set(), []
    for ids in candidates:
        if tuple(ids) not in seen:
            seen.add(tuple(ids))
            kept.append(ids)
    return kept


def _batches(rows: list, size: int, group: int = 1) -> list[list]:
    """Consecutive runs of `size` rows, or of the largest multiple of `group` that fits (at least `group`):
    every system's rows of an example stay in one batch, so each system gets an equal segment."""
    size = max(group, size - size % group)
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def _stop_ids(model, tokenizer) -> set[int]:
    """The tokenizer's EOS (what train teaches to end an answer) and the model's own end-of-turn tokens."""
    stops = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        stops.add(configured)
    elif isinstance(configured, (list, tuple)):
        stops.update(configured)
    return {token for token in stops if token is not None}
