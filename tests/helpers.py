"""Builders shared by test files: tiny models, tokenizers and adapters made here, never downloaded."""

from pathlib import Path

import torch

from lrtool.adapters import Adapter
from lrtool.engine import TokenRouter


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


def tiny_llama():
    """A fresh tiny Llama, with the same weights on every call. Three layers give 21 LoRA targets, past the
    20 at which peft condenses a target_modules list into suffixes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    return LlamaForCausalLM(config).eval()


def randomise_lora(model, seed: int = 1):
    """Give every LoRA factor seeded random values (peft starts B at zero, which would hide scale errors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def peft_layers(model) -> dict:
    """{module path: peft's LoRA layer} of a PeftModel."""
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model."): layer
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer)
    }


def kohya_tensors(adapter: Adapter, rename=lambda name: name, alpha: bool = True) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, module in adapter.modules.items():
        tensors[f"{rename(name)}.lora_down.weight"] = module.A
        tensors[f"{rename(name)}.lora_up.weight"] = module.B
        if alpha:
            tensors[f"{rename(name)}.alpha"] = torch.tensor(module.scale * module.rank)
    return tensors


# Four adapters of one tiny Llama (hidden 32, 3 layers), every one different in rank, alpha, rsLoRA,
# patterns and target modules; a1 and a4 have equal ranks per module (factor-avg needs that).
ADAPTERS = {
    "a1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"v_proj": 2}),
    "a2": dict(
        r=8,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "down_proj"],
        alpha_pattern={"k_proj": 16},
    ),
    "a3": dict(r=2, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "o_proj", "up_proj"]),
    "a4": dict(
        r=4,
        lora_alpha=3,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "gate_proj"],
        rank_pattern={"v_proj": 2},
    ),
}


def make_adapter_dirs(root) -> dict:
    from peft import LoraConfig, get_peft_model

    paths = {}
    for seed, (name, config) in enumerate(ADAPTERS.items(), start=1):
        model = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", **config))
        randomise_lora(model, seed).save_pretrained(root / name)
        paths[name] = root / name
    return paths


TEXTS = ["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma"]


# Different ranks, alphas, rsLoRA and target sets, so that one batch mixes all of them.
LORAS = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=8, lora_alpha=3, use_rslora=True, target_modules="all-linear"),
    dict(r=2, lora_alpha=5, target_modules=["o_proj", "down_proj"], rank_pattern={"down_proj": 3}),
]


def random_ids(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 60, (rows, length), generator=torch.Generator().manual_seed(seed))


class FixedRouter(TokenRouter):
    """Per token: the given adapter indices and weights (the same at every layer), for the dense check."""

    def __init__(self, indices, weights):
        self.indices, self.weights_ = indices, weights

    def weights(self, module, x):
        return self.indices, self.weights_
