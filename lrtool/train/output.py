"""What a finished training run writes into its output directory (a fresh one the caller renames into place).

LoRA: a PEFT directory (adapter_config.json with its sets sorted, adapter_model.safetensors, peft's
README.md). --full: a Hugging Face model directory (config.json, generation_config.json, model.safetensors),
its tokenizer files and lrtool_seen_tokens.json, the token ids the model was trained on (what
`--train-tokens new` reads later); a tiny base made here first gets its never-trained embedding rows
redrawn. Both: train_log.jsonl, the log lines and a final summary. lrtool.json is the CLI's (io.Manifest).
Reads nothing."""

import json
import logging
from pathlib import Path

from lrtool import io
from lrtool.models import tiny_preset
from lrtool.train.settings import TrainSettings

log = logging.getLogger(__name__)

SEEN_TOKENS = "lrtool_seen_tokens.json"  # written by --full: the token ids the model was trained on


def write_output(
    out: Path, model, tokenizer, s: TrainSettings, encoded, log_lines: list[dict], summary: dict
) -> None:
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
        io.write_jsonl(log_lines + [{"final": summary}], handle)


def _sort_sets(config_file: Path) -> None:
    """peft writes the sets of its config (target_modules) in set order, which changes with the hash
    seed: sort them, so that the same run gives the same bytes. Written as peft writes it (indent 2, sorted
    keys)."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


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
