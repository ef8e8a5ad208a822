"""How a dataset line becomes tokens, identically for train and eval.

A line is `prompt + SEPARATOR + answer`, then the end-of-sequence token: the prompt is tokenized with the
tokenizer's own special tokens (a BOS where it adds one), the separator and answer without, so the prompt's
tokens are the same whether or not the answer follows (what greedy evaluation feeds the model). Loss and
exact-match cover the answer and the EOS. With `chat_template`, the prompt is the user's message and the
answer the assistant's reply, formatted by the tokenizer's chat template (instruction-tuned bases).
"""

from lrtool.errors import UsageError

SEPARATOR = " "
IGNORE = -100  # label of tokens without loss (torch's cross_entropy ignore_index)
# A token is rarely longer than this many characters: a text of more than CHARS_PER_TOKEN x N characters
# cannot fit in N tokens, which train and eval judge before tokenizing a huge line.
CHARS_PER_TOKEN = 32


def check_chat_template(tokenizer, chat_template: bool, model: str) -> None:
    """--chat-template with a tokenizer that has none is a usage error naming the model."""
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"--chat-template: the tokenizer of {model} has no chat template (drop the flag)")


def prompt_ids(tokenizer, prompt: str, chat_template: bool = False) -> list[int]:
    """The tokens a model reads before it answers."""
    if chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt)["input_ids"]


def prompt_ids_within(tokenizer, prompt: str, chat_template: bool, limit: int | None) -> list[int] | None:
    """prompt_ids, or None when the prompt has `limit` tokens or more. A prompt of more than CHARS_PER_TOKEN x
    `limit` characters is first judged by that many of its first characters, so a huge one is never
    tokenized whole (a vocabulary of longer tokens only costs the whole tokenization)."""
    if limit is not None and len(prompt) > CHARS_PER_TOKEN * limit:
        if len(prompt_ids(tokenizer, prompt[: CHARS_PER_TOKEN * limit], chat_template)) >= limit:
            return None
    ids = prompt_ids(tokenizer, prompt, chat_template)
    return None if limit is not None and len(ids) >= limit else ids


def answer_ids(tokenizer, prompt: str, answer: str, chat_template: bool = False) -> list[int]:
    """The tokens a model must produce after the prompt's tokens: separator and answer, then EOS."""
    return answers_after(
        tokenizer, prompt_ids(tokenizer, prompt, chat_template), prompt, [answer], chat_template
    )[0]


def answers_after(
    tokenizer, head: list[int], prompt: str, answers: list[str], chat_template: bool = False
) -> list[list[int]]:
    """answer_ids of each of `answers` after the same prompt, whose tokens `head` are (one tokenizer call).

    Each is the tail of the whole line's tokenization when `head` is its head, so a word is the same token
    in an answer as anywhere else; otherwise (a merge across the boundary) the separator and answer
    tokenized alone."""
    eos = [tokenizer.eos_token_id]
    if chat_template:
        return [ids + eos for ids in tokenizer(list(answers), add_special_tokens=False)["input_ids"]]
    tails = []
    for answer, whole in zip(answers, tokenizer([prompt + SEPARATOR + a for a in answers])["input_ids"]):
        if whole[: len(head)] == head and len(whole) > len(head):
            tails.append(whole[len(head) :] + eos)
        else:
            tails.append(tokenizer(SEPARATOR + answer, add_special_tokens=False)["input_ids"] + eos)
    return tails


def encode_example(
    tokenizer, prompt: str, answer: str, *, chat_template: bool = False, loss_on_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one line; labels are IGNORE on the prompt unless `loss_on_prompt`."""
    head = prompt_ids(tokenizer, prompt, chat_template)
    tail = answers_after(tokenizer, head, prompt, [answer], chat_template)[0]
    labels = (head if loss_on_prompt else [IGNORE] * len(head)) + tail
    return head + tail, labels


def decode_answer(tokenizer, ids: list[int]) -> str:
    """The text of generated tokens up to the first EOS, without the separator."""
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, padding_side: str = "right"):
    """Pad (input_ids, labels) pairs into tensors: input_ids, labels (IGNORE on padding), attention_mask."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        span = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        input_ids[row, span] = torch.tensor(ids)
        labels[row, span] = torch.tensor(labs)
        mask[row, span] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def word_ids(tokenizer, word: str) -> list[int]:
    """The tokens of `word` where it follows a space in running text (as names do in prompts and answers)."""
    return answer_ids(tokenizer, "a", word)[:-1]
