"""What a training run starts from: the device and processes, the examples as tokens, the model to train.

Reads the JSONL datasets (every file in full, FILE:LINE errors on bad lines), the base (models.load_base: a
model directory, a hub id, or a tiny Llama made here from DATA and --vocab-from) and, for --train-tokens new,
the base's lrtool_seen_tokens.json. Writes nothing. The model comes back on its device, wrapped in peft
unless --full, with its LoRA layers fused through lrtool.kernels on CUDA, in train mode.
"""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lrtool import io
from lrtool.encoding import CHARS_PER_TOKEN, IGNORE, check_chat_template, encode_example, word_ids
from lrtool.errors import InputError, UsageError
from lrtool.kernels import dispatch
from lrtool.models import load_base, texts_of, tiny_preset
from lrtool.train.output import SEEN_TOKENS
from lrtool.train.settings import TrainSettings

log = logging.getLogger(__name__)


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "Distributed":
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(spec: str, dist: Distributed):
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: no CUDA device is available")
        if dist.world_size > 1 and spec == "cuda":
            spec = f"cuda:{dist.local_rank}"
    elif spec != "cpu":
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {spec!r}")
    return torch.device(spec)


@dataclass
class Prepared:
    """The run's starting point: the model on its device, its tokenizer, every line as (ids, labels), and
    the lines the --until-accuracy check scores (encoded with the loss on the answer, whatever --loss)."""

    model: object
    tokenizer: object
    device: object
    examples: int
    encoded: list
    check_encoded: list


def prepare(s: TrainSettings, dist: Distributed) -> Prepared:
    """Pick the device, join the process group, read and encode the data, load and wrap the base.

    The order is that of the random draws: the seed, then the base (a tiny base is drawn here), then the
    LoRA's initialisation; the same settings give the same model."""
    import torch

    device = pick_device(s.device, dist)
    if dist.world_size > s.batch_size:
        raise UsageError(f"--batch-size {s.batch_size} is smaller than the {dist.world_size} processes")
    if dist.world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    examples, origins = read_examples(s.data)
    torch.manual_seed(s.seed)
    vocab = list(texts_of(s.data + s.vocab_from)) if tiny_preset(s.base) else ()
    model, tokenizer = load_base(
        s.base,
        vocab_texts=vocab,
        seed=s.seed,
        trust_remote_code=s.trust_remote_code,
        dtype=getattr(torch, s.dtype) if s.dtype else None,
    )
    check_chat_template(tokenizer, s.chat_template, s.base)
    encoded = [encode_line(tokenizer, p, a, w, s, s.loss == "all") for (p, a), w in zip(examples, origins)]
    encoded = _truncate(encoded, origins, s.max_length)
    token_ids = token_ids_for(s.train_tokens, tokenizer, s.base, examples) if s.train_tokens else None
    if not s.full:
        model = wrap_with_peft(model, s, token_ids)
    model.to(device)
    if not s.full and s.rank > 0 and dispatch.wanted(device):  # CUDA: the fused LoRA linear kernels
        from lrtool.kernels.lora_linear import fuse_peft_layers

        log.info("LoRA layers through the fused kernels: %d", fuse_peft_layers(model))
    model.train()
    # Accuracy is greedy exact match on the answer, whatever --loss trains on.
    sample = _check_sample(len(examples), s.check_sample, s.seed)
    check_encoded = [encode_line(tokenizer, *examples[i], origins[i], s, False) for i in sample]
    check_encoded = _truncate(check_encoded, [origins[i] for i in sample], s.max_length, warn=False)
    return Prepared(model, tokenizer, device, len(examples), encoded, check_encoded)


# ---------------------------------------------------------------------------------------------- data


