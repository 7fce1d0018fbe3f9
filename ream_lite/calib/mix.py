"""How many calibration sequences each domain gets: `--mix` ratios, their rounding, the held-out share.

Counting only (no text, no randomness), so the arithmetic is testable on its own and the same everywhere.
"""

from __future__ import annotations

import math

from ream_lite.errors import ReamLiteError


def parse_mix(spec: str | None, domains: list[str]) -> dict[str, float]:
    """Normalised ratios for `domains` (in their order) from a `--mix` string.

    Positional `0:0.3:0.7` gives one ratio per domain in order of appearance over the sources; named
    `general=0,math=0.3,code=0.7` gives the named domains theirs and every other domain 0. None or "" means equal
    shares. Ratios are relative (3:7 is 0.3:0.7)."""
    if not domains:
        raise ReamLiteError("no calibration domains (every source is empty)")
    listed = ", ".join(domains)
    if spec is None or not spec.strip():
        return {d: 1 / len(domains) for d in domains}
    if "=" in spec:
        raw = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, eq, value = part.partition("=")
            name = name.strip()
            if not eq or not name:
                raise ReamLiteError(f"--mix {spec}: '{part}' is not DOMAIN=RATIO; write e.g. "
                                    f"{','.join(f'{d}=1' for d in domains)}")
            if name not in domains:
                raise ReamLiteError(f"--mix {spec}: no calibration source has a domain '{name}'; the domains are "
                                    f"{listed}")
            if name in raw:
                raise ReamLiteError(f"--mix {spec}: domain '{name}' is given twice")
            raw[name] = _ratio(value, spec)
        ratios = [raw.get(d, 0.0) for d in domains]
    else:
        parts = spec.split(":")
        if len(parts) != len(domains):
            raise ReamLiteError(
                f"--mix {spec}: {len(parts)} ratio{'s' if len(parts) != 1 else ''} for {len(domains)} domains "
                f"({listed}); give one per domain in that order, or name them: "
                f"{','.join(f'{d}=R' for d in domains)}")
        ratios = [_ratio(p, spec) for p in parts]
    total = sum(ratios)
    if total <= 0:
        raise ReamLiteError(f"--mix {spec}: the ratios sum to 0; give at least one domain ({listed}) a positive ratio")
    return {d: r / total for d, r in zip(domains, ratios, strict=True)}


def _ratio(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ReamLiteError(f"--mix {spec}: '{text.strip()}' is not a number; ratios look like 0:0.3:0.7 "
                            f"or general=0,math=0.3,code=0.7") from None
    if not math.isfinite(value) or value < 0:
        raise ReamLiteError(f"--mix {spec}: ratio '{text.strip()}' must be a finite number >= 0")
    return value


def allocate(total: int, ratios: dict[str, float]) -> dict[str, int]:
    """`total` split in proportion to `ratios` by largest remainders: the counts sum to `total`, each is its exact
    share rounded down or up, and ties go to the domain listed first. A ratio of 0 always gets 0."""
    exact = {d: round(total * r, 9) for d, r in ratios.items()}  # 100 * 0.7 is 70, not 69.99999999999999
    counts = {d: math.floor(x) for d, x in exact.items()}
    order = sorted((d for d in ratios if ratios[d] > 0), key=lambda d: -(exact[d] - counts[d]))  # stable: ties
    for d in order[: total - sum(counts.values())]:
        counts[d] += 1
    return counts


def holdout_counts(counts: dict[str, int], share: float) -> dict[str, int]:
    """How many sequences of each domain are held out: round(share * n) of every domain, at least one in all
    (from the largest domain) when share > 0 and there are 2 sequences or more, and never every sequence."""
    want = {d: int(share * n + 0.5) for d, n in counts.items()}
    total = sum(counts.values())
    if share > 0 and total >= 2 and not any(want.values()):
        want[max(counts, key=lambda d: (counts[d], d))] = 1
    while total and sum(want.values()) >= total:
        d = max(want, key=lambda k: (want[k], k))
        want[d] -= 1
    return want
