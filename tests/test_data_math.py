"""gen-data's math task: shopping word problems (cost, change) whose composed questions need both skills."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from lrtool.data import math
from lrtool.errors import UsageError

SEED = 7
PROBLEM_KEYS = {
    "task",
    "split",
    "skill",
    "template",
    "numbers",
    "solution",
    "final_answer",
    "shared_template",
    "answer_format",
}
NUMBER_KEYS = {
    "skill1": {"quantity", "price", "cost"},
    "skill2": {"cost", "paid", "change"},
    "composed": {"quantity", "price", "cost", "paid", "change"},
}


def tiny(**overrides) -> math.Config:
    return math.Config.for_size("tiny", **overrides)


def every_split(config: math.Config, seed: int = SEED):
    """(split, templates, records) for every split the task makes, held-out template sets included."""
    for split in math.SPLITS:
        for templates in ("train", "eval") if split in math.HELDOUT_SPLITS else ("train",):
            yield split, templates, math.generate(config, split, seed=seed, templates=templates)


def training_lines(config: math.Config, seed: int = SEED) -> list[str]:
    """Every text a model is trained on, under both solution styles: prompts, answers, solutions."""
    texts = []
    for shared in (False, True):
        condition = dataclasses.replace(config, shared_template=shared)
        for split in math.SPLITS:
            for line in math.generate(condition, split, seed=seed):
                texts += [line["prompt"], line["answer"], line["meta"].get("solution", "")]
    return texts


def literal_pieces(template: str) -> list[str]:
    return [piece for piece in re.split(r"\{\w+\}", template) if piece.strip()]


def shape(solution: str) -> str:
    """A solution with its numbers and operators blanked out: what is left is its template."""
    return re.sub(r"[*-]", "OP", re.sub(r"\d+", "N", solution))


# ------------------------------------------------------------------------------------------------ determinism


def test_same_config_split_seed_and_templates_give_identical_records():
    config = tiny()
    first = [json.dumps(records, sort_keys=True) for _, _, records in every_split(config)]
    second = [json.dumps(records, sort_keys=True) for _, _, records in every_split(config)]
    assert first == second


def test_different_seeds_give_different_problems():
    config = tiny()
    assert math.generate(config, "composed", seed=1) != math.generate(config, "composed", seed=2)


def test_the_bridge_condition_and_answer_format_change_solutions_not_problems():
    def prompts(config):
        return [[line["prompt"] for line in records] for _, _, records in every_split(config)]

    assert prompts(tiny()) == prompts(tiny(shared_template=True)) == prompts(tiny(answer_format="solution"))


# ----------------------------------------------------------------------------------------------------- schema


def test_every_line_of_every_split_has_string_prompt_and_answer_and_the_meta_eval_groups_by():
    for split, templates, records in every_split(tiny()):
        assert records, (split, templates)
        for line in records:
            assert set(line) == {"prompt", "answer", "meta"}
            assert isinstance(line["prompt"], str) and isinstance(line["answer"], str)
            assert line["prompt"] and line["answer"] and line["prompt"] == line["prompt"].strip()
            meta = line["meta"]
            assert meta["task"] == "math" and meta["split"] == split
            if split == "pretrain":
                assert meta["kind"] in ("product", "difference", "filler")
                assert meta["template"].startswith(meta["kind"] + ".")
            else:
                assert set(meta) == PROBLEM_KEYS
                assert meta["skill"] == split
                assert re.fullmatch(rf"{split}\.{templates}\.\d+", meta["template"])
                assert set(meta["numbers"]) == NUMBER_KEYS[split]
                assert meta["shared_template"] is False and meta["answer_format"] == "number"


def test_split_sizes_follow_the_config():
    config = tiny(skill_problems=30, composed_problems=20, subtraction_facts=10, filler_sentences=5)
    sizes = {split: len(math.generate(config, split, seed=SEED)) for split in math.SPLITS}
    assert sizes == {"skill1": 30, "skill2": 30, "composed": 20, "pretrain": 2 * 81 + 2 * 10 + 5}
    assert math.describe(config)["lines"] == sizes


def test_no_problem_repeats_within_a_split():
    for split, templates, records in every_split(math.Config.for_size("small")):
        if split == "pretrain":
            continue  # filler sentences may repeat
        prompts = [line["prompt"] for line in records]
        assert len(set(prompts)) == len(prompts), (split, templates)


# ------------------------------------------------------------------------------------------------- arithmetic


def test_answers_are_the_arithmetic_of_the_numbers_in_meta():
    for split, _, records in every_split(tiny()):
        for line in records:
            n = line["meta"].get("numbers")
            if split == "pretrain":
                if line["meta"]["kind"] == "product":
                    assert line["answer"] == str(n["result"]) == str(n["a"] * n["b"])
                elif line["meta"]["kind"] == "difference":
                    assert line["answer"] == str(n["result"]) == str(n["a"] - n["b"])
                continue
            if "quantity" in n:
                assert n["cost"] == n["quantity"] * n["price"]
            if "paid" in n:
                assert n["change"] == n["paid"] - n["cost"]
            if split == "composed":
                expected = n["paid"] - n["quantity"] * n["price"]
            else:
                expected = n.get("change", n["cost"])
            assert line["answer"] == line["meta"]["final_answer"] == str(expected)


def test_numbers_stay_in_the_small_ranges_a_tiny_model_can_handle():
    for split, _, records in every_split(math.Config.for_size("small")):
        for line in records:
            n = line["meta"].get("numbers", {})
            if split == "pretrain":
                if line["meta"]["kind"] == "product":
                    assert 1 <= n["a"] <= 9 and 1 <= n["b"] <= 9
                elif line["meta"]["kind"] == "difference":
                    assert 0 <= n["b"] <= n["a"] <= 99
                continue
            assert 2 <= n.get("quantity", 2) <= 9 and 1 <= n.get("price", 1) <= 9
            assert 2 <= n["cost"] <= 81
            assert n["cost"] < n.get("paid", 99) <= 99
            assert 0 <= int(line["meta"]["final_answer"]) <= 99
            assert re.fullmatch(r"\d+", line["meta"]["final_answer"])


def test_prompts_state_the_numbers_they_are_about():
    for split, _, records in every_split(tiny()):
        if split == "pretrain":
            continue
        for line in records:
            stated = sorted(int(x) for x in re.findall(r"\d+", line["prompt"]))
            n = line["meta"]["numbers"]
            given = [n[k] for k in ("quantity", "price", "paid") if k in n]
            if split == "skill2":
                given.append(n["cost"])  # the only split that states the cost itself
            assert stated == sorted(given)


def test_a_unit_price_of_one_reads_one_dollar():
    lines = math.generate(math.Config.for_size("small"), "skill1", seed=SEED)
    ones = [line["prompt"] for line in lines if line["meta"]["numbers"]["price"] == 1]
    assert ones and all(re.search(r"\b1 dollar\b", p) and not re.search(r"\b1 dollars", p) for p in ones)


# -------------------------------------------------------------------------------------------------- solutions


@pytest.mark.parametrize("shared", [False, True])
def test_every_solution_ends_with_the_final_number(shared):
    for split, _, records in every_split(tiny(shared_template=shared)):
        for line in records:
            if split != "pretrain":
                solution = line["meta"]["solution"]
                assert solution.endswith(" " + line["meta"]["final_answer"])
                assert math.final_number(solution) == line["meta"]["final_answer"]


def test_shared_template_solutions_of_both_skills_have_one_shape():
    config = tiny(shared_template=True)
    shapes = {
        shape(line["meta"]["solution"])
        for split in ("skill1", "skill2")
        for line in math.generate(config, split, seed=SEED)
    }
    assert shapes == {"Compute N OP N = N. Answer: N"}
    composed = {shape(line["meta"]["solution"]) for line in math.generate(config, "composed", seed=SEED)}
    assert composed == {"Compute N OP N = N. Compute N OP N = N. Answer: N"}


def test_distinct_solutions_give_each_skill_its_own_shape_and_compose_them_in_order():
    config = tiny()
    skill1 = {shape(line["meta"]["solution"]) for line in math.generate(config, "skill1", seed=SEED)}
    skill2 = {shape(line["meta"]["solution"]) for line in math.generate(config, "skill2", seed=SEED)}
    composed = {shape(line["meta"]["solution"]) for line in math.generate(config, "composed", seed=SEED)}
    assert len(skill1) == len(skill2) == 1 and skill1 != skill2
    assert composed == {f"{skill1.pop()}. {skill2.pop()}"}


def test_composed_solutions_multiply_then_subtract_the_problems_numbers():
    distinct = math.generate(tiny(), "composed", seed=SEED)[0]
    shared = math.generate(tiny(shared_template=True), "composed", seed=SEED)[0]
    n = distinct["meta"]["numbers"]
    assert distinct["meta"]["solution"] == (
        f"Multiply {n['quantity']} by {n['price']} to get {n['cost']}. "
        f"Take {n['cost']} away from {n['paid']} to leave {n['change']}"
    )
    assert shared["meta"]["solution"] == (
        f"Compute {n['quantity']} * {n['price']} = {n['cost']}. "
        f"Compute {n['paid']} - {n['cost']} = {n['change']}. "
        f"Answer: {n['change']}"
    )


def test_answer_format_solution_puts_the_worked_solution_in_answer():
    for split, _, records in every_split(tiny(answer_format="solution", shared_template=True)):
        for line in records:
            if split != "pretrain":
                assert line["answer"] == line["meta"]["solution"]
                assert line["answer"] != line["meta"]["final_answer"]
                assert line["answer"].endswith(line["meta"]["final_answer"])


# ----------------------------------------------------------------------------------------- held-out templates


def test_each_skill_has_several_training_and_held_out_templates_and_uses_them():
    config = math.Config.for_size("small")
    for skill, sets in math.TEMPLATES.items():
        assert len(sets["train"]) >= 4 and len(sets["eval"]) >= 2
        assert not set(sets["train"]) & set(sets["eval"])
        for templates in ("train", "eval"):
            lines = math.generate(config, skill, seed=SEED, templates=templates)
            used = {line["meta"]["template"] for line in lines}
            assert used == {f"{skill}.{templates}.{i}" for i in range(len(sets[templates]))}


def test_no_training_prompt_is_an_instance_of_a_held_out_template():
    training = [
        line["prompt"]
        for split in math.SPLITS
        for line in math.generate(math.Config.for_size("small"), split, seed=SEED)
    ]
    for sets in math.TEMPLATES.values():
        for template in sets["eval"]:
            pattern = re.compile(".+?".join(re.escape(p) for p in re.split(r"\{\w+\}", template)))
            assert not any(pattern.fullmatch(prompt) for prompt in training), template


def test_each_held_out_template_has_a_phrase_no_training_line_contains():
    training = training_lines(math.Config.for_size("small"))
    for sets in math.TEMPLATES.values():
        for template in sets["eval"]:
            phrase = max(literal_pieces(template), key=len).strip()
            assert len(phrase.split()) >= 3, template
            assert not any(phrase in text for text in training), phrase


def test_held_out_templates_use_only_words_the_training_problems_contain():
    # A word-level tokenizer built from the training data must know every word of an evaluation prompt.
    prompts = [
        line["prompt"] for split in math.HELDOUT_SPLITS for line in math.generate(tiny(), split, seed=SEED)
    ]
    training_words = set(re.findall(r"[A-Za-z]+", " ".join(prompts)))
    for sets in math.TEMPLATES.values():
        for template in sets["eval"]:
            words = set(re.findall(r"[A-Za-z]+", " ".join(literal_pieces(template))))
            assert words <= training_words, (template, words - training_words)


def test_held_out_sets_are_drawn_with_held_out_templates_only():
    for split in math.HELDOUT_SPLITS:
        eval_lines = math.generate(tiny(), split, seed=SEED, templates="eval")
        train_prompts = {line["prompt"] for line in math.generate(tiny(), split, seed=SEED)}
        assert all(line["meta"]["template"].startswith(f"{split}.eval.") for line in eval_lines)
        assert not train_prompts & {line["prompt"] for line in eval_lines}


# ------------------------------------------------------------------------------------------ splits stay apart


def test_composed_problems_reuse_no_payment_of_the_skill_splits():
    config = math.Config.for_size("small")
    pairs = {}
    for split in ("skill2", "composed"):
        for templates in ("train", "eval"):
            lines = math.generate(config, split, seed=SEED, templates=templates)
            pairs[split, templates] = {
                (line["meta"]["numbers"]["cost"], line["meta"]["numbers"]["paid"]) for line in lines
            }
    uses = list(pairs)
    for i, a in enumerate(uses):
        for b in uses[i + 1 :]:
            assert not pairs[a] & pairs[b], (a, b)


def test_no_composed_prompt_appears_in_a_skill_split():
    config = math.Config.for_size("small")
    skill_prompts = {
        line["prompt"]
        for split in ("skill1", "skill2")
        for templates in ("train", "eval")
        for line in math.generate(config, split, seed=SEED, templates=templates)
    }
    for templates in ("train", "eval"):
        lines = math.generate(config, "composed", seed=SEED, templates=templates)
        composed = {line["prompt"] for line in lines}
        assert not composed & skill_prompts


# --------------------------------------------------------------------------------------------------- pretrain


def test_pretrain_holds_every_product_of_one_to_nine_in_both_forms():
    lines = math.generate(tiny(subtraction_facts=0, filler_sentences=0), "pretrain", seed=SEED)
    facts = {(line["prompt"], line["answer"]) for line in lines}
    for a in range(1, 10):
        for b in range(1, 10):
            assert (f"{a} * {b} =", str(a * b)) in facts and (f"{a} times {b} is", str(a * b)) in facts
    assert len(lines) == 2 * 81


def test_pretrain_samples_distinct_subtractions_in_both_forms():
    lines = math.generate(tiny(subtraction_facts=40), "pretrain", seed=SEED)
    differences = [line for line in lines if line["meta"]["kind"] == "difference"]
    facts = {(line["meta"]["numbers"]["a"], line["meta"]["numbers"]["b"]) for line in differences}
    assert len(facts) == 40 and len(differences) == 80
    prompts = {line["prompt"] for line in differences}
    assert all(f"{a} - {b} =" in prompts and f"{a} minus {b} is" in prompts for a, b in facts)


def test_pretrain_filler_is_shopping_talk_without_arithmetic():
    lines = math.generate(tiny(filler_sentences=50), "pretrain", seed=SEED)
    filler = [line for line in lines if line["meta"]["kind"] == "filler"]
    assert len(filler) == 50
    for line in filler:
        assert not re.search(r"\d", line["prompt"] + line["answer"])
        assert " " not in line["answer"]


def test_pretrain_comes_only_in_training_templates():
    with pytest.raises(UsageError, match="pretrain"):
        math.generate(tiny(), "pretrain", seed=SEED, templates="eval")


# ----------------------------------------------------------------------------------------------------- config


WARNING = (
    "--shared-template changes only meta.solution unless --answer-format solution: "
    "the answers stay bare numbers"
)


@pytest.mark.parametrize(
    "shared, answer_format, expected",
    [(True, "number", [WARNING]), (True, "solution", []), (False, "number", []), (False, "solution", [])],
)
def test_a_bridge_that_changes_no_answer_is_warned_about_and_noted(shared, answer_format, expected):
    config = tiny(shared_template=shared, answer_format=answer_format)
    assert math.warnings_for(config) == expected
    assert math.describe(config)["notes"] == expected
    if expected:  # the warning is true: the answers are the bare numbers of the default condition
        for split in math.HELDOUT_SPLITS:
            lines = math.generate(config, split, seed=SEED)
            assert [x["answer"] for x in lines] == [
                x["answer"] for x in math.generate(tiny(), split, seed=SEED)
            ]


def test_sizes_are_valid_configs_that_grow():
    configs = [math.Config.for_size(size) for size in ("tiny", "small", "gpu")]
    assert math.Config() == configs[1]
    for smaller, larger in zip(configs, configs[1:], strict=False):
        assert smaller.skill_problems < larger.skill_problems
        assert smaller.composed_problems < larger.composed_problems


def test_for_size_applies_overrides_and_ignores_unset_ones():
    config = math.Config.for_size("tiny", composed_problems=5, skill_problems=None, shared_template=True)
    assert config.composed_problems == 5 and config.shared_template
    assert config.skill_problems == math.SIZES["tiny"]["skill_problems"]


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("skill_problems", 0, "--skill-problems"),
        ("skill_problems", -3, "--skill-problems"),
        ("skill_problems", 2.5, "--skill-problems"),
        ("skill_problems", math.MAX_PROBLEMS + 1, "--skill-problems"),
        ("composed_problems", 0, "--composed-problems"),
        ("subtraction_facts", -1, "--subtraction-facts"),
        ("subtraction_facts", 6000, "--subtraction-facts"),
        ("filler_sentences", -1, "--filler-sentences"),
        ("shared_template", "yes", "--shared-template"),
        ("answer_format", "words", "--answer-format"),
    ],
)
def test_a_bad_value_is_a_usage_error_that_names_the_flag(field, value, flag):
    with pytest.raises(UsageError, match=re.escape(flag)):
        math.Config.for_size("tiny", **{field: value})
    with pytest.raises(UsageError, match=re.escape(flag)):
        math.generate(math.Config(**{field: value}), "skill1", seed=SEED)


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: math.Config.for_size("huge"), "tiny, small, gpu"),
        (lambda: math.Config.for_size("tiny", problems=3), "--problems"),
        (lambda: math.generate(tiny(), "twohop", seed=SEED), "skill1, skill2, composed, pretrain"),
        (lambda: math.generate(tiny(), "skill1", seed=SEED, templates="test"), "train, eval"),
    ],
)
def test_unknown_names_are_usage_errors_that_list_the_choices(call, words):
    with pytest.raises(UsageError, match=re.escape(words)):
        call()


def test_the_generator_imports_no_torch_or_cli_libraries():
    code = (
        "import sys, lrtool.data.math as m; m.generate(m.Config(), 'composed', seed=0); "
        "print(sorted({'torch', 'numpy', 'typer', 'rich'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
