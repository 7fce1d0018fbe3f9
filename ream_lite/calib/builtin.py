"""A small built-in calibration source that needs no network: Python standard-library code (PSF licence) and its
module docstrings (English prose), and generated math problems with worked solutions. Deterministic for a seed.

This is the stopgap default of `compress`; the curated offline corpus with mixing ratios is tracked in the
product issue.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path

from ream_lite.calib.text import Document


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.glob("*.py")) if not p.name.startswith("_")]
    files += [p for p in sorted(root.glob("*/*.py")) if "test" not in p.parts[-2] and not p.name.startswith("_")]
    return files


def _math_problem(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        a, b, x = rng.randint(2, 12), rng.randint(1, 50), rng.randint(-20, 20)
        c = a * x + b
        return (f"Solve for x: {a}x + {b} = {c}.\nSubtract {b} from both sides: {a}x = {c - b}.\n"
                f"Divide both sides by {a}: x = {x}.\nAnswer: x = {x}.")
    if kind == 1:
        price, pct = rng.randint(10, 500), rng.choice([5, 10, 15, 20, 25, 30, 40, 50])
        off = price * pct / 100
        return (f"A jacket costs ${price}. It is on sale for {pct}% off. What is the sale price?\n"
                f"The discount is {pct}% of {price} = {off:g}.\nThe sale price is {price} - {off:g} = {price - off:g}.\n"
                f"Answer: ${price - off:g}.")
    n, m = rng.randint(2, 30), rng.randint(2, 30)
    return (f"A box holds {n} rows of {m} apples. {n} apples are eaten. How many are left?\n"
            f"Total apples: {n} x {m} = {n * m}.\nLeft: {n * m} - {n} = {n * m - n}.\nAnswer: {n * m - n}.")


def builtin_documents(seed: int = 0, max_files: int = 400, math_docs: int = 3000) -> list[Document]:
    rng = random.Random(seed)
    files = _stdlib_files()
    rng.shuffle(files)
    docs: list[Document] = []
    for p in files[:max_files]:
        try:
            src = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        docs.append(Document(src, "code"))
        try:
            doc = ast.get_docstring(ast.parse(src))
        except (SyntaxError, ValueError):
            doc = None
        if doc and len(doc) > 200:
            docs.append(Document(doc, "prose"))
    docs += [Document(_math_problem(rng), "math") for _ in range(math_docs)]
    return docs
