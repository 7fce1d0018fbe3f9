"""Generated math problems with worked solutions: the built-in corpus's `math` domain.

Generated rather than shipped because a generator is smaller than its output, has no licence to track, and gives
as many documents as a run needs. Each document is one problem: the question, a blank line, then a step-by-step
solution ending in "Answer: ...". So a chat template can put the question in the user turn and the solution in the
assistant turn (see `chat.split_turns`). Exact arithmetic only (integers and `Fraction`), so the text is the same
for a seed on every machine and Python version.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator
from fractions import Fraction

NAMES = ["Ada", "Bilal", "Chen", "Dana", "Emeka", "Fatima", "Gus", "Hana", "Ivan", "Juno", "Kofi", "Lena",
         "Mateo", "Nadia", "Oscar", "Priya", "Ravi", "Sofia", "Tomas", "Yuki"]
ITEMS = [("pen", "pens"), ("melon", "melons"), ("stamp", "stamps"), ("candle", "candles"), ("cup", "cups"),
         ("poster", "posters"), ("bag of rice", "bags of rice"), ("bus ticket", "bus tickets")]


def _dec(q: Fraction, places: int = 2) -> str:
    """A fraction as a decimal rounded half up to `places`, without trailing zeros: exact, no float repr."""
    scaled = q * 10**places
    n = math.floor(scaled + Fraction(1, 2)) if scaled >= 0 else -math.floor(-scaled + Fraction(1, 2))
    sign, n = ("-" if n < 0 else ""), abs(n)
    whole, frac = divmod(n, 10**places)
    frac_s = f"{frac:0{places}d}".rstrip("0") if places else ""
    return f"{sign}{whole}" + (f".{frac_s}" if frac_s else "")


def _money(q: Fraction) -> str:
    """Whole amounts as they are, others with two decimals ($8.60, not $8.6)."""
    whole, _, cents = _dec(q).partition(".")
    return f"{whole}.{cents:0<2}" if cents else whole


def _frac(q: Fraction) -> str:
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def _signed(n: int) -> str:
    return f"+ {n}" if n >= 0 else f"- {-n}"


def linear_equation(rng: random.Random) -> tuple[str, str]:
    a, b, x = rng.randint(2, 15), rng.randint(-60, 60), rng.randint(-25, 25)
    c = a * x + b
    return (f"Solve for x: {a}x {_signed(b)} = {c}.",
            (f"Move the constant to the right-hand side: {a}x = {c} {_signed(-b)} = {c - b}.\n"
            f"Divide both sides by {a}: x = {c - b}/{a} = {x}.\n"
            f"Check: {a} * ({x}) {_signed(b)} = {a * x + b}.\nAnswer: x = {x}"))


def two_sided_equation(rng: random.Random) -> tuple[str, str]:
    a, c = rng.sample(range(2, 13), 2)
    x, b = rng.randint(-12, 12), rng.randint(-30, 30)
    d = a * x + b - c * x
    return (f"Find x if {a}x {_signed(b)} = {c}x {_signed(d)}.",
            (f"Collect the x terms on the left: {a}x - {c}x = {d} {_signed(-b)}.\n"
            f"So {a - c}x = {d - b}, and x = {d - b}/{a - c} = {x}.\nAnswer: x = {x}"))


def linear_system(rng: random.Random) -> tuple[str, str]:
    x, y = rng.randint(-9, 9), rng.randint(-9, 9)
    while True:
        a, b, c, d = (rng.randint(1, 7) * rng.choice([1, -1]) for _ in range(4))
        if a * d - b * c:
            break
    e, f = a * x + b * y, c * x + d * y
    det = a * d - b * c
    return (f"Solve the system of equations:\n{a}x {_signed(b)}y = {e}\n{c}x {_signed(d)}y = {f}",
            (f"Eliminate y: multiply the first equation by {d} and the second by {b}, then subtract.\n"
            f"({a * d} - {b * c})x = {e * d} - {f * b}, so {det}x = {e * d - f * b} and x = {x}.\n"
            f"Substitute into the first equation: {a} * ({x}) {_signed(b)}y = {e}, so {b}y = {e - a * x} "
            f"and y = {y}.\nAnswer: x = {x}, y = {y}"))


def quadratic(rng: random.Random) -> tuple[str, str]:
    r1, r2 = rng.randint(-10, 10), rng.randint(-10, 10)
    b, c = -(r1 + r2), r1 * r2
    lo, hi = sorted((r1, r2))
    roots = f"x = {lo}" if lo == hi else f"x = {lo} or x = {hi}"
    return (f"Solve x^2 {_signed(b)}x {_signed(c)} = 0.",
            (f"Look for two numbers whose product is {c} and whose sum is {-b}: {r1} and {r2}.\n"
            f"So the equation factors as (x {_signed(-r1)})(x {_signed(-r2)}) = 0.\n"
            f"A product is zero when one factor is zero.\nAnswer: {roots}"))


def fraction_arithmetic(rng: random.Random) -> tuple[str, str]:
    p = Fraction(rng.randint(1, 11), rng.randint(2, 12))
    q = Fraction(rng.randint(1, 11), rng.randint(2, 12))
    op = rng.choice("+-*/")
    if op in "+-":
        den = p.denominator * q.denominator // math.gcd(p.denominator, q.denominator)
        a, b = p.numerator * (den // p.denominator), q.numerator * (den // q.denominator)
        r = p + q if op == "+" else p - q
        steps = (f"The least common denominator of {p.denominator} and {q.denominator} is {den}.\n"
                 f"{_frac(p)} = {a}/{den} and {_frac(q)} = {b}/{den}.\n"
                 f"{a}/{den} {op} {b}/{den} = {a + b if op == '+' else a - b}/{den}")
    elif op == "*":
        r = p * q
        steps = (f"Multiply the numerators and the denominators: {p.numerator * q.numerator}/"
                 f"{p.denominator * q.denominator}")
    else:
        r = p / q
        steps = (f"Dividing by {_frac(q)} is multiplying by its reciprocal {q.denominator}/{q.numerator}: "
                 f"{p.numerator * q.denominator}/{p.denominator * q.numerator}")
    return (f"Compute {_frac(p)} {op} {_frac(q)} and simplify.",
            f"{steps}, which simplifies to {_frac(r)}.\nAnswer: {_frac(r)}")


def percentage(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        price, pct = rng.randint(8, 400), rng.choice([5, 10, 12, 15, 20, 25, 30, 35, 40, 60])
        off = Fraction(price * pct, 100)
        return (f"A {rng.choice(ITEMS)[0]} costs ${price}. It is sold at {pct}% off. What is the new price?",
                (f"The discount is {pct}% of {price} = {price} * {pct}/100 = {_dec(off)}.\n"
                f"New price: {price} - {_dec(off)} = {_dec(price - off)}.\nAnswer: ${_money(price - off)}"))
    if kind == 1:
        old, new = rng.randint(20, 500), rng.randint(20, 500)
        change = Fraction(new - old, old) * 100
        word = "increase" if new >= old else "decrease"
        return (f"A town's population went from {old} thousand to {new} thousand. By what percent did it change?",
                (f"Change: {new} - {old} = {new - old} thousand.\nRelative to the start: {new - old}/{old} * 100 = "
                f"{_dec(change)}%.\nAnswer: a {_dec(abs(change))}% {word}"))
    whole, pct = rng.randint(40, 2000), rng.randint(1, 99)
    part = Fraction(whole * pct, 100)
    return (f"What is {pct}% of {whole}?",
            (f"{pct}% means {pct}/100, so {pct}/100 * {whole} = {whole * pct}/100 = {_dec(part)}.\n"
            f"Answer: {_dec(part)}"))


UNITS = [  # (unit, other unit, how many of the other in one unit, exact)
    ("kilometre", "metres", Fraction(1000)), ("hour", "minutes", Fraction(60)), ("kilogram", "grams", Fraction(1000)),
    ("litre", "millilitres", Fraction(1000)), ("inch", "centimetres", Fraction(254, 100)),
    ("mile", "kilometres", Fraction(1609344, 1000000)), ("foot", "inches", Fraction(12)),
    ("day", "hours", Fraction(24)), ("pound", "ounces", Fraction(16)), ("yard", "metres", Fraction(9144, 10000)),
]


def unit_conversion(rng: random.Random) -> tuple[str, str]:
    unit, other, factor = rng.choice(UNITS)
    n = Fraction(rng.randint(1, 400), rng.choice([1, 1, 2, 4, 10]))
    plural = unit + ("es" if unit.endswith("inch") else "s")
    if rng.random() < 0.5:
        res = n * factor
        return (f"Convert {_dec(n)} {plural if n != 1 else unit} to {other}.",
                (f"One {unit} is {_dec(factor, 6)} {other}, so multiply: {_dec(n)} * {_dec(factor, 6)} = "
                f"{_dec(res, 4)}.\nAnswer: {_dec(res, 4)} {other}"))
    m = n * factor
    return (f"How many {plural} are {_dec(m, 4)} {other}?",
            (f"One {unit} is {_dec(factor, 6)} {other}, so divide: {_dec(m, 4)} / {_dec(factor, 6)} = {_dec(n, 4)}."
            f"\nAnswer: {_dec(n, 4)} {plural}"))


def order_of_operations(rng: random.Random) -> tuple[str, str]:
    a, b, c, d = rng.randint(2, 30), rng.randint(2, 12), rng.randint(2, 12), rng.randint(1, 50)
    return (f"Evaluate {a} + {b} * ({c} - {d % c}) - {d}.",
            (f"Parentheses first: {c} - {d % c} = {c - d % c}.\nThen multiplication: {b} * {c - d % c} = "
            f"{b * (c - d % c)}.\nThen left to right: {a} + {b * (c - d % c)} - {d} = {a + b * (c - d % c) - d}.\n"
            f"Answer: {a + b * (c - d % c) - d}"))


def gcd_lcm(rng: random.Random) -> tuple[str, str]:
    g = rng.randint(2, 15)
    a, b = g * rng.randint(2, 20), g * rng.randint(2, 20)
    gcd = math.gcd(a, b)
    lcm = a * b // gcd
    steps, x, y = [], max(a, b), min(a, b)
    while y:
        steps.append(f"{x} = {x // y} * {y} + {x % y}")
        x, y = y, x % y
    return (f"Find the greatest common divisor and the least common multiple of {a} and {b}.",
            "Euclid's algorithm:\n" + "\n".join(steps) + f"\nThe last non-zero remainder is {gcd}, so gcd = {gcd}.\n"
            f"lcm = {a} * {b} / {gcd} = {lcm}.\nAnswer: gcd = {gcd}, lcm = {lcm}")


def rate_problem(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    speed, hours = rng.randint(3, 90), rng.randint(2, 9)
    minutes = rng.choice([0, 15, 30, 45])
    t = hours + Fraction(minutes, 60)
    dist = speed * t
    return ((f"{name} travels at a steady {speed} km/h for {hours} hours and {minutes} minutes. How far does "
            f"{name} go?"),
            (f"The time in hours is {hours} + {minutes}/60 = {_dec(t)} hours.\nDistance = speed * time = "
            f"{speed} * {_dec(t)} = {_dec(dist)} km.\nAnswer: {_dec(dist)} km"))


def work_problem(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(NAMES, 2)
    ta, tb = rng.sample(range(2, 13), 2)
    together = Fraction(1, 1) / (Fraction(1, ta) + Fraction(1, tb))
    return ((f"{a} can paint a fence in {ta} hours and {b} can paint it in {tb} hours. How long do they take "
            f"working together?"),
            (f"In one hour {a} paints 1/{ta} of the fence and {b} paints 1/{tb}.\nTogether: 1/{ta} + 1/{tb} = "
            f"{_frac(Fraction(1, ta) + Fraction(1, tb))} of the fence per hour.\nTime = 1 / "
            f"{_frac(Fraction(1, ta) + Fraction(1, tb))} = {_frac(together)} hours, about {_dec(together)} hours.\n"
            f"Answer: {_frac(together)} hours"))


def age_problem(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(NAMES, 2)
    child, k, years = rng.randint(3, 20), rng.randint(2, 4), rng.randint(2, 15)
    parent = k * child
    return ((f"{a} is {k} times as old as {b}. In {years} years their ages will add up to {parent + child + 2 * years}."
            f" How old is {b} now?"),
            (f"Let {b}'s age be x, so {a} is {k}x.\nIn {years} years: (x + {years}) + ({k}x + {years}) = "
            f"{parent + child + 2 * years}.\nSo {k + 1}x + {2 * years} = {parent + child + 2 * years}, "
            f"{k + 1}x = {parent + child}, x = {child}.\nAnswer: {child}"))


def shopping(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    (i1, p1), (i2, p2) = rng.sample(ITEMS, 2)
    n1, n2 = rng.randint(2, 12), rng.randint(2, 12)
    c1, c2 = Fraction(rng.randint(50, 1500), 100), Fraction(rng.randint(50, 1500), 100)
    paid = (math.floor(n1 * c1 + n2 * c2) // 10 + 1) * 10
    total = n1 * c1 + n2 * c2
    return ((f"{name} buys {n1} {p1} at ${_money(c1)} each and {n2} {p2} at ${_money(c2)} each, and pays with ${paid}. "
            f"How much change does {name} get?"),
            (f"Cost of the {p1}: {n1} * {_dec(c1)} = {_dec(n1 * c1)}.\nCost of the {p2}: {n2} * {_dec(c2)} = "
            f"{_dec(n2 * c2)}.\nTotal: {_dec(n1 * c1)} + {_dec(n2 * c2)} = {_dec(total)}.\n"
            f"Change: {paid} - {_dec(total)} = {_dec(paid - total)}.\nAnswer: ${_money(paid - total)}"))


def interest(rng: random.Random) -> tuple[str, str]:
    principal, rate, years = rng.randint(5, 200) * 100, rng.choice([2, 3, 4, 5, 6, 8]), rng.randint(2, 6)
    if rng.random() < 0.5:
        i = Fraction(principal * rate * years, 100)
        return (f"What simple interest does ${principal} earn in {years} years at {rate}% a year?",
                (f"Simple interest = principal * rate * time = {principal} * {rate}/100 * {years} = {_dec(i)}.\n"
                f"Answer: ${_money(i)}"))
    amount, lines = Fraction(principal), []
    for y in range(1, years + 1):
        new = amount * (100 + rate) / 100
        lines.append(f"After year {y}: {_dec(amount)} * {_dec(Fraction(100 + rate, 100))} = {_dec(new)}")
        amount = new
    return (f"${principal} is invested at {rate}% a year, compounded yearly. What is it worth after {years} years?",
            "\n".join(lines) + f"\nAnswer: ${_money(amount)}")


def geometry(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        w, h = rng.randint(2, 60), rng.randint(2, 60)
        return (f"A rectangle is {w} cm wide and {h} cm long. Find its area and perimeter.",
                (f"Area = width * length = {w} * {h} = {w * h} square cm.\nPerimeter = 2 * (width + length) = "
                f"2 * ({w} + {h}) = {2 * (w + h)} cm.\nAnswer: area {w * h} square cm, perimeter {2 * (w + h)} cm"))
    if kind == 1:
        m = rng.randint(2, 8)
        n, k = rng.randint(1, m - 1), rng.randint(1, 4)  # Euclid's formula: a Pythagorean triple
        a, b, c = k * (m * m - n * n), k * 2 * m * n, k * (m * m + n * n)
        return (f"A right triangle has legs of {a} and {b}. How long is the hypotenuse?",
                (f"By the Pythagorean theorem, c^2 = {a}^2 + {b}^2 = {a * a} + {b * b} = {c * c}.\n"
                f"c = sqrt({c * c}) = {c}.\nAnswer: {c}"))
    r = rng.randint(1, 30)
    return (f"A circle has radius {r} m. What is its area, using pi = 3.14?",
            (f"Area = pi * r^2 = 3.14 * {r}^2 = 3.14 * {r * r} = {_dec(Fraction(314 * r * r, 100))} square metres.\n"
            f"Answer: {_dec(Fraction(314 * r * r, 100))} square metres"))


def statistics(rng: random.Random) -> tuple[str, str]:
    xs = [rng.randint(1, 99) for _ in range(rng.randint(5, 9))]
    s, ys = sorted(xs), len(xs)
    median = Fraction(s[ys // 2]) if ys % 2 else Fraction(s[ys // 2 - 1] + s[ys // 2], 2)
    mean = Fraction(sum(xs), ys)
    return (f"Find the mean and the median of: {', '.join(map(str, xs))}.",
            (f"Sum: {' + '.join(map(str, xs))} = {sum(xs)}. Mean: {sum(xs)}/{ys} = {_dec(mean)}.\n"
            f"Sorted: {', '.join(map(str, s))}. The median is the middle value"
            f"{'' if ys % 2 else ' (the mean of the two middle values)'}: {_dec(median)}.\n"
            f"Answer: mean {_dec(mean)}, median {_dec(median)}"))


def ratio(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(NAMES, 2)
    p, q = rng.randint(1, 9), rng.randint(1, 9)
    k = rng.randint(2, 40)
    total = (p + q) * k
    return (f"{a} and {b} share {total} marbles in the ratio {p}:{q}. How many does each get?",
            (f"There are {p} + {q} = {p + q} equal parts, each {total}/{p + q} = {k} marbles.\n"
            f"{a}: {p} * {k} = {p * k}. {b}: {q} * {k} = {q * k}.\nAnswer: {a} {p * k}, {b} {q * k}"))


def powers(rng: random.Random) -> tuple[str, str]:
    base, m, n = rng.randint(2, 9), rng.randint(1, 6), rng.randint(1, 6)
    return (f"Simplify {base}^{m} * {base}^{n} and evaluate it.",
            (f"When multiplying powers of the same base, add the exponents: {base}^({m} + {n}) = {base}^{m + n}.\n"
            f"{base}^{m + n} = {base ** (m + n)}.\nAnswer: {base ** (m + n)}"))


def arithmetic_series(rng: random.Random) -> tuple[str, str]:
    a, d, n = rng.randint(-10, 20), rng.randint(1, 9), rng.randint(5, 40)
    last = a + (n - 1) * d
    return (f"Find the sum of the first {n} terms of the arithmetic sequence {a}, {a + d}, {a + 2 * d}, ...",
            (f"The common difference is {d}. The {n}th term is {a} + ({n} - 1) * {d} = {last}.\n"
            f"Sum = n * (first + last) / 2 = {n} * ({a} + {last}) / 2 = {n * (a + last) // 2}.\n"
            f"Answer: {n * (a + last) // 2}"))


def probability(rng: random.Random) -> tuple[str, str]:
    red, blue = rng.randint(1, 12), rng.randint(1, 12)
    total = red + blue
    p = Fraction(red * (red - 1), total * (total - 1))
    return ((f"A bag holds {red} red and {blue} blue balls. Two are drawn without replacement. What is the "
            f"probability that both are red?"),
            (f"First draw red: {red}/{total}. Then red again: {red - 1}/{total - 1}.\n"
            f"Multiply: {red}/{total} * {red - 1}/{total - 1} = {red * (red - 1)}/{total * (total - 1)} = "
            f"{_frac(p)}.\nAnswer: {_frac(p)}"))


KINDS: list[Callable[[random.Random], tuple[str, str]]] = [
    linear_equation, two_sided_equation, linear_system, quadratic, fraction_arithmetic, percentage,
    unit_conversion, order_of_operations, gcd_lcm, rate_problem, work_problem, age_problem, shopping, interest,
    geometry, statistics, ratio, powers, arithmetic_series, probability,
]


def math_problem(rng: random.Random) -> str:
    """One problem of a kind drawn by `rng`: the question, a blank line, the worked solution."""
    question, solution = rng.choice(KINDS)(rng)
    return f"{question}\n\n{solution}"


def math_documents(seed: int) -> Iterator[str]:
    """Endless problems for a seed (the caller takes as many as it needs); the same on every machine."""
    rng = random.Random(f"ream-lite math {seed}")
    return (math_problem(rng) for _ in itertools.count())
