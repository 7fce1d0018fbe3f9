"""The built-in offline calibration corpus: three domains, `general`, `math` and `code`.

`general` (public-domain prose: US State of the Union addresses, CIA World Factbook profiles) and `code`
(CPython standard library, lodash, type-fest) are shipped in the package as `data/*.jsonl.gz`, built by
`make_corpus.py`; `data/LICENSES.md` names every source and licence. `math` is generated (`mathgen.py`). Nothing
depends on the installed Python or the network, so a seed gives the same documents on every machine.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Iterator
from importlib import resources

from ream_lite.calib.mathgen import math_documents
from ream_lite.calib.text import Document, read_documents
from ream_lite.errors import ReamLiteError

BUILTIN_DOMAINS = ("general", "math", "code")  # the order positional --mix ratios refer to
SHIPPED_DOMAINS = ("general", "code")


@functools.cache
def shipped_texts(domain: str) -> tuple[str, ...]:
    """The documents of a shipped domain, in file order (read once per process)."""
    ref = resources.files("ream_lite.calib").joinpath("data", f"{domain}.jsonl.gz")
    if not ref.is_file():
        raise ReamLiteError(f"the built-in corpus file data/{domain}.jsonl.gz is missing; reinstall ream-lite")
    with resources.as_file(ref) as path:
        return tuple(d.text for d in read_documents(path, domain))


def builtin_texts(domain: str, seed: int) -> Iterator[str]:
    """The documents of one built-in domain in an order drawn by the seed (math: endless, generated)."""
    if domain == "math":
        return math_documents(seed)
    if domain not in SHIPPED_DOMAINS:
        raise ReamLiteError(f"the built-in corpus has no domain '{domain}' ({', '.join(BUILTIN_DOMAINS)})")
    texts = list(shipped_texts(domain))
    random.Random(f"ream-lite builtin {seed} {domain}").shuffle(texts)
    return iter(texts)


def builtin_documents(seed: int = 0, math_docs: int = 3000) -> list[Document]:
    """Every shipped document of `general` and `code` plus `math_docs` generated problems, in seeded order.
    (For callers that want a list; `build_calibration` reads the domains lazily instead.)"""
    return [Document(t, d) for d in BUILTIN_DOMAINS
            for t in itertools.islice(builtin_texts(d, seed), math_docs if d == "math" else None)]
