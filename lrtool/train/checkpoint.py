"""A training run's checkpoint: what --resume needs to continue exactly, at a path the caller passes.

Writes and reads a directory of three files: trainable.safetensors (the trained weights), state.safetensors
(the optimizer's and scheduler's tensors and torch's RNG state) and checkpoint.json (the step, the log so
far, the rest of the optimizer and scheduler state with references to those tensors, and the fingerprint of
the settings that made it). Nothing is pickled. A new checkpoint is written beside the old one and swapped
in by two renames, so a kill at any moment leaves one complete checkpoint; recover_checkpoint puts back the
old one when a kill fell between the renames. The CLI keeps it at `OUT.ckpt/` (checkpoint_dir) and removes
it once OUT is in place. Knows nothing of the settings beyond their fingerprint.
"""

import json
import os
import shutil
from pathlib import Path

from lrtool import io, outputs
from lrtool.errors import InputError, UsageError, one_line

CHECKPOINT_FILES = ("checkpoint.json", "trainable.safetensors", "state.safetensors")


def checkpoint_dir(final: Path) -> Path:
    """Where the CLI keeps the checkpoint of a run whose output is `final`: beside it, as `final.ckpt`."""
    return final.with_name(final.name + ".ckpt")


def remove_checkpoint(ckpt: Path) -> None:
    """Drop the checkpoint of a run whose output is now in place, and what killed saves of it left behind."""
    shutil.rmtree(ckpt, ignore_errors=True)
    outputs.remove_stale_temporaries(ckpt)


def save_checkpoint(
    ckpt: Path, fingerprint: str, model, optimizer, scheduler, step: int, log_lines: list[dict]
) -> None:
    """Trainable weights, optimizer, scheduler, RNG and step: what resume needs to continue exactly.

    Tensors go to safetensors and the rest to JSON (nothing is pickled). The new checkpoint is written
    beside the old one and swapped in by renames, so a kill at any moment leaves one complete checkpoint.
    """
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
        meta = {"step": step, "fingerprint": fingerprint, "log": log_lines, "state": state}
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


def load_checkpoint(ckpt: Path, fingerprint: str, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Restore what save_checkpoint saved and return (step, log lines); refuse, naming the checkpoint, one
    that is damaged, pickled by an older lrtool, made with other settings, or holding non-finite weights."""
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
        made_with, step, log_lines, state = meta["fingerprint"], meta["step"], meta["log"], meta["state"]
        trainable = load_file(ckpt / "trainable.safetensors")
        tensors = load_file(ckpt / "state.safetensors")
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise InputError(
            f"the checkpoint {ckpt} is damaged ({one_line(error)}): delete it, or rerun without --resume"
        ) from None
    if made_with != fingerprint:
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
