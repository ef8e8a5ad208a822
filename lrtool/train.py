"""Training: a LoRA (peft) or all weights (`full`) of a causal LM on JSONL datasets of prompt/answer lines.

Reads JSONL datasets (several train one adapter on their union), a base (a model directory, a hub id, or
`tiny[:PRESET]`: a new Llama made here), optionally a checkpoint to resume. Writes a PEFT directory (LoRA) or
a Hugging Face model directory with its tokenizer (`full`), plus train_log.jsonl and lrtool.json; the caller
provides the (temporary) directory. Interrupted runs leave `<out>.ckpt/` that `resume` continues from.

Runs unchanged under torchrun / accelerate launch: data-parallel with DDP (gloo on CPUs, nccl on GPUs).
`batch_size` is the global batch of one optimizer step, split over the ranks and then into `grad_accum`
micro-batches; the loss is the mean over the step's answer tokens whatever the split, so N processes give
the same update as one.
"""

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lrtool import io, outputs
from lrtool.errors import DivergedError, InputError, QualityGateError, UsageError, one_line
from lrtool.formatting import IGNORE, collate, encode_example, word_ids
from lrtool.kernels import dispatch
from lrtool.models import load_base, texts_of, tiny_preset

log = logging.getLogger(__name__)

INIT_CHOICES = ("default", "gaussian")  # peft's init_lora_weights that need no extra data or base rewrite
SCHEDULES = ("cosine", "constant")
LOSSES = ("answer", "all")
DTYPES = ("float32", "bfloat16", "float16")
SEEN_TOKENS = "lrtool_seen_tokens.json"  # written by --full: the token ids the model was trained on


