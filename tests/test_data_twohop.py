"""gen-data two-hop: determinism, schema, composability, familiarity labels, held-out templates."""

import json
import re

import pytest

from lrtool.data import twohop
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
