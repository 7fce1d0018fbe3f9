import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import FAMILIES, build_model, save_model  # noqa: E402


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """family -> (in-memory transformers model, directory saved with transformers' save_pretrained)."""
    out = {}
    for fam in FAMILIES:
        m = build_model(fam)
        out[fam] = (m, save_model(m, tmp_path_factory.mktemp(fam)))
    return out


CALIB_TEXT = "the quick brown fox jumps over the lazy dog. 12 + 30 = 42. def f(x): return x * 2\n" * 40


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    """A small calibration JSONL with two domains ('a', 'b') of the same text at different offsets."""
    p = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    p.write_text("\n".join(json.dumps({"text": CALIB_TEXT[i:], "domain": d}) for i, d in ((0, "a"), (7, "b"))) + "\n")
    return p
