"""The step loop: AdamW under a warm-up schedule, DDP across processes, interrupts between steps.

Reads a checkpoint to resume from (checkpoint.load_checkpoint) and, on Ctrl-C or SIGTERM, writes one at the
path the caller passes (rank 0 only; checkpoint.save_checkpoint). Writes nothing else: the caller writes the
output. `batch_size` is the global batch of one optimizer step, split over the ranks and then into
`grad_accum` micro-batches; the loss is the mean over the step's answer tokens whatever the split, so N
processes give the same update as one. A loss or weight that is not finite stops the run (DivergedError)
before anything is written.
"""

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from lrtool.encoding import IGNORE, collate
from lrtool.errors import DivergedError
from lrtool.train.checkpoint import load_checkpoint, save_checkpoint
from lrtool.train.settings import TrainSettings
from lrtool.train.setup import Distributed, Prepared

log = logging.getLogger(__name__)


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


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up, then constant or cosine decay to zero at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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


def run_steps(
    s: TrainSettings,
    run: Prepared,
    dist: Distributed,
    checkpoint: Path,
    *,
    resume: bool = False,
    on_progress: Callable[[int, int, dict], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[TrainResult, list[dict]]:
    """Train `run.model` for the run's steps (from the checkpoint's step with `resume`); return the result
    and the log lines train_log.jsonl holds. On KeyboardInterrupt, rank 0 saves `checkpoint` first."""
    import torch

    model, device = run.model, run.device
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=s.lr, weight_decay=s.weight_decay)
    steps_total = s.max_steps or max(1, math.ceil(s.epochs * run.examples / s.batch_size))
    warmup = s.warmup if s.warmup is not None else steps_total // 10
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_total, warmup, s.schedule)
    )
    ddp_model = model
    if dist.world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    log_lines: list[dict] = []
    step = 0
    if resume:
        step, log_lines = load_checkpoint(checkpoint, s.fingerprint(), model, optimizer, scheduler)
        log.info("resuming from %s at step %d of %d", checkpoint, step, steps_total)

    started, tokens_seen, last_loss, accuracy, reached = time.perf_counter(), 0, float("nan"), None, None
    at_boundary = True  # the state is that of a whole number of steps: safe to checkpoint
    try:
        with _interrupts_between_steps() as stop:
            while step < steps_total:
                at_boundary = False
                loss_sum, step_tokens, tokens = _gradients(ddp_model, run, s, dist, step)
                tokens_seen += tokens
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
                    accuracy = _shared_accuracy(model, run, dist)
                    log_lines.append(
                        {
                            "step": step,
                            "check": "exact_match",
                            "accuracy": round(accuracy, 6),
                            "sample": len(run.check_encoded),
                        }
                    )
                    log.debug(
                        "step %d: exact match %.3f on %d training examples",
                        step,
                        accuracy,
                        len(run.check_encoded),
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
            save_checkpoint(checkpoint, s.fingerprint(), model, optimizer, scheduler, step, log_lines)
            log.warning(
                "interrupted at step %d of %d; checkpoint kept in %s (rerun with --resume)",
                step,
                steps_total,
                checkpoint,
            )
        raise
    if s.until_accuracy is not None and reached is None:
        reached = False
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad):
        raise _diverged(f"the weights hold NaN or infinite values after step {step}", s)
    seconds = time.perf_counter() - started
    result = TrainResult(
        step,
        run.examples,
        last_loss,
        accuracy,
        seconds,
        tokens_seen * dist.world_size / max(seconds, 1e-9),
        reached,
        model=model,
    )
    return result, log_lines


def _gradients(ddp_model, run: Prepared, s: TrainSettings, dist: Distributed, step: int):
    """Backward over this rank's share of step `step`, micro-batch by micro-batch (DDP syncs on the last).

    Returns the loss summed over the whole step's answer tokens (all ranks), their count, and the tokens
    this rank read."""
    import torch

    device, encoded = run.device, run.encoded
    batch_rows = step_indices(step, s.batch_size, run.examples, s.seed)
    step_tokens = sum(sum(1 for x in encoded[i][1][1:] if x != IGNORE) for i in batch_rows)
    mine = batch_rows[dist.rank :: dist.world_size]
    chunks = [mine[k :: s.grad_accum] for k in range(s.grad_accum)]
    chunks = [c for c in chunks if c]
    loss_sum, tokens = torch.zeros((), device=device), 0
    for k, chunk in enumerate(chunks):
        rows = collate([encoded[i] for i in chunk], run.tokenizer.pad_token_id)
        batch = {key: t.to(device) for key, t in rows.items()}
        sync = k == len(chunks) - 1 or dist.world_size == 1
        context = ddp_model.no_sync() if not sync else contextlib.nullcontext()
        with context:
            token_loss = _token_loss_sum(ddp_model, batch)
            (token_loss * dist.world_size / max(1, step_tokens)).backward()
        loss_sum += token_loss.detach()
        tokens += int(batch["attention_mask"].sum())
    if dist.world_size > 1:
        torch.distributed.all_reduce(loss_sum)
    return loss_sum, step_tokens, tokens


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


def _shared_accuracy(model, run: Prepared, dist: Distributed) -> float:
    """Greedy exact match on the check sample; every rank follows rank 0's, or one would wait forever."""
    import torch

    from lrtool.scoring import exact_match

    hits = exact_match(model, run.check_encoded, run.tokenizer.pad_token_id, device=run.device)
    accuracy = sum(hits) / len(hits)
    if dist.world_size > 1:
        shared = torch.tensor([accuracy], dtype=torch.float64, device=run.device)
        torch.distributed.broadcast(shared, src=0)
        accuracy = float(shared)
    return accuracy


def _diverged(what: str, s: TrainSettings) -> DivergedError:
    lower = f"--lr (now {s.lr:g})" + ("" if s.full else f" or --alpha (now {s.alpha:g})")
    return DivergedError(f"training diverged: {what}; nothing was written: lower {lower} and rerun")


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


def _stop_requested(stop: dict, dist: Distributed, device) -> bool:
    """Whether any process was asked to stop (all of them stop at the same step boundary)."""
    if dist.world_size == 1:
        return stop["requested"]
    import torch

    flag = torch.tensor([1.0 if stop["requested"] else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())
