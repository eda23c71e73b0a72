"""The fixed prompt set for language-model decoding benchmarks (package data
`ffsolve/resources/lm_prompts.json`, written by benchmarks/make_lm_prompts.py): it loads, has 16
or more prompts of each kind with unique ids, and every entry has the fields its kind needs.
No tokenizer or model here."""

import collections
import json
import re
from importlib.resources import files

import pytest

KINDS = ("code", "chat", "prose", "list")


@pytest.fixture(scope="module")
def data():
    return json.loads((files("ffsolve") / "resources" / "lm_prompts.json").read_text("utf-8"))


def _clean(text):
    """A non-empty string of printable characters and newlines, no blank edges."""
    if not isinstance(text, str) or not text or text != text.strip():
        return False
    return all(c == "\n" or c.isprintable() for c in text)


def test_header(data):
    assert data["generated_by"] == "benchmarks/make_lm_prompts.py"
    assert "PSF" in data["license_note"] or "Python Software Foundation" in data["license_note"]
    assert re.fullmatch(r"3\.\d+\.\d+", data["python_version"])
    counts = collections.Counter(p["kind"] for p in data["prompts"])
    assert data["counts"] == dict(counts)


def test_counts_and_unique_ids(data):
    prompts = data["prompts"]
    assert len(prompts) >= 64
    counts = collections.Counter(p["kind"] for p in prompts)
    assert set(counts) == set(KINDS)
    assert all(counts[k] >= 16 for k in KINDS), counts
    ids = [p["id"] for p in prompts]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(rf"{p['kind']}-\d{{2,}}", p["id"]) for p in prompts)


@pytest.mark.parametrize("kind", KINDS)
def test_fields_per_kind(data, kind):
    for p in (p for p in data["prompts"] if p["kind"] == kind):
        assert isinstance(p.get("source"), str) and p["source"], p["id"]
        if kind == "chat":
            assert "text" not in p and p["template"] == "chatml", p["id"]
            msgs = p["messages"]
            assert msgs and all(set(m) == {"role", "content"} for m in msgs), p["id"]
            assert msgs[-1]["role"] == "user" and all(_clean(m["content"]) for m in msgs)
            continue
        assert "messages" not in p and _clean(p["text"]), p["id"]
        if kind == "code":
            module, _, qualname = p["source"].partition(":")
            assert module and qualname and p["file"].endswith(".py"), p["id"]
            assert 200 <= len(p["text"]) <= 800 and "def " in p["text"], p["id"]
            assert p["python_version"] == data["python_version"]
        elif kind == "prose":
            assert p["source"] == f"pydoc_data.topics:{p['topic']}", p["id"]
            assert 200 <= len(p["text"]) <= 600 and "\n" not in p["text"], p["id"]
            assert p["python_version"] == data["python_version"]
        else:
            assert p["text"].count("\n") >= 3, p["id"]


def test_prose_topics_differ(data):
    topics = [p["topic"] for p in data["prompts"] if p["kind"] == "prose"]
    assert len(set(topics)) == len(topics)
