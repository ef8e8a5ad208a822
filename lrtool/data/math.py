"""Shopping word problems whose composed questions need two skills at once.

Reads nothing; `generate` returns the records of one split. Everything is a function of (Config, seed):

    skill1    cost = quantity x price   "Tom buys 3 pens at 4 dollars each. How much does Tom pay?"      12
    skill2    change = paid - cost      "Tom buys a book for 12 dollars and pays with 20 dollars. ..."    8
    composed  both, chained             "Tom buys 3 pens at 4 dollars each and pays with 20 dollars. ..."  8

An expert trained on skill1 and one trained on skill2 are recycled (merged or routed) and tested on
`composed`, which neither saw. `pretrain` is the base's corpus: every product 1..9 x 1..9, a sample of
subtractions, and shopping filler, so that a tiny base can do the arithmetic and knows the words.

Every problem carries a worked solution (`meta.solution`) that ends with the final number. The follow-up
paper reports that reuse can work when the tasks' solutions share one template (see ../shared/EXPERIMENT.md);
`shared_template` turns that bridge on ("Compute 3 * 4 = 12. Answer: 12" / "Compute 20 - 12 = 8. Answer: 8")
against the default of one style per skill ("Multiply 3 by 4 to get 12" / "Take 12 away from 20 to leave 8").
Both conditions draw the same problems from the same seed: only the solutions differ.
`answer_format="solution"` makes the solution the answer a model is trained and scored on.

Numbers stay small: quantity 2..9, price 1..9, paid in (cost, 99], every answer an integer 0..99.
Composed problems never reuse a (cost, paid) pair of skill2 (the pairs are dealt out per seed), so a composed
question cannot be answered by recalling a skill2 problem; skill1 and composed share the 72 (quantity, price)
pairs, which are too few to split.
"""

import random
import re
from dataclasses import asdict, dataclass, fields

from lrtool.data import check_request, record
from lrtool.errors import UsageError

TASK = "math"
SPLITS = ("skill1", "skill2", "composed", "pretrain")
HELDOUT_SPLITS = ("skill1", "skill2", "composed")
ANSWER_FORMATS = ("number", "solution")

QUANTITIES = range(2, 10)
PRICES = range(1, 10)
MAX_PAID = 99
COSTS = range(min(QUANTITIES) * min(PRICES), max(QUANTITIES) * max(PRICES) + 1)  # skill2 costs: 2..81
MAX_PROBLEMS = 10_000  # per split; far below the distinct prompts each template set can make (>= 20,000)

NAMES = ("Tom", "Ana", "Ben", "Mia", "Sam", "Lea", "Max", "Ivy", "Leo", "Zoe", "Dan", "Eva")
# Singular nouns that take "a" and form the plural with "s".
ITEMS = ("pen", "book", "cup", "hat", "ball", "kite", "lamp", "mug", "sock", "toy", "card", "bag")

# Prompts end just before the answer. Held-out ("eval") templates rearrange the training templates' words
# (same case), so a model with a word-level vocabulary knows every word of them; yet no training line is an
# instance of one, and each has a phrase (its longest fixed piece) that no training line contains.
# Slots: name, q (quantity), item(s), p (unit price), cost, paid.
TEMPLATES = {
    "skill1": {
        "train": (
            "{name} buys {q} {items} at {p} dollars each. How much does {name} pay?",
            "{name} wants {q} {items}. Each one costs {p} dollars. How many dollars does {name} spend?",
            "At the shop, {items} cost {p} dollars each. {name} takes {q} of them. What is the total cost?",
            "{name} picks up {q} {items} priced at {p} dollars apiece. What does {name} pay in total?",
        ),
        "eval": (
            "What is the total cost of {q} {items} at {p} dollars each for {name}?",
            "{q} {items} cost {p} dollars apiece. How much does {name} pay in total?",
        ),
    },
    "skill2": {
        "train": (
            "{name} buys a {item} for {cost} dollars and pays with {paid} dollars. "
            "How much change does {name} get?",
            "A {item} costs {cost} dollars. {name} gives the seller {paid} dollars. "
            "How much change comes back?",
            "{name} pays {paid} dollars for a {item} that costs {cost} dollars. "
            "What change does {name} receive?",
            "{name} hands over {paid} dollars for a {item} priced at {cost} dollars. How much change is due?",
        ),
        "eval": (
            "{name} hands the seller {paid} dollars for a {item} that costs {cost} dollars. "
            "What change comes back?",
            "A {item} costs {cost} dollars and {name} pays with {paid} dollars. What is the change?",
        ),
    },
    "composed": {
        "train": (
            "{name} buys {q} {items} at {p} dollars each and pays with {paid} dollars. "
            "How much change does {name} get?",
            "{name} wants {q} {items}. Each one costs {p} dollars. {name} gives the seller {paid} dollars. "
            "How much change comes back?",
            "At the shop, {items} cost {p} dollars each. {name} takes {q} of them and pays {paid} dollars. "
            "What change does {name} receive?",
            "{name} picks up {q} {items} priced at {p} dollars apiece and hands over {paid} dollars. "
            "How much change is due?",
        ),
        "eval": (
            "{name} hands the seller {paid} dollars for {q} {items} that cost {p} dollars each. "
            "What change comes back?",
            "{q} {items} cost {p} dollars apiece and {name} pays with {paid} dollars. What is the change?",
        ),
    },
}

