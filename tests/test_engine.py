"""The engine applies many adapters to one base per row (and per token for routers) exactly as each adapter
alone in peft would; generation and log-likelihoods equal plain transformers loops."""

import pytest
import torch

from helpers import (
    LORAS,
    TEXTS,
    FixedRouter,
    peft_model,
    random_ids,
    save_random_peft_adapter,
    save_tiny_llama,
)
from lrtool.adapters import Adapter, LoraModule, load_adapter
from lrtool.decoding import continuation_logliks, greedy
from lrtool.engine import AdapterEngine, OneAdapter, Plan
from lrtool.errors import IncompatibleError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("engine") / "base", TEXTS)


@pytest.fixture(scope="module")
def adapter_dirs(base_dir):
    return [
        save_random_peft_adapter(base_dir, base_dir.parent / f"a{i}", seed=i + 1, **config)
        for i, config in enumerate(LORAS)
    ]


def test_a_mixed_batch_gives_each_row_the_logits_of_its_adapter_applied_alone_by_peft(base_dir, adapter_dirs):
    model = peft_model(base_dir)
    engine = AdapterEngine(model, [load_adapter(p) for p in adapter_dirs])
    parts = [OneAdapter(i) for i in range(3)]
    assignment = [0, 0, 1, None, 2, 1, 2]  # unsorted on purpose: rows of one adapter in several segments
    ids = random_ids(len(assignment), 9)
    with torch.no_grad(), engine.routing(Plan.by_row([None if a is None else parts[a] for a in assignment])):
        mixed = model(input_ids=ids).logits
    engine.close()
    for row, adapter in enumerate(assignment):
        reference = peft_model(base_dir, None if adapter is None else adapter_dirs[adapter])
        with torch.no_grad():
            alone = reference(input_ids=ids[row : row + 1]).logits[0]
        torch.testing.assert_close(mixed[row], alone, rtol=1e-4, atol=1e-4)


def test_without_a_plan_or_after_close_the_model_is_the_base(base_dir, adapter_dirs):
    model = peft_model(base_dir)
    ids = random_ids(2, 6)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        engine = AdapterEngine(model, [load_adapter(adapter_dirs[1])])
        unplanned = model(input_ids=ids).logits
        with engine.routing(Plan.by_row([OneAdapter(0)] * 2)):
            adapted = model(input_ids=ids).logits
        engine.close()
        after = model(input_ids=ids).logits
    assert torch.equal(before, unplanned) and torch.equal(before, after)
    assert not torch.allclose(before, adapted)


def dense_routed_logits(model, adapters, ids, indices, weights):
    """Reference: every target layer's output + sum_j w_j * scale B A x, in float64, dense, per token."""
    modules = dict(model.named_modules())
    handles = []
    for name in sorted({n for a in adapters for n in a.modules}):

        def hook(module, inputs, output, name=name):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            extra = torch.zeros(x.shape[0], output.shape[-1], dtype=torch.float64)
            for t in range(x.shape[0]):
                for j in range(indices.shape[1]):
                    a = int(indices[t, j])
                    if a >= 0 and name in adapters[a].modules:
                        extra[t] += float(weights[t, j]) * (adapters[a].modules[name].delta() @ x[t])
            return output + extra.reshape(output.shape).to(output.dtype)

        handles.append(modules[name].register_forward_hook(hook))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for handle in handles:
        handle.remove()
    return logits


@pytest.mark.parametrize("k", [1, 2, 3])
def test_per_token_top_k_routing_equals_a_dense_reference(base_dir, adapter_dirs, k):
    adapters = [load_adapter(p) for p in adapter_dirs]
    ids = random_ids(2, 5, seed=k)
    tokens = ids.numel()
    generator = torch.Generator().manual_seed(10 + k)
    indices = torch.stack([torch.randperm(3, generator=generator)[:k] for _ in range(tokens)])
    indices[0, 0] = -1  # "no adapter" in one slot
    weights = torch.rand(tokens, k, generator=generator)
    model = peft_model(base_dir)
    engine = AdapterEngine(model, adapters)
    with torch.no_grad(), engine.routing(Plan.by_row([FixedRouter(indices, weights)] * 2)):
        routed = model(input_ids=ids).logits
    engine.close()
    reference = dense_routed_logits(model, adapters, ids, indices, weights)
    torch.testing.assert_close(routed, reference, rtol=1e-4, atol=1e-4)


