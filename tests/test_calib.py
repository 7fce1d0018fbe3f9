"""Calibration data: the built-in corpus, sources, `--mix`, packing, chat templates, the held-out split."""

import gzip
import itertools
import json
import logging
import random
import sys

import pytest
import torch
from transformers import AutoTokenizer

from ream_lite.calib import build_calibration, parse_mix, planned_counts
from ream_lite.calib.builtin import BUILTIN_DOMAINS, builtin_documents, shipped_texts
from ream_lite.calib.chat import split_turns
from ream_lite.calib.mathgen import KINDS, math_documents
from ream_lite.calib.mix import allocate, holdout_counts
from ream_lite.calib.sequences import pack_windows
from ream_lite.calib.sources import parse_source
from ream_lite.calib.text import read_documents
from ream_lite.errors import ReamLiteError
from ream_lite.testing import save_char_tokenizer

PAD, EOS = 0, 2  # save_char_tokenizer's ids
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_char_tokenizer(d, 100)
    return AutoTokenizer.from_pretrained(d)


def build(tok, sources=("builtin",), **kw):
    args = {"num_sequences": 12, "seq_len": 48, "seed": 0} | kw
    return build_calibration(list(sources), tok, **args)


def text_of(tok, ids):
    """The characters of the char tokenizer's ids (its decode() puts spaces between tokens)."""
    return "".join(tok.convert_ids_to_tokens(ids.tolist()))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- the built-in corpus -------------------------------------------------------------------------------------


def test_builtin_corpus_is_shipped_with_three_domains():
    assert BUILTIN_DOMAINS == ("general", "math", "code")
    assert parse_source("builtin").domains() == ["general", "math", "code"]
    for domain in ("general", "code"):
        texts = shipped_texts(domain)
        assert len(texts) > 400 and sum(map(len, texts)) > 3_000_000
    docs = builtin_documents(0, math_docs=50)
    assert {d.domain for d in docs} == {"general", "math", "code"}
    assert sum(d.domain == "math" for d in docs) == 50


def test_math_generator_is_deterministic_and_covers_every_kind():
    first = list(itertools.islice(math_documents(3), 200))
    assert first == list(itertools.islice(math_documents(3), 200))
    assert first != list(itertools.islice(math_documents(4), 200))
    assert all("\n\n" in t and "\nAnswer: " in t for t in first)
    rng = random.Random(0)
    for kind in KINDS:  # every kind runs on many draws without an exception
        for _ in range(200):
            question, solution = kind(rng)
            assert question and "Answer: " in solution


# --- --mix -----------------------------------------------------------------------------------------------------

DOMAINS = ["general", "math", "code"]


def test_mix_positional_named_and_default():
    assert parse_mix("0:0.3:0.7", DOMAINS) == pytest.approx({"general": 0, "math": 0.3, "code": 0.7})
    assert parse_mix("0:3:7", DOMAINS) == pytest.approx({"general": 0, "math": 0.3, "code": 0.7})
    assert parse_mix("math=1, code=3", DOMAINS) == pytest.approx({"general": 0, "math": 0.25, "code": 0.75})
    assert parse_mix(None, DOMAINS) == pytest.approx({d: 1 / 3 for d in DOMAINS})


@pytest.mark.parametrize("spec, message", [
    ("0:x:1", "'x' is not a number"),
    ("0:-1:1", "must be a finite number >= 0"),
    ("0:0:0", "sum to 0"),
    ("0.3:0.7", "2 ratios for 3 domains (general, math, code)"),
    ("prose=1", "no calibration source has a domain 'prose'; the domains are general, math, code"),
    ("math=1,math=2", "given twice"),
    ("math", "1 ratio for 3 domains"),
    ("math=", "'' is not a number"),
])
def test_mix_errors_say_what_is_wrong(spec, message):
    with pytest.raises(ReamLiteError) as e:
        parse_mix(spec, DOMAINS)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_allocation_by_largest_remainder():
    assert allocate(100, parse_mix("0:0.3:0.7", DOMAINS)) == {"general": 0, "math": 30, "code": 70}
    assert allocate(100, parse_mix(None, DOMAINS)) == {"general": 34, "math": 33, "code": 33}
    assert allocate(7, {"a": 0.5, "b": 0.5, "c": 0.0}) == {"a": 4, "b": 3, "c": 0}
    for n in range(1, 60):
        assert sum(allocate(n, parse_mix("1:2:4", DOMAINS)).values()) == n


def test_holdout_counts():
    assert holdout_counts({"a": 30, "b": 70}, 0.1) == {"a": 3, "b": 7}
    assert holdout_counts({"a": 3, "b": 2}, 0.1) == {"a": 1, "b": 0}  # at least one in all
    assert holdout_counts({"a": 1}, 0.9) == {"a": 0}  # never every sequence
    assert holdout_counts({"a": 5}, 0.0) == {"a": 0}


