"""`ream-lite eval`: perplexity equals transformers' on the same tokens; a model against itself has KL 0."""

import json
import math

import torch
from click.testing import CliRunner
from tiny_models import VOCAB
from transformers import AutoTokenizer

from ream_lite.calib.text import domain_windows, read_documents
from ream_lite.cli import main
from ream_lite.evaluate import evaluate

TEXT = [
    {"domain": "prose", "text": "the quick brown fox jumps over the lazy dog. " * 6},
    {"domain": "prose", "text": "a second document, about nothing in particular."},
    {"domain": "math", "text": "12 + 7 = 19. 3 * 4 = 12. (8 - 2) / 3 = 2. " * 4},
]


def write_data(path):
    path.write_text("\n".join(json.dumps(d) for d in TEXT) + "\n")
    return path


def transformers_ppl(model, windows):
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0, :-1].float(), -1)
            nll -= float(logp.gather(-1, w[1:, None]).sum())
            n += len(w) - 1
    return math.exp(nll / n), n


def test_perplexity_equals_transformers(model_dirs, tmp_path):
    model, d = model_dirs["qwen2_moe"]
    data = write_data(tmp_path / "data.jsonl")
    r = evaluate(str(d), str(data), seq_len=32)
    tok = AutoTokenizer.from_pretrained(d)
    windows = domain_windows(read_documents(data), tok, 32)
    assert set(r.domains) == {"prose", "math"}
    for dom, wins in windows.items():
        assert max(int(w.max()) for w in wins) < VOCAB
        ppl, n = transformers_ppl(model, wins)
        assert r.domains[dom]["tokens"] == n
        assert math.isclose(r.domains[dom]["perplexity"], ppl, rel_tol=1e-5)
    ppl_all, n_all = transformers_ppl(model, [w for ws in windows.values() for w in ws])
    assert r.overall["tokens"] == n_all and math.isclose(r.overall["perplexity"], ppl_all, rel_tol=1e-5)


def test_model_against_itself(model_dirs, tmp_path):
    _, d = model_dirs["deepseek_v3"]
    data = write_data(tmp_path / "data.jsonl")
    out = CliRunner().invoke(main, ["eval", str(d), "--data", str(data), "--reference", str(d), "--seq-len", "40",
                                    "--json", "--store", "disk", "--work-dir", str(tmp_path / "w")])
    assert out.exit_code == 0, out.output
    r = json.loads(out.output)
    assert abs(r["overall"]["kl"]) < 1e-6
    assert r["overall"]["top1_agreement"] == 1.0
    assert r["overall"]["perplexity"] == r["overall"]["reference_perplexity"]


def test_different_models_have_positive_kl(model_dirs, tmp_path):
    _, a = model_dirs["qwen3_moe"]
    from tiny_models import build_model, save_model

    b = save_model(build_model("qwen3_moe", seed=7), tmp_path / "other")
    r = evaluate(str(a), str(write_data(tmp_path / "d.jsonl")), reference=str(b), seq_len=32)
    assert r.overall["kl"] > 0.01 and r.overall["top1_agreement"] < 1.0


def test_plain_text_file(model_dirs, tmp_path):
    _, d = model_dirs["mixtral"]
    (tmp_path / "t.txt").write_text("plain text evaluation works too. " * 5)
    r = evaluate(str(d), str(tmp_path / "t.txt"), seq_len=50)
    assert list(r.domains) == ["all"] and r.overall["perplexity"] > 1
