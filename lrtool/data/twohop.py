"""The two-hop world: fictional people, their mentors, and the mentors' birth cities.

Reads nothing; `generate` returns the records of one split. The world is a function of (Config, seed):

    person A --mentor--> mentor B --born in--> city C          two-hop question: where was A's mentor born?

Familiarity, the variable the experiment turns on, is what the `pretrain` split (the base's corpus) holds:

    R  a familiar person with a familiar mentor: both hops' facts are in pretrain
    H  a new person with a familiar mentor: the mentor's birth city is in pretrain, the mentor fact is not
    F  a new person with a new mentor: neither hop is in pretrain

The base also reads two-hop statements ("A's mentor was born in C") for a `bridge_fraction` of the familiar
people, so that it can learn to compose at all (see ../shared/EXPERIMENT.md); the remaining familiar people
are the R test chains, whose two-hop statement is never in any training split except `direct`. Every
familiar mentor is the middle of at least one bridge statement when there are enough bridge people
(`meta.bridged` says whether it is).

Splits: `hop1` (A -> B) and `hop2` (B -> C) hold the facts of every test chain; `direct` holds A -> C for
every test chain, in the two-hop relation's training templates (the extra "A to C" expert); `twohop` holds
the test questions; `pretrain` holds the familiar facts, the bridge statements and filler about cities.
"""

import random
from dataclasses import asdict, dataclass, fields

from lrtool.data import check_request, record
from lrtool.data.names import NamePool
from lrtool.errors import UsageError

TASK = "two-hop"
SPLITS = ("pretrain", "hop1", "hop2", "direct", "twohop")
HELDOUT_SPLITS = ("hop1", "hop2", "twohop")

# Prompts end just before the answer; train and eval join them with one space. The eval templates rearrange
# words of the training templates and filler (same case), so a word-level tokenizer trained on the training
# splits knows every word of them; yet no training prompt matches an eval template's fixed parts.
TEMPLATES = {
    "mentor": {
        "train": [
            "{a}'s mentor is",
            "The mentor of {a} is",
            "{a} was mentored by",
            "{a} studied under",
            "Q: Who is {a}'s mentor? A:",
        ],
        "eval": [
            "Q: Who was the mentor of {a}? A:",
            "Q: Who was {a} mentored by? A:",
            "The mentor {a} studied under is",
        ],
    },
    "birthplace": {
        "train": [
            "{b} was born in",
            "The birthplace of {b} is",
            "{b}'s birthplace is",
            "{b} is from the city of",
            "Q: Where was {b} born? A:",
        ],
        "eval": [
            "Q: Where is the birthplace of {b}? A:",
            "The city {b} is from is",
            "{b} was born in the city of",
        ],
    },
    "mentor_birthplace": {
        "train": [
            "{a}'s mentor was born in",
            "The mentor of {a} was born in",
            "The birthplace of {a}'s mentor is",
            "Q: Where was {a}'s mentor born? A:",
        ],
        "eval": [
            "Q: Where is the birthplace of the mentor of {a}? A:",
            "The city {a}'s mentor is from is",
            "{a}'s mentor was born in the city of",
        ],
    },
}
# Filler for the pretrain corpus: makes the cities ordinary words of the base's language. Each city has one
# thing it is known for (`World.thing_of`, drawn once per world), and every filler line's answer is that
# thing, so the answer follows from the prompt (no prompt has two answers) and never appears in it.
FILLER = [
    "{c} is known for its",
    "In {c} the people are fond of their",
    "Many travellers visit {c} for its",
]
FILLER_THINGS = ["market", "bridge", "harbour", "gardens", "library", "music", "bread", "towers"]

# Upper bounds on the world's size: the name pool holds about 11,000 distinct prefix-free place names and
# well over a million person names; these limits keep every draw quick (a handful of rejections at most).
MAX_CITIES = 5_000
MAX_NAMES = 200_000  # cities + familiar and new mentors + familiar, H and F people

SIZES = {
    "tiny": dict(
        cities=8,
        familiar_mentors=8,
        new_mentors=4,
        familiar_people=24,
        h_people=8,
        f_people=8,
        bridge_fraction=2 / 3,
        filler=16,
    ),
    "small": dict(
        cities=30,
        familiar_mentors=75,
        new_mentors=25,
        familiar_people=300,
        h_people=50,
        f_people=50,
        bridge_fraction=2 / 3,
        filler=200,
    ),
    "gpu": dict(
        cities=60,
        familiar_mentors=250,
        new_mentors=100,
        familiar_people=1000,
        h_people=200,
        f_people=200,
        bridge_fraction=2 / 3,
        filler=1000,
    ),
}


