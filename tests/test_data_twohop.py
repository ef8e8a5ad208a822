"""gen-data two-hop: determinism, schema, composability, familiarity labels, held-out templates, limits."""

import json
import random
import re

import pytest

from lrtool.data import TEMPLATE_SETS, names, twohop
from lrtool.errors import UsageError

TINY = twohop.Config.for_size("tiny")
QA_SPLITS = ("hop1", "hop2", "direct", "twohop")


def split(name, seed=0, templates="train", config=TINY):
    return twohop.generate(config, name, seed=seed, templates=templates)


def as_bytes(records):
    return "\n".join(json.dumps(r, sort_keys=True) for r in records).encode()


@pytest.mark.parametrize("name", twohop.SPLITS)
def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(name):
    assert as_bytes(split(name, seed=3)) == as_bytes(split(name, seed=3))
    assert as_bytes(split(name, seed=3)) != as_bytes(split(name, seed=4))


@pytest.mark.parametrize("name", twohop.SPLITS)
def test_every_line_has_prompt_answer_and_meta_with_task_split_template(name):
    for line in split(name):
        assert set(line) == {"prompt", "answer", "meta"}
        assert isinstance(line["prompt"], str) and line["prompt"]
        assert isinstance(line["answer"], str) and line["answer"] and " " not in line["answer"]
        meta = line["meta"]
        assert meta["task"] == "two-hop" and meta["split"] == name and meta["template"]
        if name != "pretrain" or meta["kind"] != "filler":
            assert line["answer"] == meta["chain"][-1]


def test_chains_have_the_length_of_their_relation():
    lengths = {"hop1": 2, "hop2": 2, "direct": 3, "twohop": 3}
    for name, length in lengths.items():
        assert {len(line["meta"]["chain"]) for line in split(name)} == {length}


def test_every_twohop_question_has_both_hops_in_hop1_and_hop2():
    hop1 = {tuple(line["meta"]["chain"]) for line in split("hop1")}
    hop2 = {tuple(line["meta"]["chain"]) for line in split("hop2")}
    questions = split("twohop")
    assert questions
    for line in questions:
        a, b, c = line["meta"]["chain"]
        assert (a, b) in hop1 and (b, c) in hop2


def test_direct_holds_the_composed_fact_of_every_test_chain():
    chains = {tuple(line["meta"]["chain"]) for line in split("twohop")}
    assert {tuple(line["meta"]["chain"]) for line in split("direct")} == chains


def test_the_world_is_a_function_a_person_has_one_mentor_and_a_mentor_one_birthplace():
    mentor, birthplace = {}, {}
    for line in split("pretrain") + split("hop1") + split("hop2"):
        kind = line["meta"].get("kind", line["meta"]["split"])
        if kind in ("hop1", "hop2"):
            table = mentor if kind == "hop1" else birthplace
            key, value = line["meta"]["chain"]
            assert table.setdefault(key, value) == value


def pretrain_text():
    return "\n".join(f"{line['prompt']} {line['answer']}" for line in split("pretrain"))


def mentions(text, name):
    return re.search(rf"\b{re.escape(name)}\b", text) is not None


def test_familiarity_labels_match_what_the_pretrain_text_contains():
    text = pretrain_text()
    lines = [line["prompt"] + " " + line["answer"] for line in split("pretrain")]
    seen = set()
    for line in split("twohop"):
        meta = line["meta"]
        a, b, c = meta["chain"]
        if (a, b, c) in seen:
            continue
        seen.add((a, b, c))
        hop1_in = any(mentions(t, a) and mentions(t, b) for t in lines)
        hop2_in = any(mentions(t, b) and t.endswith(" " + c) and not mentions(t, a) for t in lines)
        expected = {(True, True): "R", (False, True): "H", (False, False): "F"}[(hop1_in, hop2_in)]
        assert meta["familiarity"] == expected, (a, b, c)
        assert meta["pretrain_hops"] == [h for h, inside in ((1, hop1_in), (2, hop2_in)) if inside]
        # The composition itself is never in pretrain for a test chain.
        assert not any(mentions(t, a) and t.endswith(" " + c) for t in lines)
        if meta["familiarity"] == "F":
            assert not mentions(text, a) and not mentions(text, b)
    assert {line["meta"]["familiarity"] for line in split("twohop")} == {"R", "H", "F"}


def test_counts_follow_the_config():
    config = twohop.Config.for_size("tiny", familiar_people=30, h_people=5, f_people=7, bridge_fraction=0.5)
    chains = {
        tuple(line["meta"]["chain"]): line["meta"]["familiarity"] for line in split("twohop", config=config)
    }
    counts = {f: list(chains.values()).count(f) for f in "RHF"}
    assert counts == {"R": 15, "H": 5, "F": 7}


def test_every_familiar_mentor_is_bridged_when_there_are_enough_bridge_people():
    for line in split("twohop"):
        if line["meta"]["familiarity"] in "RH":
            assert line["meta"]["bridged"] is True