# --- build_calibration --------------------------------------------------------------------------------------


def test_mix_proportions_are_respected(tok):
    c = build(tok, num_sequences=100, seq_len=32, mix="0:0.3:0.7")
    assert c.sequences_per_domain == {"general": 0, "math": 30, "code": 70}
    assert c.tokens_per_domain == {"general": 0, "math": 30 * 32, "code": 70 * 32}
    assert c.mix == pytest.approx({"general": 0, "math": 0.3, "code": 0.7})
    assert len(c.sequences) == 100 and all(len(s) == 32 and s.dtype == torch.long for s in c.sequences)


def test_same_seed_same_tokens_other_seed_other_tokens(tok):
    a, b, c = (build(tok, seed=s, holdout=0.25) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a.sequences, b.sequences, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.sequences, c.sequences, strict=True))


def test_packed_windows_hold_no_padding(tok):
    c = build(tok, num_sequences=30, seq_len=64)
    ids = torch.cat(c.sequences)
    assert not (ids == PAD).any()
    assert (ids == EOS).any()  # documents are joined with EOS
    windows, read = pack_windows([[5, 6, 7], [8, 9], [10]], 3, EOS, 10)
    assert windows == [[5, 6, 7], [EOS, 8, 9]] and read == 6  # the short tail is dropped, not padded


def test_truncate_keeps_documents_apart_unpadded_and_sorted(tok):
    c = build(tok, num_sequences=40, seq_len=300, packing="truncate", holdout=0.2, mix="1:1:1")
    lengths = [len(s) for s in c.sequences]
    assert max(lengths) == 300 and min(lengths) < 300  # code is cut, math problems are shorter
    stats, held = lengths[: -c.n_holdout], lengths[-c.n_holdout :]
    assert stats == sorted(stats, reverse=True) and held == sorted(held, reverse=True)
    assert min(lengths) >= 2 and not (torch.cat(c.sequences) == PAD).any()
    assert not (torch.cat(c.sequences) == EOS).any()  # no separators either: one document per sequence


def test_holdout_is_the_same_share_of_every_domain(tok):
    c = build(tok, num_sequences=60, seq_len=32, mix="1:2:3", holdout=0.1)
    assert c.sequences_per_domain == {"general": 10, "math": 20, "code": 30}
    assert c.holdout_per_domain == {"general": 1, "math": 2, "code": 3} and c.n_holdout == 6
    assert planned_counts(["builtin"], num_sequences=60, mix="1:2:3", holdout=0.1) == (
        c.sequences_per_domain, c.holdout_per_domain)
    d = build(tok, num_sequences=60, seq_len=32, mix="1:2:3", holdout=0.0)
    # the same 60 sequences are picked; the held-out ones move to the end
    assert sorted(s.tolist() for s in c.sequences) == sorted(s.tolist() for s in d.sequences)


def test_chat_template_wraps_each_document_as_user_then_assistant(tok):
    tok.chat_template = TEMPLATE
    try:
        c = build(tok, num_sequences=4, seq_len=400, mix="math=1", packing="truncate", chat_template=True)
    finally:
        tok.chat_template = None
    text = text_of(tok, c.sequences[0])
    assert text.startswith("<user>") and "<assistant>" in text and "Answer: " in text.split("<assistant>")[1]
    with pytest.raises(ReamLiteError, match="has no chat template"):
        build(tok, chat_template=True)


def test_split_turns():
    assert split_turns("What is 2 + 2?\n\n2 + 2 = 4.\nAnswer: 4") == ("What is 2 + 2?", "2 + 2 = 4.\nAnswer: 4")
    user, assistant = split_turns("One sentence here. Two sentences here. Three here. Four.")
    assert user.endswith(".") and assistant and f"{user} {assistant}" == "One sentence here. Two sentences here. " \
        "Three here. Four."


def test_vocab_check(tok):
    with pytest.raises(ReamLiteError, match="beyond the model's vocabulary"):
        build(tok, vocab_size=50)


# --- file sources -------------------------------------------------------------------------------------------


