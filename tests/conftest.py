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