@dataclass
class TrainSettings:
    """Every knob of a training run. Defaults suit the tiny base on a CPU (see the pilot in EXPERIMENT.md)."""

    data: list[str]
    base: str
    full: bool = False
    rank: int = 16
    alpha: float | None = None  # default 2 x rank
    rslora: bool = False
    dropout: float = 0.0
    targets: list[str] | None = None  # default: every linear layer of the blocks
    init: str = "default"
    train_tokens: str | None = None  # comma-separated words, a file of words, or "new"
    vocab_from: list[str] = field(default_factory=list)
    lr: float | None = None  # default 1e-3 full, 5e-4 LoRA
    weight_decay: float | None = None  # default 0.1 full, 0.0 LoRA
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None  # default 128 full, 64 LoRA
    grad_accum: int = 1
    warmup: int | None = None  # steps; default a tenth of the run
    schedule: str = "cosine"
    seed: int = 0
    device: str = "auto"
    dtype: str | None = None
    max_length: int = 256
    loss: str | None = None  # default "all" with --full, "answer" otherwise
    chat_template: bool = False
    until_accuracy: float | None = None
    check_every: int = 50
    check_sample: int = 256
    log_every: int = 10
    trust_remote_code: bool = False

    def resolved(self) -> "TrainSettings":
        """A copy with every default filled in and every value checked (UsageError names the flag)."""
        s = TrainSettings(**asdict(self))
        s.alpha = 2.0 * s.rank if s.alpha is None else s.alpha
        s.lr = (1e-3 if s.full else 5e-4) if s.lr is None else s.lr
        s.weight_decay = (0.1 if s.full else 0.0) if s.weight_decay is None else s.weight_decay
        s.batch_size = (128 if s.full else 64) if s.batch_size is None else s.batch_size
        s.loss = ("all" if s.full else "answer") if s.loss is None else s.loss
        if s.epochs is None and s.max_steps is None:
            s.epochs = 20.0
        for name in ("alpha", "dropout", "lr", "weight_decay", "epochs", "until_accuracy"):
            value = getattr(s, name)
            if value is not None and not math.isfinite(value):
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        checks = [
            (s.rank >= 0, "--rank must not be negative"),
            (s.alpha > 0 or s.rank == 0, "--alpha must be positive"),
            (0 <= s.dropout < 1, "--dropout must be in [0, 1)"),
            (s.lr > 0, "--lr must be positive"),
            (s.weight_decay >= 0, "--weight-decay must not be negative"),
            (s.epochs is None or s.epochs > 0, "--epochs must be positive"),
            (s.max_steps is None or s.max_steps > 0, "--max-steps must be positive"),
            (s.batch_size > 0, "--batch-size must be positive"),
            (s.grad_accum > 0, "--grad-accum must be positive"),
            (s.grad_accum <= s.batch_size, "--grad-accum cannot exceed --batch-size"),
            (s.warmup is None or s.warmup >= 0, "--warmup must not be negative"),
            (s.max_length > 1, "--max-length must be at least 2"),
            (s.until_accuracy is None or 0 < s.until_accuracy <= 1, "--until-accuracy must be in (0, 1]"),
            (s.check_every > 0 and s.check_sample > 0, "--check-every and --check-sample must be positive"),
            (s.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (s.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}"),
            (s.init in INIT_CHOICES, f"--init must be one of {', '.join(INIT_CHOICES)}"),
            (s.dtype is None or s.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}"),
            (bool(s.data), "give at least one DATA file"),
            (io.STDIO not in s.data, "train reads DATA more than once: give files, not '-' (stdin)"),
            (
                not s.vocab_from or bool(tiny_preset(s.base)),
                "--vocab-from builds the tokenizer of --base tiny; a real base keeps its own",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if s.full and s.train_tokens:
            raise UsageError("--train-tokens trains embedding rows beside a LoRA; --full trains every weight")
        if not s.full and s.rank == 0 and not s.train_tokens:
            raise UsageError("--rank 0 trains nothing: add --train-tokens, or give a rank")
        if not s.full and tiny_preset(s.base):
            raise UsageError(
                f"--base {s.base} makes a new, untrained model: pretrain it first with --full "
                "(lrtool train pretrain.jsonl --base tiny --full -o base/), then train on base/"
            )
        return s

    def fingerprint(self) -> str:
        """What a checkpoint must agree on to be resumed: every setting that changes the result."""
        settings = asdict(self)
        settings.pop("device")
        settings["data"] = [io.sha256_path(p) for p in self.data]
        settings["vocab_from"] = [io.sha256_path(p) for p in self.vocab_from]
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass
class TrainResult:
    steps: int
    examples: int
    loss: float
    accuracy: float | None
    seconds: float
    tokens_per_second: float
    reached: bool | None  # whether --until-accuracy was reached (None without it)
    model: object = field(default=None, repr=False, compare=False)  # the trained model, in memory

    def summary(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}


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


# A token is rarely longer than this many characters: a prompt of more than CHARS_PER_TOKEN x max_length
# characters is cut to its tail before tokenizing (what truncation keeps anyway), so a huge line costs no
# more than a long one; an answer that long cannot fit at all.
CHARS_PER_TOKEN = 32


def encode_line(tokenizer, prompt: str, answer: str, where: str, s: "TrainSettings", loss_on_prompt: bool):
    """encode_example of one line, with a huge prompt first cut to the tail truncation would keep."""
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


def step_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The example indices of optimizer step `step` (0-based): a seeded permutation per epoch, read in order.

    A pure function of the step, so a resumed run sees exactly the batches an uninterrupted one would.
    """
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        out.extend(_epoch_order(n, seed, epoch)[offset : offset + batch_size - len(out)])
    return out


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


# ---------------------------------------------------------------------------------------------- setup


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


def redraw_unseen_rows(model, seen: set[int], seed: int) -> int:
    """Give the embedding rows of tokens never trained the trained rows' statistics (Gaussian, per dim).

    A model made from scratch leaves such rows collapsed near one point (tied embeddings pull them alike),
    and a later LoRA then cannot tell the new names apart (the pilot in EXPERIMENT.md). Returns the count.
    """
    import torch

    weight = model.get_input_embeddings().weight
    unseen = sorted(set(range(weight.shape[0])) - seen)
    if not unseen or not seen:
        return 0
    with torch.no_grad():
        rows = weight[sorted(seen)].float()
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(unseen), weight.shape[1], generator=generator)
        weight[unseen] = (rows.mean(0) + noise * rows.std(0)).to(weight.dtype)
    return len(unseen)


# ---------------------------------------------------------------------------------------------- loop


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up, then constant or cosine decay to zero at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(
    settings: TrainSettings,
    out: Path,
    *,
    resume: bool = False,
    on_progress: Callable[[int, int, dict], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    checkpoint: Path | None = None,
) -> TrainResult:
    """Train, then write the result into `out` (a fresh directory the caller renames into place).

    `on_progress(step, total, metrics)` reports progress; `on_step(step)` runs after each optimizer step
    (tests use it to interrupt). On KeyboardInterrupt the state is saved to `checkpoint` (by default
    `checkpoint_dir(out)`; the CLI passes the one of the final output) first, and `resume` reads it.
    """
    import torch

    s = settings.resolved()
    dist = Distributed.from_env()
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
    if s.chat_template and not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"--chat-template: the tokenizer of {s.base} has no chat template (drop the flag)")
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
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=s.lr, weight_decay=s.weight_decay)
    steps_total = s.max_steps or max(1, math.ceil(s.epochs * len(examples) / s.batch_size))
    warmup = s.warmup if s.warmup is not None else steps_total // 10
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_total, warmup, s.schedule)
    )
    ddp_model = model
    if dist.world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    # Accuracy is greedy exact match on the answer, whatever --loss trains on.
    sample = _check_sample(len(examples), s.check_sample, s.seed)
    check_encoded = [encode_line(tokenizer, *examples[i], origins[i], s, False) for i in sample]
    check_encoded = _truncate(check_encoded, [origins[i] for i in sample], s.max_length, warn=False)
    ckpt = checkpoint if checkpoint is not None else checkpoint_dir(out)
    log_lines: list[dict] = []
    step = 0
    if resume:
        step, log_lines = load_checkpoint(ckpt, s, model, optimizer, scheduler)
        log.info("resuming from %s at step %d of %d", ckpt, step, steps_total)

    started, tokens_seen, last_loss, accuracy, reached = time.perf_counter(), 0, float("nan"), None, None
    at_boundary = True  # the state is that of a whole number of steps: safe to checkpoint
    try:
        with _interrupts_between_steps() as stop:
            while step < steps_total:
                at_boundary = False
                batch_rows = step_indices(step, s.batch_size, len(examples), s.seed)
                step_tokens = sum(sum(1 for x in encoded[i][1][1:] if x != IGNORE) for i in batch_rows)
                mine = batch_rows[dist.rank :: dist.world_size]
                chunks = [mine[k :: s.grad_accum] for k in range(s.grad_accum)]
                chunks = [c for c in chunks if c]
                loss_sum = torch.zeros((), device=device)
                for k, chunk in enumerate(chunks):
                    batch = {
                        key: t.to(device)
                        for key, t in collate([encoded[i] for i in chunk], tokenizer.pad_token_id).items()
                    }
                    sync = k == len(chunks) - 1 or dist.world_size == 1
                    context = ddp_model.no_sync() if not sync else contextlib.nullcontext()
                    with context:
                        token_loss = _token_loss_sum(ddp_model, batch)
                        (token_loss * dist.world_size / max(1, step_tokens)).backward()
                    loss_sum += token_loss.detach()
                    tokens_seen += int(batch["attention_mask"].sum())
                if dist.world_size > 1:
                    torch.distributed.all_reduce(loss_sum)
                if not math.isfinite(float(loss_sum)):  # before the step: the weights are still finite
                    raise _diverged(f"the loss is {float(loss_sum)} at step {step + 1}", s)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                at_boundary = True
                last_loss = float(loss_sum) / max(1, step_tokens)
                elapsed = time.perf_counter() - started
                metrics = {
                    "step": step,
                    "loss": round(last_loss, 6),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": round(tokens_seen * dist.world_size / max(elapsed, 1e-9), 1),
                }
                if step % s.log_every == 0 or step == steps_total:
                    log_lines.append(metrics)
                if s.until_accuracy is not None and (step % s.check_every == 0 or step == steps_total):
                    accuracy = _accuracy(model, check_encoded, tokenizer.pad_token_id, device)
                    if dist.world_size > 1:  # every rank follows rank 0's decision, or one would wait forever
                        shared = torch.tensor([accuracy], dtype=torch.float64, device=device)
                        torch.distributed.broadcast(shared, src=0)
                        accuracy = float(shared)
                    log_lines.append(
                        {
                            "step": step,
                            "check": "exact_match",
                            "accuracy": round(accuracy, 6),
                            "sample": len(check_encoded),
                        }
                    )
                    log.debug(
                        "step %d: exact match %.3f on %d training examples",
                        step,
                        accuracy,
                        len(check_encoded),
                    )
                    if accuracy >= s.until_accuracy:
                        reached = True
                        break
                if on_progress:
                    on_progress(step, steps_total, {**metrics, "accuracy": accuracy})
                if on_step:
                    on_step(step)
                if _stop_requested(stop, dist, device):
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        if dist.is_main and not at_boundary:
            log.warning(
                "interrupted twice inside step %d: no checkpoint (its state is half-updated)", step + 1
            )
        elif dist.is_main:
            save_checkpoint(ckpt, s, model, optimizer, scheduler, step, log_lines)
            log.warning(
                "interrupted at step %d of %d; checkpoint kept in %s (rerun with --resume)",
                step,
                steps_total,
                ckpt,
            )
        raise
    if s.until_accuracy is not None and reached is None:
        reached = False
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad):
        raise _diverged(f"the weights hold NaN or infinite values after step {step}", s)
    seconds = time.perf_counter() - started
    result = TrainResult(
        step,
        len(examples),
        last_loss,
        accuracy,
        seconds,
        tokens_seen * dist.world_size / max(seconds, 1e-9),
        reached,
        model=model,
    )
    if dist.is_main:
        _write_output(out, model, tokenizer, s, encoded, log_lines, result)
    if dist.world_size > 1:
        torch.distributed.barrier()
    return result


def _diverged(what: str, s: TrainSettings) -> DivergedError:
    lower = f"--lr (now {s.lr:g})" + ("" if s.full else f" or --alpha (now {s.alpha:g})")
    return DivergedError(f"training diverged: {what}; nothing was written: lower {lower} and rerun")


def check_reached(result: TrainResult, settings: TrainSettings) -> None:
    """The --until-accuracy gate, checked once the output is in place: a complete output below the bar."""
    if result.reached is False:
        raise QualityGateError(
            f"exact match {result.accuracy:.3f} on the training sample is below --until-accuracy "
            f"{settings.until_accuracy} after {result.steps} steps; the output is written, but raise "
            "--max-steps/--epochs or --lr to reach it"
        )


@contextlib.contextmanager
def _interrupts_between_steps():
    """Ctrl-C and SIGTERM during training set a flag that the loop obeys between optimizer steps, so the
    checkpoint holds a whole step (an exception between optimizer.step() and the step count would make the
    resumed run diverge). A second signal raises at once, for a step that never ends."""
    import signal
    import threading

    stop = {"requested": False}
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_requested(stop: dict, dist: "Distributed", device) -> bool:
    """Whether any process was asked to stop (all of them stop at the same step boundary)."""
    if dist.world_size == 1:
        return stop["requested"]
    import torch

    flag = torch.tensor([1.0 if stop["requested"] else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _token_loss_sum(model, batch):
    """Sum of cross-entropy over the batch's answer tokens (the caller divides by the step's token count)."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Shift the labels, not the logits: slicing the logits would copy the largest tensor of the step.
    labels = batch["labels"]
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )


def _accuracy(model, encoded, pad_id, device) -> float:
    from lrtool.scoring import exact_match

    hits = exact_match(model, encoded, pad_id, device=device)
    return sum(hits) / len(hits)


def _check_sample(n: int, size: int, seed: int) -> list[int]:
    import random

    rows = list(range(n))
    random.Random(seed).shuffle(rows)
    return sorted(rows[:size])


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


# ---------------------------------------------------------------------------------------------- output


def _write_output(out: Path, model, tokenizer, s: TrainSettings, encoded, log_lines, result):
    if s.full:
        seen = {i for ids, _ in encoded for i in ids}
        if tiny_preset(s.base):
            redrawn = redraw_unseen_rows(model, seen, s.seed)
            log.info("gave %d never-trained embedding rows the trained rows' statistics", redrawn)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / SEEN_TOKENS).write_text(json.dumps({"token_ids": sorted(seen)}) + "\n")
    else:
        model.save_pretrained(out)
        _sort_sets(out / "adapter_config.json")
    with open(out / "train_log.jsonl", "w", encoding="utf-8") as handle:
        io.write_jsonl(log_lines + [{"final": result.summary()}], handle)