def read_examples(paths: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(prompt, answer) of every line of every file, in order, and where each came from (FILE:LINE);
    FILE:LINE errors on bad lines. DATA is read more than once, so it must be regular files."""
    examples, origins = [], []
    for path in paths:
        file = Path(path)
        if file.is_dir():
            raise InputError(f"{path}: is a directory; give its JSONL files (e.g. {path}/hop1.jsonl)")
        if file.exists() and not file.is_file():
            raise InputError(
                f"{path}: is not a regular file (a pipe or device?); train reads its data more than once: "
                "save it to a file first"
            )
        if not file.exists():
            raise InputError(f"{path}: no such file")
        before = len(examples)
        for line, obj in io.read_jsonl_numbered(path):
            examples.append((obj["prompt"], obj["answer"]))
            origins.append(f"{path}:{line}")
        if len(examples) == before:
            raise InputError(f"{path}: no examples (the file is empty)")
    return examples, origins


def encode_line(tokenizer, prompt: str, answer: str, where: str, s: TrainSettings, loss_on_prompt: bool):
    """encode_example of one line. A prompt of more than CHARS_PER_TOKEN x max_length characters is first cut
    to its tail (what truncation keeps anyway), so a huge line costs no more than a long one; an answer that
    long cannot fit and is refused."""
    limit = CHARS_PER_TOKEN * s.max_length
    if len(answer) > limit:
        raise UsageError(
            f"{where}: the answer has {len(answer)} characters, more than --max-length {s.max_length} "
            "tokens can hold; raise --max-length or shorten the answer"
        )
    if len(prompt) > limit:
        tail = prompt[-limit:]
        space = tail.find(" ")  # start at a word boundary, as tokenizers split words
        prompt = tail[space + 1 :] if 0 <= space < len(tail) - 1 else tail
    return encode_example(
        tokenizer, prompt, answer, chat_template=s.chat_template, loss_on_prompt=loss_on_prompt
    )


def _truncate(encoded, origins: list[str], max_length: int, warn: bool = True):
    """Keep the answer whole and drop prompt tokens from the left where a line exceeds max_length.

    A line whose answer leaves no room for a prompt token is refused, naming FILE:LINE (with --loss all
    every token is "answer": plain corpora are cut on the left as they come)."""
    out, cut = [], 0
    for (ids, labels), where in zip(encoded, origins):
        answer = sum(1 for label in labels if label != IGNORE)
        if IGNORE in labels and answer >= max_length:
            raise UsageError(
                f"{where}: the answer is {answer} tokens, so --max-length {max_length} leaves no room for "
                "the prompt; raise --max-length"
            )
        if len(ids) > max_length:
            cut += 1
            ids, labels = ids[-max_length:], labels[-max_length:]
        out.append((ids, labels))
    if cut and warn:
        log.warning(
            "%d lines were longer than --max-length %d and lost prompt tokens on the left", cut, max_length
        )
    return out


def _check_sample(n: int, size: int, seed: int) -> list[int]:
    import random

    rows = list(range(n))
    random.Random(seed).shuffle(rows)
    return sorted(rows[:size])


# ---------------------------------------------------------------------------------------------- the model


def token_ids_for(spec: str, tokenizer, base: str, examples: list[tuple[str, str]]) -> list[int]:
    """The vocabulary rows --train-tokens names: comma-separated words, a file of words, or `new`."""
    from lrtool.models import WORD

    if spec == "new":
        seen_file = Path(base) / SEEN_TOKENS
        if not seen_file.is_file():
            raise UsageError(
                f"--train-tokens new needs {seen_file} (written by lrtool train --full); "
                "name the words instead"
            )
        seen = set(json.loads(seen_file.read_text())["token_ids"])
        used = {i for prompt, answer in examples for i in tokenizer(f"{prompt} {answer}")["input_ids"]}
        ids = sorted(used - seen - set(tokenizer.all_special_ids))
        if not ids:
            raise UsageError("--train-tokens new: every token of the data was seen in pretraining")
        return ids
    words = (
        sorted({w for text in texts_of([spec]) for w in WORD.findall(text)})
        if Path(spec).is_file()
        else [w.strip() for w in spec.split(",") if w.strip()]
    )
    ids = []
    for word in words:
        pieces = word_ids(tokenizer, word)
        if len(pieces) != 1:
            raise UsageError(
                f"--train-tokens: {word!r} is {len(pieces)} tokens in this base's vocabulary, "
                "not one (build the base with --vocab-from to make it one)"
            )
        ids.append(pieces[0])
    return sorted(set(ids))


def check_targets(model, targets: list[str]) -> None:
    """Refuse a --targets name that matches no module of the base (peft's own message is a traceback)."""
    import torch

    names = [name for name, _ in model.named_modules()]
    linear = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    )
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            raise UsageError(
                f"--targets {target}: the base has no module of that name (its linear layers: "
                f"{', '.join(linear)})"
            )


def wrap_with_peft(model, s: TrainSettings, token_ids: list[int] | None):
    from peft import LoraConfig, TrainableTokensConfig, get_peft_model

    embedding = model.get_input_embeddings()
    embedding_name = next(name for name, module in model.named_modules() if module is embedding)
    if s.rank == 0:
        config = TrainableTokensConfig(
            target_modules=[embedding_name.rsplit(".", 1)[-1]], token_indices=token_ids
        )
        return get_peft_model(model, config)
    targets = s.targets or "all-linear"
    if s.targets:
        check_targets(model, s.targets)
    config = LoraConfig(
        r=s.rank,
        lora_alpha=s.alpha,
        use_rslora=s.rslora,
        lora_dropout=s.dropout,
        target_modules=targets,
        init_lora_weights=True if s.init == "default" else s.init,
        task_type="CAUSAL_LM",
        trainable_token_indices={embedding_name.rsplit(".", 1)[-1]: token_ids} if token_ids else None,
    )
    return get_peft_model(model, config)
