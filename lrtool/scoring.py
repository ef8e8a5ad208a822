"""Greedy exact match, computed in one forward pass per batch.

Greedy decoding reproduces a target exactly if and only if, at every answer position, the most likely next
token given the target's own prefix is the target token (EOS included). So exact match needs no generation
loop: one teacher-forced forward pass over `prompt + answer + EOS` and an argmax comparison per position.
Reads nothing; used by `train --until-accuracy` and by eval.
"""

from lrtool.encoding import IGNORE, collate


def exact_match(
    model, encoded: list[tuple[list[int], list[int]]], pad_id: int, *, batch_size: int = 64, device=None
) -> list[bool]:
    """For each encoded (input_ids, labels) example: does greedy decoding produce exactly its answer?"""
    import torch

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits: list[bool] = [False] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths pad less
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = collate([encoded[i] for i in rows], pad_id)
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
                predicted = logits[:, :-1].argmax(-1).cpu()
                target = batch["labels"][:, 1:]
                scored = target != IGNORE
                correct = ((predicted == target) | ~scored).all(dim=1) & scored.any(dim=1)
                for row, ok in zip(rows, correct.tolist()):
                    hits[row] = ok
    finally:
        model.train(was_training)
    return hits