# Worked-solution steps. Distinct: each skill its own wording. Shared (the bridge): one template for both
# operations, and a fixed ending. Either way a solution ends with the final number.
STEPS = {
    False: {"*": "Multiply {a} by {b} to get {c}", "-": "Take {b} away from {a} to leave {c}"},
    True: {"*": "Compute {a} * {b} = {c}", "-": "Compute {a} - {b} = {c}"},
}
SHARED_ENDING = "Answer: {c}"
_ONE_DOLLARS = re.compile(r"\b1 dollars\b")  # a unit price of 1 reads "1 dollar"

# Pretrain: arithmetic facts in two surface forms each, the symbolic one being the shared solutions' notation.
FACT_FORMS = {"*": ("{a} * {b} =", "{a} times {b} is"), "-": ("{a} - {b} =", "{a} minus {b} is")}
# Filler for the pretrain corpus: shopping words without arithmetic. The last word is the answer.
FILLER = (
    "{name} walks to the shop to look at the {items}",
    "{name} puts the new {items} on the shelf",
    "{name} carries the {item} home",
    "The seller at the shop has many {items}",
    "{name} likes to pay with coins",
    "{name} keeps the change in a small purse",
    "{name} looks at the {items} in the window",
    "{name} and a friend go to the shop together",
)

SIZES = {
    "tiny": dict(skill_problems=24, composed_problems=24, subtraction_facts=24, filler_sentences=24),
    "small": dict(skill_problems=400, composed_problems=200, subtraction_facts=500, filler_sentences=200),
    "gpu": dict(skill_problems=5000, composed_problems=2000, subtraction_facts=3000, filler_sentences=2000),
}

# RNG streams: random.Random(seed * 1000 + stream), one per purpose, so that no split's draws move another's.
_STREAM_PAIRS = 1
_STREAMS = {
    ("skill1", "train"): 10,
    ("skill1", "eval"): 11,
    ("skill2", "train"): 20,
    ("skill2", "eval"): 21,
    ("composed", "train"): 30,
    ("composed", "eval"): 31,
    ("pretrain", "train"): 40,
}
# (cost, paid) pairs are dealt round-robin to these four uses, so no two of them share a pair.
_PAIR_USES = (("skill2", "train"), ("skill2", "eval"), ("composed", "train"), ("composed", "eval"))


