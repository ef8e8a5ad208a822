"""Training: a LoRA (peft) or all weights (`full`) of a causal LM on JSONL datasets of prompt/answer lines.

Reads JSONL datasets (several train one adapter on their union), a base (a model directory, a hub id, or
`tiny[:PRESET]`: a new Llama made here), optionally a checkpoint to resume. Writes a PEFT directory (LoRA) or
a Hugging Face model directory with its tokenizer (`full`), plus train_log.jsonl, into a directory the
caller provides (the CLI's temporary one, which it renames into place with its lrtool.json). An interrupted
run leaves a checkpoint at the path the caller passes (the CLI's `OUT.ckpt/`) that `resume` continues from.

Runs unchanged under torchrun / accelerate launch: data-parallel with DDP (gloo on CPUs, nccl on GPUs), rank
0 writes. The modules, each importing only those above it:

    settings.py    TrainSettings: every knob, the one source of the CLI's options, defaults and checks
    checkpoint.py  save, load and recover the checkpoint (safetensors + JSON, swapped in atomically)
    output.py      the trained adapter or model, lrtool_seen_tokens.json, train_log.jsonl
    setup.py       device and processes, the data as tokens, the base loaded and wrapped in peft
    loop.py        the step loop: optimizer, schedule, DDP, interrupts between steps, divergence
"""

from collections.abc import Callable
from pathlib import Path

from lrtool.errors import QualityGateError
from lrtool.train.checkpoint import checkpoint_dir, recover_checkpoint, remove_checkpoint
from lrtool.train.loop import TrainResult, run_steps
from lrtool.train.output import SEEN_TOKENS, write_output
from lrtool.train.settings import DTYPES, INIT_CHOICES, LOSSES, MAX_SEED, SCHEDULES, TrainSettings
from lrtool.train.setup import Distributed, encode_line, pick_device, prepare

__all__ = [
    "DTYPES",
    "INIT_CHOICES",
    "LOSSES",
    "MAX_SEED",
    "SCHEDULES",
    "SEEN_TOKENS",
    "Distributed",
    "TrainResult",
    "TrainSettings",
    "check_reached",
    "checkpoint_dir",
    "encode_line",
    "pick_device",
    "recover_checkpoint",
    "remove_checkpoint",
    "train",
]


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

    s = settings.resolved()  # as it is when the caller resolved it already
    dist = Distributed.from_env()
    run = prepare(s, dist)
    checkpoint = checkpoint if checkpoint is not None else checkpoint_dir(Path(out))
    result, log_lines = run_steps(
        s, run, dist, checkpoint, resume=resume, on_progress=on_progress, on_step=on_step
    )
    if dist.is_main:
        write_output(Path(out), result.model, run.tokenizer, s, run.encoded, log_lines, result.summary())
    if dist.world_size > 1:
        torch.distributed.barrier()
    return result


def check_reached(result: TrainResult, settings: TrainSettings) -> None:
    """The --until-accuracy gate, checked once the output is in place: a complete output below the bar."""
    if result.reached is False:
        raise QualityGateError(
            f"exact match {result.accuracy:.3f} on the training sample is below --until-accuracy "
            f"{settings.until_accuracy} after {result.steps} steps; the output is written, but raise "
            "--max-steps/--epochs or --lr to reach it"
        )
