"""train's settings: one data model, the single source of `lrtool train`'s options, defaults and checks.

Reads and writes nothing (`fingerprint()` reads DATA and --vocab-from to hash them). Each field of
TrainSettings carries, in a `Flag`, what the command line shows of it: flags, help, metavar, choices, range,
and the rule that fills it when it is left unset (the defaults that depend on --full live here, beside the
help that describes them). lrtool/cli.py builds the train command's options from these fields and declares
none itself; `resolved()` fills and checks a copy, once. Imports no torch, peft or transformers: the CLI
imports this module to build its options, and `lrtool --help` must stay fast.
"""

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar

from lrtool import io
from lrtool.errors import UsageError
from lrtool.models import tiny_preset

INIT_CHOICES = ("default", "gaussian")  # peft's init_lora_weights that need no extra data or base rewrite
SCHEDULES = ("cosine", "constant")
LOSSES = ("answer", "all")
DTYPES = ("float32", "bfloat16", "float16")
MAX_SEED = 2**32 - 1  # seeds feed torch, numpy and random generators: one range that fits them all
FLAG = "lrtool.flag"  # the key of a field's Flag in its metadata


@dataclass(frozen=True)
class Flag:
    """How a setting is given on the command line; `flags` is () for the positional DATA argument."""

    flags: tuple[str, ...]
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    min: int | None = None  # an integer's range, checked by the command line and by resolved()
    max: int | None = None
    finite: bool = False  # a float: inf and nan parse as floats but are never a meaningful setting
    show_default: bool = True
    split: str | None = None  # the value is one string of items separated by this (--targets a,b)
    unset: Callable[[Any], Any] | None = None  # the value when left unset (None), from the other settings

    @property
    def name(self) -> str:
        """The flag errors name: the long one (DATA for the argument)."""
        return next((f for f in self.flags if f.startswith("--")), "DATA")

    def problem(self, value) -> str | None:
        """What is wrong with a (set) value by this flag's range and choices, as the error says it."""
        if self.min is not None and value < self.min:
            rules = {0: "must not be negative", 1: "must be positive"}
            return f"{self.name} {rules.get(self.min, f'must be at least {self.min}')}"
        if self.max is not None and value > self.max:
            return f"{self.name} must be at most {self.max}"
        if self.choices and value not in self.choices:
            return f"{self.name} must be one of {', '.join(self.choices)}"
        return None