def _sort_sets(config_file: Path) -> None:
    """peft writes the sets of its config (target_modules) in set order, which changes with the hash
    seed: sort them, so that the same run gives the same bytes. Written as peft writes it (indent 2, sorted
    keys)."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def checkpoint_dir(final: Path) -> Path:
    return final.with_name(final.name + ".ckpt")


def remove_checkpoint(final: Path) -> None:
    """Drop the checkpoint of a run whose output is now in place."""
    import shutil

    shutil.rmtree(checkpoint_dir(final), ignore_errors=True)


CHECKPOINT_FILES = ("checkpoint.json", "trainable.safetensors", "state.safetensors")


def save_checkpoint(ckpt: Path, s: TrainSettings, model, optimizer, scheduler, step: int, log_lines) -> None:
    """Trainable weights, optimizer, scheduler, RNG and step: what resume needs to continue exactly.

    Tensors go to safetensors and the rest to JSON (nothing is pickled). The new checkpoint is written
    beside the old one and swapped in by renames, so a kill at any moment leaves one complete checkpoint.
    """
    import shutil
    import tempfile

    import torch
    from safetensors.torch import save_file

    outputs.remove_stale_temporaries(ckpt)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ckpt.name}.{os.getpid()}.", suffix=".tmp", dir=ckpt.parent))
    try:
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, tmp / "trainable.safetensors")
        tensors: dict = {"rng": torch.get_rng_state()}
        state = {
            "optimizer": _without_tensors(optimizer.state_dict(), "optimizer", tensors),
            "scheduler": _without_tensors(scheduler.state_dict(), "scheduler", tensors),
        }
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "state.safetensors")
        meta = {"step": step, "fingerprint": s.fingerprint(), "log": log_lines, "state": state}
        (tmp / "checkpoint.json").write_text(io.dumps_line(meta) + "\n", encoding="utf-8")
        old = ckpt.with_name(f".{ckpt.name}.old-{os.getpid()}")
        if ckpt.exists():
            os.replace(ckpt, old)
        os.replace(tmp, ckpt)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_checkpoint(ckpt: Path) -> None:
    """Put back the previous checkpoint when a run was killed between the two renames of save_checkpoint."""
    if ckpt.exists():
        return
    for sibling in sorted(ckpt.parent.glob(f".{ckpt.name}.old-*")):
        if (sibling / "checkpoint.json").is_file():
            os.replace(sibling, ckpt)
            return


def load_checkpoint(ckpt: Path, s: TrainSettings, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Restore what save_checkpoint saved; refuse, naming the checkpoint, one that is damaged, pickled by an
    older lrtool, made with other settings, or holding non-finite weights."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    recover_checkpoint(ckpt)
    if not (ckpt / "checkpoint.json").is_file():
        raise UsageError(f"--resume: no checkpoint at {ckpt}")
    if (ckpt / "state.pt").exists() and not (ckpt / "state.safetensors").exists():
        raise InputError(
            f"{ckpt} was written by an older lrtool (a pickled state.pt, which lrtool never unpickles): "
            "delete it and rerun without --resume"
        )
    try:
        meta = json.loads((ckpt / "checkpoint.json").read_text(encoding="utf-8"))
        fingerprint, step, log_lines, state = meta["fingerprint"], meta["step"], meta["log"], meta["state"]
        trainable = load_file(ckpt / "trainable.safetensors")
        tensors = load_file(ckpt / "state.safetensors")
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise InputError(
            f"the checkpoint {ckpt} is damaged ({one_line(error)}): delete it, or rerun without --resume"
        ) from None
    if fingerprint != s.fingerprint():
        raise UsageError(
            f"--resume: {ckpt} was made with other data or settings; rerun with the same ones or remove it"
        )
    params = dict(model.named_parameters())
    if set(trainable) != {n for n, p in params.items() if p.requires_grad}:
        raise InputError(f"the checkpoint {ckpt} holds other weights than this run trains: delete it")
    if not all(
        bool(torch.isfinite(t).all())
        for t in [*trainable.values(), *tensors.values()]
        if t.is_floating_point()
    ):
        raise InputError(
            f"the checkpoint {ckpt} holds non-finite (NaN or infinite) values: training had diverged; "
            "delete it and rerun without --resume, with a lower --lr"
        )
    try:
        with torch.no_grad():
            for name, value in trainable.items():
                params[name].copy_(value)
        optimizer.load_state_dict(_with_tensors(state["optimizer"], tensors))
        scheduler.load_state_dict(_with_tensors(state["scheduler"], tensors))
        torch.set_rng_state(tensors["rng"])
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise InputError(
            f"the checkpoint {ckpt} is damaged ({one_line(error)}): delete it, or rerun without --resume"
        ) from None
    return step, log_lines


def _without_tensors(value, path: str, tensors: dict):
    """`value` as JSON-ready data: each tensor moved into `tensors` under its path and left as a reference,
    tuples and non-string dict keys tagged so that _with_tensors restores them exactly."""
    import torch

    if isinstance(value, torch.Tensor):
        tensors[path] = value
        return {"tensor": path}
    if isinstance(value, dict):
        return {"items": [[k, _without_tensors(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [_without_tensors(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_without_tensors(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _with_tensors(value, tensors: dict):
    if isinstance(value, dict):
        if "tensor" in value:
            return tensors[value["tensor"]]
        if "tuple" in value:
            return tuple(_with_tensors(v, tensors) for v in value["tuple"])
        return {k: _with_tensors(v, tensors) for k, v in value["items"]}
    if isinstance(value, list):
        return [_with_tensors(v, tensors) for v in value]
    return value
