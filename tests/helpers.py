"""Builders shared by test files: tiny models, tokenizers and adapters made here, never downloaded."""

from pathlib import Path

import torch


def save_tiny_llama(path: Path, texts, *, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    """A random tiny Llama with lrtool's word-level tokenizer over `texts`, saved as a model directory.

    Its weights are drawn wider than a fresh model's (std 0.3), so greedy choices are far from ties and a
    float rounding difference cannot flip them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lrtool.models import build_tokenizer

    tokenizer = build_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_random_peft_adapter(base: Path, out: Path, *, seed: int, scale: float = 0.3, **lora) -> Path:
    """A peft LoRA of `base` with seeded random factors (peft starts B at zero, which hides every error)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(task_type="CAUSAL_LM", **lora)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    model.save_pretrained(out)
    return out


def peft_model(base: Path, adapter: Path | None = None):
    """The base loaded by transformers, with `adapter` applied by peft when given (the independent path)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    if adapter is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter).eval()