def option(*flags: str, help: str, default: Any = MISSING, **cli: Any) -> Any:
    """A setting: its default (a list default is copied per instance) and its Flag."""
    metadata = {FLAG: Flag(flags, help, **cli)}
    if isinstance(default, list):
        return field(default_factory=default.copy, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainSettings:
    """Every knob of a training run, in the order `lrtool train --help` lists them. Defaults suit the tiny
    base on a CPU (see the pilot in EXPERIMENT.md); a field's `unset` rule reads only fields without one."""

    data: list[str] = option(
        metavar="DATA.jsonl...",
        help="JSONL datasets (files); several train one adapter on their union.",
        show_default=False,
    )
    base: str = option(
        "--base",
        help="Base model: a Hugging Face model directory, a hub id, or tiny / "
        "tiny:PRESET (micro, tiny, small, base) for a new Llama made here.",
    )
    full: bool = option(
        "--full", default=False, help="Train every weight (e.g. pretrain the tiny base) instead of a LoRA."
    )
    rank: int = option(
        "--rank", "-r", default=16, min=0, help="LoRA rank; 0 with --train-tokens trains only embedding rows."
    )
    alpha: float | None = option(
        "--alpha",
        default=None,
        finite=True,
        help="LoRA alpha (default: 2 x rank).",
        unset=lambda s: 2.0 * s.rank,
        show_default=False,
    )
    rslora: bool = option("--rslora", default=False, help="Scale by alpha / sqrt(rank) (rsLoRA).")
    dropout: float = option("--dropout", default=0.0, finite=True, help="LoRA dropout.")
    targets: list[str] | None = option(  # None: peft's "all-linear"
        "--targets",
        default=None,
        split=",",
        help="Comma-separated module names to adapt (default: every linear layer of the blocks).",
        show_default=False,
    )
    init: str = option(
        "--init",
        default="default",
        choices=INIT_CHOICES,
        help="LoRA initialisation (peft's init_lora_weights).",
    )
    train_tokens: str | None = option(
        "--train-tokens",
        default=None,
        metavar="WORDS|FILE|new",
        help="Also train these tokens' embedding "
        "rows: comma-separated words, a file of words, or new (tokens of DATA that the base "
        "never saw in pretraining).",
        show_default=False,
    )
    vocab_from: list[str] = option(
        "--vocab-from",
        default=[],
        metavar="PATH",
        help="With --base tiny: make every word of PATH "
        "one token; a directory means its .jsonl files (a gen-data world). Repeat for "
        "several.",
        show_default=False,
    )
    lr: float | None = option(
        "--lr",
        default=None,
        finite=True,
        help="Peak learning rate (default: 1e-3 with --full, 5e-4 LoRA).",
        unset=lambda s: 1e-3 if s.full else 5e-4,
        show_default=False,
    )
    weight_decay: float | None = option(
        "--weight-decay",
        default=None,
        finite=True,
        help="AdamW weight decay (default: 0.1 with --full, 0 LoRA).",
        unset=lambda s: 0.1 if s.full else 0.0,
        show_default=False,
    )
    epochs: float | None = option(
        "--epochs",
        default=None,
        finite=True,
        help="Passes over the data (default 20 unless --max-steps).",
        unset=lambda s: 20.0 if s.max_steps is None else None,
        show_default=False,
    )
    max_steps: int | None = option(
        "--max-steps", default=None, min=1, help="Optimizer steps (overrides --epochs).", show_default=False
    )
    batch_size: int | None = option(
        "--batch-size",
        default=None,
        min=1,
        help="Examples per optimizer step, over all processes (default: 128 with --full, 64 LoRA).",
        unset=lambda s: 128 if s.full else 64,
        show_default=False,
    )
    grad_accum: int = option(
        "--grad-accum",
        default=1,
        min=1,
        help="Split each step into this many micro-batches (same result, less memory).",
    )
    warmup: int | None = option(  # None: a tenth of the run, which the data's size decides (loop.py)
        "--warmup",
        default=None,
        min=0,
        help="Linear warm-up steps (default: a tenth of the run).",
        show_default=False,
    )
    schedule: str = option(
        "--schedule", default="cosine", choices=SCHEDULES, help="Learning-rate schedule after warm-up."
    )
    loss: str | None = option(
        "--loss",
        default=None,
        choices=LOSSES,
        help="Tokens with loss: answer (prompt masked; default) or all (plain corpora; default with --full).",
        unset=lambda s: "all" if s.full else "answer",
        show_default=False,
    )
    chat_template: bool = option(
        "--chat-template",
        default=False,
        help="Format prompt and answer with the base tokenizer's chat template (eval takes the same flag).",
    )
    until_accuracy: float | None = option(
        "--until-accuracy",
        default=None,
        finite=True,
        metavar="X",
        help="Stop once greedy exact match on a sample of "
        "the training examples reaches X; exit 3 if the run ends below it.",
        show_default=False,
    )
    check_every: int = option("--check-every", default=50, min=1, help="Steps between accuracy checks.")
    check_sample: int = option(
        "--check-sample", default=256, min=1, help="Training examples per accuracy check."
    )
    seed: int = option(
        "--seed",
        default=0,
        min=0,
        max=MAX_SEED,
        help="Seed of initialisation and data order: same seed, same bytes.",
    )
    device: str = option(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda[:N]",
        help="Where to train; auto picks CUDA when present.",
    )
    dtype: str | None = option(  # None: the base's
        "--dtype",
        default=None,
        choices=DTYPES,
        help="Weights' dtype (default: the base's).",
        show_default=False,
    )
    max_length: int = option(
        "--max-length",
        default=256,
        min=2,
        help="Longest line in tokens; longer prompts lose tokens on the left.",
    )
    log_every: int = option("--log-every", default=10, min=1, help="Steps between train_log.jsonl lines.")
    trust_remote_code: bool = option(
        "--trust-remote-code", default=False, help="Allow the base's own Python code (off by default)."
    )

    _resolved: ClassVar[bool] = False  # set on the copy resolved() returns (frozen: it stays true)

    def resolved(self) -> "TrainSettings":
        """A copy with every default filled in and every value checked (UsageError names the flag); settings
        that are resolved already come back as they are, so that the caller and train() may both ask."""
        if self._resolved:
            return self
        values = asdict(self)
        for f in fields(self):
            rule = f.metadata[FLAG].unset
            if rule is not None and values[f.name] is None:
                values[f.name] = rule(self)
        s = TrainSettings(**values)
        s._check()
        object.__setattr__(s, "_resolved", True)
        return s

    def _check(self) -> None:
        """Raise UsageError for the first value that is not finite, out of its Flag's range or choices, or
        wrong with the others (the floats' ranges are checked only here: the command line takes any finite
        float)."""
        s = self
        for f in fields(s):
            flag, value = f.metadata[FLAG], getattr(s, f.name)
            if flag.finite and value is not None and not math.isfinite(value):
                raise UsageError(f"{flag.name} must be a finite number, got {value}")
        for f in fields(s):
            flag, value = f.metadata[FLAG], getattr(s, f.name)
            problem = None if value is None else flag.problem(value)
            if problem:
                raise UsageError(problem)
        checks = [
            (s.alpha > 0 or s.rank == 0, "--alpha must be positive"),
            (0 <= s.dropout < 1, "--dropout must be in [0, 1)"),
            (s.lr > 0, "--lr must be positive"),
            (s.weight_decay >= 0, "--weight-decay must not be negative"),
            (s.epochs is None or s.epochs > 0, "--epochs must be positive"),
            (s.grad_accum <= s.batch_size, "--grad-accum cannot exceed --batch-size"),
            (s.until_accuracy is None or 0 < s.until_accuracy <= 1, "--until-accuracy must be in (0, 1]"),
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

    def fingerprint(self) -> str:
        """What a checkpoint must agree on to be resumed: every setting that changes the result."""
        settings = asdict(self)
        settings.pop("device")
        settings["data"] = [io.sha256_path(p) for p in self.data]
        settings["vocab_from"] = [io.sha256_path(p) for p in self.vocab_from]
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