@dataclass(frozen=True)
class Config:
    """The knobs of the math world. Field `x_y` is the CLI flag `--x-y`; defaults are the "small" size."""

    skill_problems: int = 400  # problems in each of skill1 and skill2
    composed_problems: int = 200  # problems in composed
    subtraction_facts: int = 500  # distinct subtractions a - b (0 <= b <= a <= 99) in pretrain, 2 lines each
    filler_sentences: int = 200  # shopping sentences without arithmetic in pretrain
    shared_template: bool = False  # both skills write solutions in one template (the "bridge" condition)
    answer_format: str = "number"  # "number": the answer is the final number; "solution": the worked solution

    @classmethod
    def for_size(cls, size: str, **overrides) -> "Config":
        """The preset `size` with `overrides` applied (None means "keep the preset's value"), validated."""
        if size not in SIZES:
            raise UsageError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
        known = [f.name for f in fields(cls)]
        for name in overrides:
            if name not in known:
                raise UsageError(
                    f"the math task has no option {_flag(name)}; its options are "
                    + ", ".join(_flag(n) for n in known)
                )
        config = cls(**{**SIZES[size], **{k: v for k, v in overrides.items() if v is not None}})
        config.validate()
        return config

    def validate(self) -> None:
        """Raise UsageError, naming the flag, on a value the generator cannot use."""
        for name, least in (
            ("skill_problems", 1),
            ("composed_problems", 1),
            ("subtraction_facts", 0),
            ("filler_sentences", 0),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UsageError(f"{_flag(name)} must be a whole number, got {value!r}")
            if value < least:
                raise UsageError(f"{_flag(name)} must be at least {least}, got {value}")
        for name in ("skill_problems", "composed_problems"):
            if getattr(self, name) > MAX_PROBLEMS:
                raise UsageError(f"{_flag(name)} must be at most {MAX_PROBLEMS}, got {getattr(self, name)}")
        if self.subtraction_facts > len(_subtractions()):
            raise UsageError(
                f"--subtraction-facts must be at most {len(_subtractions())} (every a - b with "
                f"0 <= b <= a <= {MAX_PAID}), got {self.subtraction_facts}"
            )
        if not isinstance(self.shared_template, bool):
            raise UsageError(f"--shared-template must be true or false, got {self.shared_template!r}")
        if self.answer_format not in ANSWER_FORMATS:
            raise UsageError(
                f"--answer-format must be one of {', '.join(ANSWER_FORMATS)}, got {self.answer_format!r}"
            )


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def generate(config: Config, split: str, *, seed: int, templates: str = "train") -> list[dict]:
    """The records of one split of the world that (config, seed) defines."""
    check_request(SPLITS, split, templates)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UsageError(f"--seed must be a whole number, got {seed!r}")
    config.validate()
    rng = random.Random(seed * 1000 + _STREAMS[split, templates])
    if split == "pretrain":
        return _pretrain(config, rng)
    count = config.composed_problems if split == "composed" else config.skill_problems
    return _problems(config, split, templates, rng, count, _number_pool(split, templates, seed))


# ---------------------------------------------------------------------------------------------- problems


def _number_pool(skill: str, templates: str, seed: int) -> list[dict]:
    """Every number combination the problems of (skill, templates) may use."""
    if skill == "skill1":
        return [_numbers(q=q, p=p) for q in QUANTITIES for p in PRICES]
    pairs = [(cost, paid) for cost in COSTS for paid in range(cost + 1, MAX_PAID + 1)]
    random.Random(seed * 1000 + _STREAM_PAIRS).shuffle(pairs)
    mine = pairs[_PAIR_USES.index((skill, templates)) :: len(_PAIR_USES)]
    if skill == "skill2":
        return [_numbers(cost=cost, paid=paid) for cost, paid in mine]
    # composed: every way of writing the cost as quantity x price
    return [
        _numbers(q=q, p=cost // q, paid=paid)
        for cost, paid in mine
        for q in QUANTITIES
        if cost % q == 0 and cost // q in PRICES
    ]


def _numbers(
    q: int | None = None, p: int | None = None, cost: int | None = None, paid: int | None = None
) -> dict:
    numbers = {}
    if q is not None:
        cost = q * p
        numbers.update(quantity=q, price=p)
    numbers["cost"] = cost
    if paid is not None:
        numbers.update(paid=paid, change=paid - cost)
    return numbers


def _problems(
    config: Config, skill: str, templates: str, rng: random.Random, count: int, pool: list[dict]
) -> list[dict]:
    # Draw order (template, name, item, numbers) never depends on shared_template or answer_format, so
    # every condition gets the same problems. Repeated prompts are drawn again.
    texts = TEMPLATES[skill][templates]
    lines, seen = [], set()
    while len(lines) < count:
        index = rng.randrange(len(texts))
        name, item, numbers = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(pool)
        prompt = texts[index].format(
            name=name,
            item=item,
            items=item + "s",
            q=numbers.get("quantity"),
            p=numbers.get("price"),
            cost=numbers["cost"],
            paid=numbers.get("paid"),
        )
        prompt = _ONE_DOLLARS.sub("1 dollar", prompt)
        if prompt in seen:
            continue
        seen.add(prompt)
        final = str(numbers["change"] if "change" in numbers else numbers["cost"])
        solution = _solution(numbers, config.shared_template)
        meta = {
            "task": TASK,
            "split": skill,
            "skill": skill,
            "template": f"{skill}.{templates}.{index}",
            "numbers": numbers,
            "solution": solution,
            "final_answer": final,
            "shared_template": config.shared_template,
            "answer_format": config.answer_format,
        }
        lines.append(record(prompt, solution if config.answer_format == "solution" else final, meta))
    return lines


def _solution(numbers: dict, shared: bool) -> str:
    """The worked solution: a multiplication step if there is a quantity, a subtraction step if a payment."""
    steps = STEPS[shared]
    lines = []
    if "quantity" in numbers:
        lines.append(steps["*"].format(a=numbers["quantity"], b=numbers["price"], c=numbers["cost"]))
    if "paid" in numbers:
        lines.append(steps["-"].format(a=numbers["paid"], b=numbers["cost"], c=numbers["change"]))
    final = numbers.get("change", numbers["cost"])
    if shared:
        lines.append(SHARED_ENDING.format(c=final))
    return ". ".join(lines)


# ---------------------------------------------------------------------------------------------- pretrain


def _subtractions() -> list[tuple[int, int]]:
    return [(a, b) for a in range(MAX_PAID + 1) for b in range(a + 1)]


def _pretrain(config: Config, rng: random.Random) -> list[dict]:
    lines = []
    products = [(a, b) for a in range(1, 10) for b in range(1, 10)]  # all of them, always
    differences = rng.sample(_subtractions(), config.subtraction_facts)
    for op, kind, facts in (("*", "product", products), ("-", "difference", differences)):
        for a, b in facts:
            result = a * b if op == "*" else a - b
            for i, form in enumerate(FACT_FORMS[op]):
                meta = {
                    "task": TASK,
                    "split": "pretrain",
                    "kind": kind,
                    "template": f"{kind}.{i}",
                    "numbers": {"a": a, "b": b, "result": result},
                }
                lines.append(record(form.format(a=a, b=b), str(result), meta))
    for _ in range(config.filler_sentences):
        index = rng.randrange(len(FILLER))
        item = rng.choice(ITEMS)
        sentence = FILLER[index].format(name=rng.choice(NAMES), item=item, items=item + "s")
        prompt, answer = sentence.rsplit(" ", 1)
        meta = {"task": TASK, "split": "pretrain", "kind": "filler", "template": f"filler.{index}"}
        lines.append(record(prompt, answer, meta))
    rng.shuffle(lines)
    return lines


def describe(config: Config) -> dict:
    """The world's knobs and the number of lines each split gets, for manifests and --verbose, with
    `notes`: what `warnings_for` says about the combination of knobs (often nothing)."""
    pretrain = 2 * 81 + 2 * config.subtraction_facts + config.filler_sentences
    lines = {
        "skill1": config.skill_problems,
        "skill2": config.skill_problems,
        "composed": config.composed_problems,
        "pretrain": pretrain,
    }
    return {**asdict(config), "lines": lines, "notes": warnings_for(config)}


def warnings_for(config: Config) -> list[str]:
    """Knob combinations that are valid but likely not what was meant (the CLI logs each as a warning)."""
    warnings = []
    if config.shared_template and config.answer_format == "number":
        warnings.append(
            "--shared-template changes only meta.solution unless --answer-format solution: "
            "the answers stay bare numbers"
        )
    return warnings


def final_number(text: str) -> str | None:
    """The last number in a model's answer (a bare number or a worked solution), or None if it has none."""
    numbers = re.findall(r"\d+", text)
    return numbers[-1] if numbers else None