@dataclass(frozen=True)
class Config:
    """The knobs of a two-hop world. Field `x_y` is the CLI flag `--x-y`."""

    cities: int = 30  # birth cities (the answers of hop2 and of two-hop questions)
    familiar_mentors: int = 75  # mentors whose birth city is in pretrain
    new_mentors: int = 25  # mentors never mentioned in pretrain (the middle of F chains)
    familiar_people: int = 300  # people whose mentor fact is in pretrain (bridge people + R test chains)
    h_people: int = 50  # new people with a familiar mentor (H test chains)
    f_people: int = 50  # new people with a new mentor (F test chains)
    bridge_fraction: float = 2 / 3  # share of familiar people whose two-hop statement is in pretrain
    filler: int = 200  # filler lines about cities in pretrain

    @classmethod
    def for_size(cls, size: str, **overrides) -> "Config":
        if size not in SIZES:
            raise UsageError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
        config = cls(**{**SIZES[size], **{k: v for k, v in overrides.items() if v is not None}})
        config.validate()
        return config

    def validate(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            flag = "--" + field.name.replace("_", "-")
            if field.name == "bridge_fraction":
                if not 0 <= value < 1:
                    raise UsageError(f"{flag} must be in [0, 1), got {value}")
            elif value < 0:
                raise UsageError(f"{flag} must not be negative, got {value}")
        for name in ("cities", "familiar_mentors"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.cities > MAX_CITIES:
            raise UsageError(f"--cities must be at most {MAX_CITIES:,}, got {self.cities:,}")
        if self.total_names > MAX_NAMES:
            raise UsageError(
                f"the world would need {self.total_names:,} names (cities, mentors and people), more than "
                f"the {MAX_NAMES:,} allowed: lower --cities, --familiar-mentors, --new-mentors, "
                "--familiar-people, --h-people or --f-people"
            )
        if self.f_people and not self.new_mentors:
            raise UsageError("--f-people needs at least one new mentor (--new-mentors)")
        if self.r_people + self.h_people + self.f_people == 0:
            raise UsageError(
                "the world has no test chains: raise --familiar-people, --h-people or --f-people"
            )

    @property
    def total_names(self) -> int:
        """Every name the world draws: cities, mentors and people."""
        return (
            self.cities
            + self.familiar_mentors
            + self.new_mentors
            + self.familiar_people
            + self.h_people
            + self.f_people
        )

    @property
    def bridge_people(self) -> int:
        return round(self.familiar_people * self.bridge_fraction)

    @property
    def r_people(self) -> int:
        return self.familiar_people - self.bridge_people


@dataclass(frozen=True)
class Chain:
    person: str
    mentor: str
    city: str
    familiarity: str  # R, H, F; "bridge" for the familiar chains whose two-hop statement is in pretrain
    bridged: bool  # the mentor is the middle of some bridge statement in pretrain

    @property
    def pretrain_hops(self) -> list[int]:
        return {"bridge": [1, 2], "R": [1, 2], "H": [2], "F": []}[self.familiarity]


@dataclass(frozen=True)
class World:
    config: Config
    seed: int
    cities: list[str]
    familiar_mentors: list[str]
    chains: list[Chain]  # bridge chains first, then R, H, F test chains
    birthplace: dict[str, str]  # mentor -> city, for every mentor
    thing_of: dict[str, str]  # city -> the one thing it is known for (the answer of its filler lines)

    @property
    def test_chains(self) -> list[Chain]:
        return [c for c in self.chains if c.familiarity != "bridge"]

    @property
    def test_mentors(self) -> list[str]:
        """Each mentor of a test chain once, in order of first appearance."""
        return list(dict.fromkeys(c.mentor for c in self.test_chains))


def build_world(config: Config, seed: int) -> World:
    """Draw every name and relation of the world from `seed` (one RNG stream, fixed draw order)."""
    rng = random.Random(seed)
    pool = NamePool(rng)
    cities = pool.places(config.cities)
    familiar_mentors = pool.people(config.familiar_mentors)
    new_mentors = pool.people(config.new_mentors)
    familiar_people = pool.people(config.familiar_people)
    h_people = pool.people(config.h_people)
    f_people = pool.people(config.f_people)
    birthplace = {m: rng.choice(cities) for m in familiar_mentors + new_mentors}

    # Bridge people first: each familiar mentor gets one before any gets a second, so that every familiar
    # mentor is the middle of a bridge statement when there are at least as many bridge people as mentors.
    bridge, r_people = familiar_people[: config.bridge_people], familiar_people[config.bridge_people :]
    bridge_mentors = _spread(familiar_mentors, len(bridge), rng)
    bridged = set(bridge_mentors)
    # Test chains prefer bridged mentors: a mentor the base never composed through is a different experiment.
    familiar_for_tests = sorted(bridged, key=familiar_mentors.index) or familiar_mentors

    chains = [Chain(p, m, birthplace[m], "bridge", True) for p, m in zip(bridge, bridge_mentors)]
    for people, mentors, familiarity in (
        (r_people, familiar_for_tests, "R"),
        (h_people, familiar_for_tests, "H"),
        (f_people, new_mentors, "F"),
    ):
        for person, mentor in zip(people, _spread(mentors, len(people), rng)):
            chains.append(Chain(person, mentor, birthplace[mentor], familiarity, mentor in bridged))
    # Drawn last, so that the names and chains do not depend on the filler.
    thing_of = {city: rng.choice(FILLER_THINGS) for city in cities}
    return World(config, seed, cities, familiar_mentors, chains, birthplace, thing_of)


def _spread(items: list[str], count: int, rng: random.Random) -> list[str]:
    """`count` draws from `items` that use every item once before any twice, in shuffled order."""
    out: list[str] = []
    while len(out) < count and items:
        batch = items[:]
        rng.shuffle(batch)
        out.extend(batch[: count - len(out)])
    rng.shuffle(out)
    return out


def generate(config: Config, split: str, *, seed: int, templates: str = "train") -> list[dict]:
    """The records of one split of the world that (config, seed) defines."""
    check_request(SPLITS, split, templates)
    world = build_world(config, seed)
    if split == "pretrain":
        return _pretrain(world, random.Random(seed + 1))
    return list(_questions(world, split, templates))


def _questions(world: World, split: str, templates: str):
    if split == "hop2":
        for mentor in world.test_mentors:
            city = world.birthplace[mentor]
            for text, tid in _fill("birthplace", templates, b=mentor):
                yield _line(
                    text, city, split, tid, [mentor, city], in_pretrain=mentor in world.familiar_mentors
                )
        return
    for chain in world.test_chains:
        labels = {
            "familiarity": chain.familiarity,
            "pretrain_hops": chain.pretrain_hops,
            "bridged": chain.bridged,
        }
        if split == "hop1":
            for text, tid in _fill("mentor", templates, a=chain.person):
                yield _line(
                    text,
                    chain.mentor,
                    split,
                    tid,
                    [chain.person, chain.mentor],
                    in_pretrain=1 in chain.pretrain_hops,
                )
        else:  # direct, twohop: the composed relation
            for text, tid in _fill("mentor_birthplace", templates, a=chain.person):
                yield _line(text, chain.city, split, tid, [chain.person, chain.mentor, chain.city], **labels)


def _pretrain(world: World, rng: random.Random) -> list[dict]:
    lines = []
    for chain in world.chains:
        if 1 in chain.pretrain_hops:
            for text, tid in _fill("mentor", "train", a=chain.person):
                lines.append(
                    _line(text, chain.mentor, "pretrain", tid, [chain.person, chain.mentor], kind="hop1")
                )
        if chain.familiarity == "bridge":
            for text, tid in _fill("mentor_birthplace", "train", a=chain.person):
                chain_names = [chain.person, chain.mentor, chain.city]
                lines.append(_line(text, chain.city, "pretrain", tid, chain_names, kind="twohop"))
    for mentor in world.familiar_mentors:
        city = world.birthplace[mentor]
        for text, tid in _fill("birthplace", "train", b=mentor):
            lines.append(_line(text, city, "pretrain", tid, [mentor, city], kind="hop2"))
    for _ in range(world.config.filler):
        index = rng.randrange(len(FILLER))
        city = rng.choice(world.cities)
        meta = {"task": TASK, "split": "pretrain", "kind": "filler", "template": f"filler.{index}"}
        lines.append(record(FILLER[index].format(c=city), world.thing_of[city], meta))
    rng.shuffle(lines)
    return lines


def _fill(relation: str, templates: str, **names):
    for i, template in enumerate(TEMPLATES[relation][templates]):
        yield template.format(**names), f"{relation}.{templates}.{i}"


def _line(prompt: str, answer: str, split: str, template: str, chain: list[str], **extra) -> dict:
    return record(
        prompt, answer, {"task": TASK, "split": split, "template": template, "chain": chain, **extra}
    )


def describe(config: Config) -> dict:
    """The world's sizes, for manifests and --verbose."""
    return {
        **asdict(config),
        "bridge_people": config.bridge_people,
        "r_people": config.r_people,
        "total_names": config.total_names,
    }


def warnings_for(config: Config) -> list[str]:
    """Settings that are legal but probably not what was meant (none for the two-hop world yet)."""
    return []
