"""Deterministic grade-school word problems: the project's embedded default data.

Every problem needs 1 to 3 arithmetic steps (+, -, x, exact division) and has a non-negative integer
answer below 10,000. Each variant builds its numbers backwards from the answer where division or
subtraction is involved, so no draw is ever rejected for a fraction or a negative result.

meta["operands"] holds every number that appears in the question, by name, so a test can recompute
the answer from the wording without reusing this module's arithmetic.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import NamedTuple

from rlsc.errors import RlscError
from rlsc.problems import Problem

NAMES = (
    "Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jamal",
    "Kira", "Liam", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sami", "Tariq",
    "Uma", "Victor", "Wen", "Ximena", "Yusuf", "Zoe", "Aiden", "Bella", "Carlos", "Dana",
)  # fmt: skip
SHOP_ITEMS = ("notebooks", "pens", "apples", "candles", "mugs", "posters", "socks", "balloons", "plates")
TREATS = ("cookies", "muffins", "cupcakes", "rolls", "brownies", "scones", "bagels")
VEHICLES = ("train", "bus", "truck", "ferry", "van")
PURCHASES = ("bike", "game", "jacket", "guitar", "backpack", "telescope")
CROPS = ("tomatoes", "strawberries", "peppers", "cucumbers", "plums", "lemons")
SEEDLINGS = ("sunflowers", "bean plants", "lettuce plants", "rose bushes", "pepper plants")
PRODUCTS = ("bottles", "jars", "cans", "toys", "bolts", "bricks")
TOWNS = ("Springfield", "Riverton", "Lakeside", "Hillview", "Oakdale", "Brookfield", "Fairview", "Pine Ridge")
ACTIVITIES = ("science project", "quiz game", "field trip", "reading circle", "art project", "relay race")
SHARED_THINGS = ("stickers", "marbles", "cards", "beads", "stamps", "shells")

MAX_ATTEMPTS = 1000  # consecutive duplicate draws before we conclude the space is exhausted


class Draft(NamedTuple):
    question: str
    operands: dict[str, int]
    answer: int


Variant = Callable[[random.Random], Draft]


def _remainder_to_drop(rng: random.Random, total: int, divisor: int) -> int:
    """A positive amount to remove from `total` so that what is left divides evenly by `divisor`."""
    base = total % divisor or divisor
    return base + divisor * rng.randint(0, 2)


# --- shopping ---------------------------------------------------------------------------------


def _shopping_1(rng: random.Random) -> Draft:
    name, item = rng.choice(NAMES), rng.choice(SHOP_ITEMS)
    count, price = rng.randint(2, 9), rng.randint(2, 25)
    q = f"{name} buys {count} {item} that cost ${price} each. How many dollars does {name} spend?"
    return Draft(q, {"count": count, "price": price}, count * price)


def _shopping_2(rng: random.Random) -> Draft:
    name, item = rng.choice(NAMES), rng.choice(SHOP_ITEMS)
    count, price = rng.randint(2, 6), rng.randint(2, 15)
    bill = rng.choice([b for b in (20, 50, 100) if b > count * price])
    q = (
        f"{name} buys {count} {item} at ${price} each and pays with a ${bill} bill. "
        f"How many dollars of change does {name} get?"
    )
    return Draft(q, {"count": count, "price": price, "bill": bill}, bill - count * price)


def _shopping_3(rng: random.Random) -> Draft:
    name, (item1, item2) = rng.choice(NAMES), rng.sample(SHOP_ITEMS, 2)
    c1, p1, c2, p2 = rng.randint(2, 8), rng.randint(2, 20), rng.randint(2, 8), rng.randint(2, 20)
    q = (
        f"{name} buys {c1} {item1} at ${p1} each and {c2} {item2} at ${p2} each. "
        f"How many dollars does {name} spend in total?"
    )
    return Draft(q, {"count1": c1, "price1": p1, "count2": c2, "price2": p2}, c1 * p1 + c2 * p2)


# --- baking -----------------------------------------------------------------------------------


def _baking_1(rng: random.Random) -> Draft:
    name, treat = rng.choice(NAMES), rng.choice(TREATS)
    trays, per = rng.randint(2, 8), rng.randint(6, 24)
    q = f"{name} bakes {trays} trays of {treat} with {per} {treat} on each tray. How many {treat} does {name} bake?"
    return Draft(q, {"trays": trays, "per_tray": per}, trays * per)


def _baking_2(rng: random.Random) -> Draft:
    name, treat = rng.choice(NAMES), rng.choice(TREATS)
    boxes, each, eaten = rng.randint(2, 8), rng.randint(3, 12), rng.randint(1, 9)
    total = boxes * each + eaten
    q = (
        f"{name} bakes {total} {treat} and eats {eaten} of them. The rest are packed equally into "
        f"{boxes} boxes. How many {treat} are in each box?"
    )
    return Draft(q, {"baked": total, "eaten": eaten, "boxes": boxes}, each)


def _baking_3(rng: random.Random) -> Draft:
    (name, friend), treat = rng.sample(NAMES, 2), rng.choice(TREATS)
    trays, per, boxes = rng.randint(2, 5), rng.randint(4, 12), rng.randint(2, 6)
    each = trays * per // boxes + rng.randint(1, 4)
    extra = boxes * each - trays * per
    q = (
        f"{name} bakes {trays} trays of {per} {treat}, and {friend} bakes {extra} more. They pack all "
        f"the {treat} equally into {boxes} boxes. How many {treat} are in each box?"
    )
    return Draft(q, {"trays": trays, "per_tray": per, "extra": extra, "boxes": boxes}, each)


# --- travel -----------------------------------------------------------------------------------


def _travel_1(rng: random.Random) -> Draft:
    vehicle, town = rng.choice(VEHICLES), rng.choice(TOWNS)
    speed, hours = 5 * rng.randint(6, 24), rng.randint(2, 9)
    q = (
        f"A {vehicle} leaves {town} and travels at {speed} kilometers per hour for {hours} hours. "
        f"How many kilometers does it travel?"
    )
    return Draft(q, {"speed": speed, "hours": hours}, speed * hours)


def _travel_2(rng: random.Random) -> Draft:
    name = rng.choice(NAMES)
    morning, afternoon, left = rng.randint(20, 150), rng.randint(20, 150), rng.randint(10, 200)
    trip = morning + afternoon + left
    q = (
        f"{name} is on a {trip}-kilometer trip and drives {morning} kilometers in the morning and "
        f"{afternoon} kilometers in the afternoon. How many kilometers are left to drive?"
    )
    return Draft(q, {"trip": trip, "morning": morning, "afternoon": afternoon}, left)


def _travel_3(rng: random.Random) -> Draft:
    name = rng.choice(NAMES)
    s1, h1, s2, h2 = 5 * rng.randint(8, 20), rng.randint(2, 5), 5 * rng.randint(8, 20), rng.randint(2, 5)
    q = (
        f"{name} drives at {s1} kilometers per hour for {h1} hours and then at {s2} kilometers per hour "
        f"for {h2} hours. How many kilometers does {name} drive in total?"
    )
    return Draft(q, {"speed1": s1, "hours1": h1, "speed2": s2, "hours2": h2}, s1 * h1 + s2 * h2)


# --- savings ----------------------------------------------------------------------------------


def _savings_1(rng: random.Random) -> Draft:
    name = rng.choice(NAMES)
    weekly, weeks = rng.randint(3, 40), rng.randint(2, 20)
    q = f"{name} saves ${weekly} every week. How many dollars has {name} saved after {weeks} weeks?"
    return Draft(q, {"weekly": weekly, "weeks": weeks}, weekly * weeks)


def _savings_2(rng: random.Random) -> Draft:
    name = rng.choice(NAMES)
    start, weekly, weeks = rng.randint(5, 200), rng.randint(3, 30), rng.randint(2, 12)
    q = f"{name} has ${start} and saves ${weekly} every week. How many dollars does {name} have after {weeks} weeks?"
    return Draft(q, {"start": start, "weekly": weekly, "weeks": weeks}, start + weekly * weeks)


def _savings_3(rng: random.Random) -> Draft:
    name, thing = rng.choice(NAMES), rng.choice(PURCHASES)
    start, weekly, weeks = rng.randint(5, 200), rng.randint(3, 30), rng.randint(2, 12)
    saved = start + weekly * weeks
    spent = rng.randint(saved // 4, saved - 1)
    q = (
        f"{name} has ${start} and saves ${weekly} every week for {weeks} weeks. Then {name} spends "
        f"${spent} on a {thing}. How many dollars does {name} have left?"
    )
    return Draft(q, {"start": start, "weekly": weekly, "weeks": weeks, "spent": spent}, saved - spent)


# --- garden -----------------------------------------------------------------------------------


def _garden_1(rng: random.Random) -> Draft:
    name, crop = rng.choice(NAMES), rng.choice(CROPS)
    monday, tuesday = rng.randint(5, 80), rng.randint(5, 80)
    q = f"{name} picks {monday} {crop} on Monday and {tuesday} {crop} on Tuesday. How many {crop} does {name} pick?"
    return Draft(q, {"monday": monday, "tuesday": tuesday}, monday + tuesday)


def _garden_2(rng: random.Random) -> Draft:
    name, plant = rng.choice(NAMES), rng.choice(SEEDLINGS)
    rows, per = rng.randint(3, 12), rng.randint(4, 15)
    failed = rng.randint(2, rows * per // 3)  # at least 2, so "do not grow" reads right
    q = (
        f"{name} plants {rows} rows of {plant} with {per} in each row. Of those, {failed} do not grow. "
        f"How many of the {plant} grow?"
    )
    return Draft(q, {"rows": rows, "per_row": per, "failed": failed}, rows * per - failed)


def _garden_3(rng: random.Random) -> Draft:
    name = rng.choice(NAMES)
    rows, per, neighbors = rng.randint(4, 10), rng.randint(5, 15), rng.randint(2, 6)
    kept = _remainder_to_drop(rng, rows * per, neighbors)
    q = (
        f"{name} harvests {rows} rows of carrots with {per} carrots in each row and keeps {kept} of them. "
        f"The rest are shared equally among {neighbors} neighbors. How many carrots does each neighbor get?"
    )
    operands = {"rows": rows, "per_row": per, "kept": kept, "neighbors": neighbors}
    return Draft(q, operands, (rows * per - kept) // neighbors)


# --- library ----------------------------------------------------------------------------------


def _library_1(rng: random.Random) -> Draft:
    town, monday = rng.choice(TOWNS), rng.randint(10, 90)
    tuesday = monday + rng.randint(1, 60)
    q = (
        f"The {town} library lends out {monday} books on Monday and {tuesday} books on Tuesday. "
        f"How many more books does it lend out on Tuesday than on Monday?"
    )
    return Draft(q, {"monday": monday, "tuesday": tuesday}, tuesday - monday)


def _library_2(rng: random.Random) -> Draft:
    shelved = rng.randint(200, 2000)
    lent, donated = rng.randint(10, shelved // 2), rng.randint(5, 150)
    q = (
        f"A library has {shelved} books on its shelves. It lends out {lent} of them and then puts "
        f"{donated} donated books on the shelves. How many books are on its shelves now?"
    )
    return Draft(q, {"shelved": shelved, "lent": lent, "donated": donated}, shelved - lent + donated)


def _library_3(rng: random.Random) -> Draft:
    name = rng.choice(NAMES)
    per_day, days, last, left = (
        rng.randint(5, 30),
        rng.randint(2, 10),
        rng.randint(3, 25),
        rng.randint(1, 200),
    )
    pages = per_day * days + last + left
    q = (
        f"{name} borrows a library book with {pages} pages. {name} reads {per_day} pages a day for "
        f"{days} days and then {last} pages the next day. How many pages does {name} still have to read?"
    )
    return Draft(q, {"pages": pages, "per_day": per_day, "days": days, "last_day": last}, left)


# --- classroom --------------------------------------------------------------------------------


def _classroom_1(rng: random.Random) -> Draft:
    teacher, activity = rng.choice(NAMES), rng.choice(ACTIVITIES)
    groups, size = rng.randint(2, 10), rng.randint(3, 12)
    q = (
        f"The {groups * size} students in {teacher}'s class split into {groups} equal groups for a {activity}. "
        f"How many students are in each group?"
    )
    return Draft(q, {"students": groups * size, "groups": groups}, size)


def _classroom_2(rng: random.Random) -> Draft:
    teacher = rng.choice(NAMES)
    rows, per_row = rng.randint(2, 6), rng.randint(3, 8)
    girls = rng.randint(2, rows * per_row - 2)
    boys = rows * per_row - girls
    q = (
        f"{teacher}'s class has {girls} girls and {boys} boys. The students sit in {rows} rows with the same "
        f"number of students in each row. How many students sit in each row?"
    )
    return Draft(q, {"girls": girls, "boys": boys, "rows": rows}, per_row)


def _classroom_3(rng: random.Random) -> Draft:
    teacher = rng.choice(NAMES)
    students, each, per_pack = rng.randint(12, 30), rng.randint(2, 4), rng.choice((10, 12, 20, 24))
    needed = students * each
    packs = -(-needed // per_pack) + rng.randint(0, 3)  # ceiling, so there are always enough pencils
    q = (
        f"{teacher} has {packs} packs of {per_pack} pencils and gives {each} pencils to each of the "
        f"{students} students in class. How many pencils does {teacher} have left?"
    )
    operands = {"packs": packs, "per_pack": per_pack, "each": each, "students": students}
    return Draft(q, operands, packs * per_pack - needed)


# --- factory ----------------------------------------------------------------------------------


def _factory_1(rng: random.Random) -> Draft:
    product, town = rng.choice(PRODUCTS), rng.choice(TOWNS)
    per_crate, crates = rng.randint(4, 24), rng.randint(5, 40)
    q = (
        f"A factory in {town} packs {per_crate * crates} {product} into crates of {per_crate}. "
        f"How many crates does it fill?"
    )
    return Draft(q, {"items": per_crate * crates, "per_crate": per_crate}, crates)


def _factory_2(rng: random.Random) -> Draft:
    product = rng.choice(PRODUCTS)
    machines, rate, hours = rng.randint(2, 9), rng.randint(5, 60), rng.randint(2, 8)
    q = (
        f"A factory has {machines} machines, and each machine makes {rate} {product} per hour. "
        f"How many {product} do the machines make in {hours} hours?"
    )
    return Draft(q, {"machines": machines, "rate": rate, "hours": hours}, machines * rate * hours)


def _factory_3(rng: random.Random) -> Draft:
    product = rng.choice(PRODUCTS)
    rate, hours, per_box = rng.randint(20, 90), rng.randint(3, 9), rng.randint(4, 12)
    faulty = _remainder_to_drop(rng, rate * hours, per_box)
    q = (
        f"A machine makes {rate} {product} per hour for {hours} hours, and {faulty} of them are faulty. "
        f"The good ones are packed in boxes of {per_box}. How many boxes are filled?"
    )
    operands = {"rate": rate, "hours": hours, "faulty": faulty, "per_box": per_box}
    return Draft(q, operands, (rate * hours - faulty) // per_box)


# --- sharing ----------------------------------------------------------------------------------


def _sharing_1(rng: random.Random) -> Draft:
    name, thing = rng.choice(NAMES), rng.choice(SHARED_THINGS)
    friends, each = rng.randint(2, 9), rng.randint(2, 15)
    q = (
        f"{name} shares {friends * each} {thing} equally among {friends} friends. "
        f"How many {thing} does each friend get?"
    )
    return Draft(q, {"total": friends * each, "friends": friends}, each)


def _sharing_2(rng: random.Random) -> Draft:
    (name, giver), thing = rng.sample(NAMES, 2), rng.choice(SHARED_THINGS)
    friends, each = rng.randint(2, 8), rng.randint(3, 15)
    had = rng.randint(1, friends * each - 1)
    given = friends * each - had
    q = (
        f"{name} has {had} {thing}, and {giver} gives {name} {given} more. {name} then shares all of "
        f"them equally among {friends} friends. How many {thing} does each friend get?"
    )
    return Draft(q, {"had": had, "given": given, "friends": friends}, each)


def _sharing_3(rng: random.Random) -> Draft:
    (n1, n2, n3), thing = rng.sample(NAMES, 3), rng.choice(SHARED_THINGS)
    each = rng.randint(4, 40)
    first = rng.randint(1, 3 * each - 2)
    second = rng.randint(1, 3 * each - first - 1)
    third = 3 * each - first - second
    q = (
        f"{n1} has {first} {thing}, {n2} has {second}, and {n3} has {third}. They put them together and "
        f"share them equally among the three of them. How many {thing} does each of them get?"
    )
    return Draft(q, {"first": first, "second": second, "third": third}, each)


VARIANTS: dict[str, dict[int, Variant]] = {
    "shopping": {1: _shopping_1, 2: _shopping_2, 3: _shopping_3},
    "baking": {1: _baking_1, 2: _baking_2, 3: _baking_3},
    "travel": {1: _travel_1, 2: _travel_2, 3: _travel_3},
    "savings": {1: _savings_1, 2: _savings_2, 3: _savings_3},
    "garden": {1: _garden_1, 2: _garden_2, 3: _garden_3},
    "library": {1: _library_1, 2: _library_2, 3: _library_3},
    "classroom": {1: _classroom_1, 2: _classroom_2, 3: _classroom_3},
    "factory": {1: _factory_1, 2: _factory_2, 3: _factory_3},
    "sharing": {1: _sharing_1, 2: _sharing_2, 3: _sharing_3},
}
TEMPLATES: tuple[str, ...] = tuple(VARIANTS)
STEPS: tuple[int, ...] = (1, 2, 3)


def _checked_templates(templates: list[str] | None) -> list[str]:
    chosen = list(TEMPLATES) if templates is None else list(dict.fromkeys(templates))
    unknown = [t for t in chosen if t not in VARIANTS]
    if unknown or not chosen:
        raise RlscError(
            f"unknown or empty synthetic templates {unknown or chosen}; known: {', '.join(TEMPLATES)}"
        )
    return chosen


def _checked_steps(steps: Iterable[int]) -> list[int]:
    chosen = list(dict.fromkeys(steps))
    if not chosen or any(s not in STEPS for s in chosen):
        raise RlscError(f"synthetic steps must be a non-empty subset of {STEPS}, got {tuple(steps)}")
    return chosen


def _draw_unique(rng: random.Random, variant: Variant, taken: set[str], label: str) -> Draft:
    for _ in range(MAX_ATTEMPTS):
        draft = variant(rng)
        if draft.question not in taken:
            return draft
    raise RlscError(
        f"could not draw a new {label} problem after {MAX_ATTEMPTS} tries; ask for fewer problems"
    )


def generate_problems(
    n: int,
    seed: int,
    templates: list[str] | None = None,
    steps: tuple[int, ...] = STEPS,
    exclude: Iterable[str] = (),
) -> list[Problem]:
    """`n` unique word problems, identical for identical arguments; none has a question in `exclude`.

    Template/step pairs are dealt in shuffled rounds, so even a small set covers every pair evenly, and
    a shorter call returns a prefix of a longer one with the same arguments.
    """
    if n < 0 or seed < 0:
        # random.Random(-s) equals random.Random(s), so a negative seed would silently repeat a positive one
        raise RlscError(f"synthetic problem count and seed must be non-negative, got n={n}, seed={seed}")
    pairs = [(t, s) for t in _checked_templates(templates) for s in _checked_steps(steps)]
    rng = random.Random(seed)
    taken = set(exclude)
    problems: list[Problem] = []
    deck: list[tuple[str, int]] = []
    while len(problems) < n:
        if not deck:
            deck = pairs[:]
            rng.shuffle(deck)
        template, k = deck.pop()
        draft = _draw_unique(rng, VARIANTS[template][k], taken, f"{template}/{k}-step")
        taken.add(draft.question)
        meta = {"template": template, "steps": k, "operands": draft.operands}
        problems.append(
            Problem(f"synth-{seed}-{len(problems)}", draft.question, str(draft.answer), "synthetic", meta)
        )
    return problems