def test_held_out_templates_never_occur_in_training_splits():
    training_prompts = [line["prompt"] for name in twohop.SPLITS for line in split(name)]
    for relation in twohop.TEMPLATES.values():
        for template in relation["eval"]:
            fixed = [part for part in re.split(r"\{\w+\}", template) if part.strip()]
            pattern = re.compile(".*".join(re.escape(part) for part in fixed))
            assert not any(pattern.fullmatch(p) or pattern.search(p) for p in training_prompts), template


def test_eval_templates_ask_the_same_facts_in_other_words():
    train, held_out = split("twohop"), split("twohop", templates="eval")
    assert {tuple(x["meta"]["chain"]) for x in train} == {tuple(x["meta"]["chain"]) for x in held_out}
    assert not {x["prompt"] for x in train} & {x["prompt"] for x in held_out}
    assert all(".eval." in x["meta"]["template"] for x in held_out)


def test_names_are_unique_and_none_is_a_prefix_of_another():
    names = set()
    for name in twohop.SPLITS:
        for line in split(name, config=twohop.Config.for_size("small")):
            names.update(line["meta"].get("chain", []))
    ordered = sorted(names)
    assert all(not b.startswith(a) for a, b in zip(ordered, ordered[1:]))


@pytest.mark.parametrize(
    "overrides, flag",
    [
        ({"cities": -1}, "--cities"),
        ({"bridge_fraction": 1.0}, "--bridge-fraction"),
        ({"cities": 0}, "--cities"),
        ({"f_people": 3, "new_mentors": 0}, "--f-people"),
    ],
)
def test_bad_config_values_are_usage_errors_that_name_the_flag(overrides, flag):
    with pytest.raises(UsageError, match=flag):
        twohop.Config.for_size("tiny", **overrides)


def test_pretrain_refuses_held_out_templates_and_unknown_splits_are_refused():
    with pytest.raises(UsageError, match="pretrain"):
        split("pretrain", templates="eval")
    with pytest.raises(UsageError, match="unknown split"):
        split("hop3")


def every_split(config):
    """(split, templates, records) for every split the world makes, held-out template sets included."""
    for name in twohop.SPLITS:
        for templates in ("train", "eval") if name in twohop.HELDOUT_SPLITS else ("train",):
            yield name, templates, split(name, templates=templates, config=config)


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_every_answer_follows_from_its_prompt_and_is_not_in_it(size):
    # A prompt with two answers caps the best possible exact match below 1 (train --until-accuracy).
    answers = {}
    for name, templates, records in every_split(twohop.Config.for_size(size)):
        assert records, (name, templates)
        for line in records:
            prompt, answer = line["prompt"], line["answer"]
            assert answers.setdefault(prompt, answer) == answer, (name, templates, prompt)
            assert answer not in prompt, (name, templates, prompt)


def test_filler_gives_each_city_one_thing():
    world = twohop.build_world(TINY, 0)
    assert set(world.thing_of) == set(world.cities)
    assert set(world.thing_of.values()) <= set(twohop.FILLER_THINGS)
    filler = [line for line in split("pretrain") if line["meta"]["kind"] == "filler"]
    assert len(filler) == TINY.filler
    for line in filler:
        (city,) = [c for c in world.cities if mentions(line["prompt"], c)]
        assert line["answer"] == world.thing_of[city]


def words(text):
    return set(re.findall(r"\w+|[^\w\s]", text))


def test_held_out_templates_use_only_words_of_the_training_splits():
    # A word-level tokenizer built from the training data must know every word of an evaluation prompt.
    known = set()
    for name in twohop.SPLITS:
        for line in split(name):
            known |= words(line["prompt"]) | words(line["answer"])
    for relation in twohop.TEMPLATES.values():
        for template in relation["eval"]:
            fixed = words(" ".join(re.split(r"\{\w+\}", template)))
            assert fixed <= known, (template, fixed - known)


def test_a_world_too_large_to_name_is_a_usage_error():
    assert twohop.Config.for_size("gpu").total_names <= twohop.MAX_NAMES
    with pytest.raises(UsageError, match="--familiar-people"):
        twohop.Config.for_size("tiny", familiar_people=100_000_000)
    with pytest.raises(UsageError, match=f"{twohop.MAX_NAMES:,}"):
        twohop.Config.for_size("tiny", familiar_people=twohop.MAX_NAMES)
    with pytest.raises(UsageError, match="--cities"):
        twohop.Config.for_size("tiny", cities=twohop.MAX_CITIES + 1)


def test_an_exhausted_name_pool_raises_instead_of_drawing_forever(monkeypatch):
    monkeypatch.setattr(names, "_ONSETS", ["b"])
    monkeypatch.setattr(names, "_VOWELS", ["a"])
    monkeypatch.setattr(names, "_CODAS", [""])
    pool = names.NamePool(random.Random(0), max_rejections=50)
    assert pool.people(1) == ["Baba"]
    with pytest.raises(UsageError, match="ran out of distinct person names"):
        pool.person()


def test_the_largest_allowed_cities_can_be_named():
    pool = names.NamePool(random.Random(0))
    assert len(set(pool.places(twohop.MAX_CITIES))) == twohop.MAX_CITIES


def test_unknown_template_sets_are_refused_with_the_choices():
    with pytest.raises(UsageError, match=", ".join(TEMPLATE_SETS)):
        split("hop1", templates="test")