def test_a_plan_keeps_its_segments_when_rows_leave():
    a, b = OneAdapter(0), OneAdapter(1)
    plan = Plan.by_row([a, a, None, b, b, b])
    assert [(s.start, s.stop, s.part) for s in plan.segments] == [(0, 2, a), (2, 3, None), (3, 6, b)]
    kept = plan.select([1, 3, 5])
    assert kept.batch_size == 3
    assert [(s.start, s.stop, s.part) for s in kept.segments] == [(0, 1, a), (1, 3, b)]


def test_an_adapter_for_another_model_is_refused_naming_the_module(base_dir):
    model = peft_model(base_dir)
    name = "model.layers.0.self_attn.q_proj"
    wrong_shape = Adapter({name: LoraModule(torch.ones(2, 31), torch.ones(32, 2), 1.0)}, source="x/")
    with pytest.raises(IncompatibleError, match="q_proj.*31 -> 32.*32 -> 32"):
        AdapterEngine(model, [wrong_shape])
    missing = Adapter({"model.layers.9.mlp.up_proj": LoraModule(torch.ones(2, 32), torch.ones(64, 2), 1.0)})
    with pytest.raises(IncompatibleError, match="layers.9.mlp.up_proj.*not in the base"):
        AdapterEngine(model, [missing])
    not_linear = Adapter({"model.embed_tokens": LoraModule(torch.ones(2, 32), torch.ones(32, 2), 1.0)})
    with pytest.raises(IncompatibleError, match="Embedding.*not a linear layer"):
        AdapterEngine(model, [not_linear])


def test_batched_greedy_generation_equals_transformers_generate_row_by_row(base_dir, adapter_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = peft_model(base_dir)
    engine = AdapterEngine(model, [load_adapter(p) for p in adapter_dirs])
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (3, 7, 5, 9, 4)]
    assignment = [0, None, 1, 2, 0]
    parts = [OneAdapter(i) for i in range(3)]
    plan = Plan.by_row([None if a is None else parts[a] for a in assignment])

    def generate(stop: int):
        with torch.no_grad():
            return greedy(
                model,
                prompts,
                pad_id=tokenizer.pad_token_id,
                stop_ids={stop},
                max_new_tokens=6,
                engine=engine,
                plan=plan,
            )

    # Stop at a token the first row generates third, so rows finish at different steps and leave the batch.
    stop = generate(-1).tokens[0][2]
    ours = generate(stop)
    engine.close()
    assert len(ours.tokens[0]) == 2 and any(len(tokens) == 6 for tokens in ours.tokens)
    for prompt, adapter, tokens in zip(prompts, assignment, ours.tokens):
        reference = peft_model(base_dir, None if adapter is None else adapter_dirs[adapter])
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = reference.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
            )[0, len(prompt) :].tolist()
        assert tokens == (out[: out.index(stop)] if stop in out else out)


def test_continuation_logliks_equal_hand_computed_sums_of_log_softmax(base_dir, adapter_dirs):
    model = peft_model(base_dir)
    engine = AdapterEngine(model, [load_adapter(adapter_dirs[2])])
    rows = [(random_ids(1, 4, 1)[0].tolist(), [7, 8, 9]), (random_ids(1, 8, 2)[0].tolist(), [11])]
    plan = Plan.by_row([OneAdapter(0), None])
    with torch.no_grad():
        ours = continuation_logliks(model, rows, pad_id=0, engine=engine, plan=plan)
    engine.close()
    for (prompt, continuation), adapter, value in zip(rows, [adapter_dirs[2], None], ours):
        reference = peft_model(base_dir, adapter)
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([prompt + continuation])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        expected = sum(float(logprobs[len(prompt) - 1 + t, token]) for t, token in enumerate(continuation))
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-5)