def test_file_sources_name_domains_and_mix_with_builtin(tok, tmp_path):
    write_jsonl(tmp_path / "mixed.jsonl", [{"text": "alpha beta gamma. " * 30, "domain": "greek"},
                                           {"text": "one two three. " * 30}])
    (tmp_path / "notes.txt").write_text("plain text notes. " * 40)
    with gzip.open(tmp_path / "packed.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "gzipped words. " * 40}) + "\n")
    sources = [str(tmp_path / "mixed.jsonl"), str(tmp_path / "notes.txt"), str(tmp_path / "packed.jsonl.gz"), "builtin"]
    c = build(tok, sources, num_sequences=8, seq_len=32, mix="notes=1,code=1")
    assert list(c.mix) == ["greek", "mixed", "notes", "packed", "general", "math", "code"]
    assert c.sequences_per_domain["notes"] == 4 and c.sequences_per_domain["code"] == 4
    assert set(text_of(tok, torch.cat(c.sequences[:4]))) <= set("plain text notes.<eos>")
    with pytest.raises(ReamLiteError, match=r"2 ratios for 7 domains \(greek, mixed, notes"):
        build(tok, sources, mix="1:1")
    d = build(tok, [f"code={tmp_path / 'notes.txt'}", "builtin"], num_sequences=4, seq_len=16)
    assert list(d.mix) == ["code", "general", "math"]  # DOMAIN=SPEC puts a file's text in a domain


def test_directory_source_and_read_documents_compatibility(tok, tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("first file text. " * 20)
    write_jsonl(tmp_path / "corpus" / "b.jsonl", [{"text": "second file. " * 20}])
    c = build(tok, [str(tmp_path / "corpus")], num_sequences=3, seq_len=32)
    assert c.sequences_per_domain == {"corpus": 3}
    assert [d.domain for d in read_documents(tmp_path / "corpus")] == ["all", "all"]  # eval's default


def test_too_little_text_warns_or_fails(tok, tmp_path, caplog):
    write_jsonl(tmp_path / "small.jsonl", [{"text": "x" * 100}])
    with caplog.at_level(logging.WARNING, logger="ream_lite.calib.build"):
        c = build(tok, [str(tmp_path / "small.jsonl")], num_sequences=10, seq_len=30)
    assert c.sequences_per_domain == {"small": 3} and "only 3 sequences" in caplog.text
    with pytest.raises(ReamLiteError, match="has 100 tokens, fewer than one window of 200"):
        build(tok, [str(tmp_path / "small.jsonl")], seq_len=200)


@pytest.mark.parametrize("name, make, message", [
    ("empty.jsonl", lambda p: p.write_text(""), "no documents"),
    ("empty.txt", lambda p: p.write_text("  \n"), "no text"),
    ("bad.txt", lambda p: p.write_bytes(b"\xff\xfe\x00bad"), "cannot read as UTF-8"),
    ("bad.jsonl.gz", lambda p: p.write_bytes(b"not gzip"), "cannot read as UTF-8"),
    ("bad.jsonl", lambda p: p.write_text("{not json}\n"), "expected a JSON object"),
    ("missing.jsonl", lambda p: None, "no such file or directory"),
])
def test_unusable_sources_fail_in_one_line(tok, tmp_path, name, make, message):
    path = tmp_path / name
    make(path)
    with pytest.raises(ReamLiteError, match=message) as e:
        build(tok, [str(path)])
    assert "\n" not in str(e.value)


def test_bad_options(tok):
    with pytest.raises(ReamLiteError, match="--packing"):
        build(tok, packing="pad")
    with pytest.raises(ReamLiteError, match="no calibration source"):
        build(tok, [])


# --- hf: sources (local datasets; no network) ---------------------------------------------------------------


def test_hf_source_from_local_files(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    write_jsonl(tmp_path / "qa.jsonl", [{"question": f"question {i}?", "answer": "the answer. " * 10}
                                        for i in range(30)])
    c = build(tok, [f"hf:{tmp_path / 'qa.jsonl'}:::question,answer"], num_sequences=6, seq_len=40)
    assert c.sequences_per_domain == {"qa": 6}
    assert "question" in text_of(tok, torch.cat(c.sequences))
    again = build(tok, [f"hf:{tmp_path / 'qa.jsonl'}:::question,answer"], num_sequences=6, seq_len=40)
    assert all(torch.equal(x, y) for x, y in zip(c.sequences, again.sequences, strict=True))

    datasets.Dataset.from_list([{"text": f"saved document {i}. " * 8} for i in range(20)]).save_to_disk(
        tmp_path / "saved")
    d = build(tok, [f"hf:{tmp_path / 'saved'}", "builtin"], num_sequences=8, seq_len=32, mix="saved=1")
    assert d.sequences_per_domain["saved"] == 8

    with pytest.raises(ReamLiteError, match="has no field 'text' \\(fields: question, answer\\)"):
        build(tok, [f"hf:{tmp_path / 'qa.jsonl'}"])


def test_hf_source_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ReamLiteError, match="pip install datasets"):
        parse_source("hf:allenai/c4:en:validation")
