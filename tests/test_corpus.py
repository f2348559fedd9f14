"""Corpora for the MLM-head probes: SQuAD JSON, plain text, task texts, bad input, the
held-out split by passage, and windowing of long passages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from probekit.data.corpus import read_corpus, split_passages, window_passages
from probekit.errors import DataError, ProbekitError
from tests.helpers import tiny_tokenizer, write_senteval


def squad(path: Path, contexts: list[list[str]]) -> Path:
    doc = {
        "version": "1.1",
        "data": [
            {
                "title": f"t{i}",
                "paragraphs": [{"context": c, "qas": [{"id": "q", "question": "?", "answers": []}]} for c in article],
            }
            for i, article in enumerate(contexts)
        ],
    }
    path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return path


def test_squad_contexts_text_lines_and_task_texts(tmp_path: Path) -> None:
    s = read_corpus(squad(tmp_path / "dev-v1.1.json", [["first  para.", "second para."], ["third para."]]))
    assert s.passages == ["first para.", "second para.", "third para."]  # whitespace normalised
    assert s.name == "dev-v1.1" and len(s.sha256) == 64

    text = tmp_path / "lines.txt"
    text.write_text("one passage\n\n  two passage \r\none passage\n", encoding="utf-8")
    t = read_corpus(text)
    assert t.passages == ["one passage", "two passage"]  # blank lines skipped, duplicates dropped

    task = write_senteval(
        tmp_path / "toy.txt",
        [
            ("tr", "A", "a cat sat"),
            ("tr", "B", "a bird flew"),
            ("va", "B", "a dog ran"),
            ("te", "A", "a cat sat"),
            ("te", "C", "unseen label row"),
        ],
    )
    k = read_corpus(task, format="task")  # every split (rows whose label train lacks are dropped by the reader)
    assert k.passages == ["a cat sat", "a bird flew", "a dog ran"]
    assert read_corpus(task).passages[0] == "tr A a cat sat"  # auto: any file but .json is plain text

    both = read_corpus([text, tmp_path / "dev-v1.1.json"])
    assert both.name == "lines+dev-v1.1" and len(both) == 5 and both.sha256 not in (s.sha256, t.sha256)


def test_task_by_name_from_the_shared_data(shared_data: Path) -> None:
    c = read_corpus("past_present", data_dir=shared_data)
    assert 2000 < len(c) <= 2299 and all(isinstance(p, str) and p for p in c.passages)
    if (shared_data / "glue" / "RTE").is_dir():  # a GLUE task: both sides of every sentence pair
        from probekit.data import load_task

        rte = read_corpus("RTE", data_dir=shared_data)
        pair = load_task("rte", shared_data).splits["train"]
        assert {" ".join(pair.texts[0].split()), " ".join(pair.text_pairs[0].split())} <= set(rte.passages)


@pytest.mark.parametrize(
    ("name", "content", "message", "line"),
    [
        ("e.json", b"  \n", "empty file", None),
        ("e.txt", b"\n\n", "empty file", None),
        ("m.json", b'{"data": [\n {"paragraphs": [}\n]}', "malformed JSON", 2),
        ("u.json", b'{"data": [\n"\xff"]}', "not valid UTF-8", 2),
        ("u.txt", b"fine\nbad \xe9\n", "not valid UTF-8", 2),
        ("s.json", b'{"version": "1.1"}', "not a SQuAD v1.1 file", None),
        ("p.json", b'{"data": [{"paragraphs": [{"qas": []}]}]}', 'no "context"', None),
    ],
)
def test_bad_input_names_file_and_line(
    tmp_path: Path, name: str, content: bytes, message: str, line: int | None
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        read_corpus(path)
    assert err.value.path == path and err.value.line == line


def test_unknown_source_and_format() -> None:
    with pytest.raises(ProbekitError, match="unknown task"):
        read_corpus("no_such_corpus.txt")
    with pytest.raises(ProbekitError, match="unknown corpus format"):
        read_corpus("x", format="csv")


def test_split_by_passage_is_deterministic_and_disjoint() -> None:
    passages = [f"passage {i}" for i in range(100)]
    train, held = split_passages(passages, 0.2, seed=3)
    assert len(held) == 20 and len(train) == 80
    assert sorted(train + held) == sorted(passages) and not set(train) & set(held)
    assert train == [p for p in passages if p in set(train)]  # reading order kept
    assert split_passages(passages, 0.2, seed=3) == (train, held)
    assert split_passages(passages, 0.2, seed=4)[1] != held
    assert len(split_passages(passages, 7)[1]) == 7  # a count, not a fraction
    with pytest.raises(ProbekitError, match="too few"):
        split_passages(passages[:1], 0.5)
    with pytest.raises(ProbekitError, match="positive"):
        split_passages(passages, 0)


def test_long_passages_are_cut_into_windows_without_losing_tokens() -> None:
    tok = tiny_tokenizer()
    long = " ".join(["the cat sat on the mat"] * 12)
    windows = window_passages(tok, [long, "a dog"], max_length=16)
    body = tok(long, add_special_tokens=False)["input_ids"]
    assert len(body) > 16
    assert all(n <= 16 for n in windows.lengths) and len(windows.lengths) == -(-len(body) // 14) + 1
    inner = [
        i
        for w, s in zip(windows.input_ids[:-1], windows.special[:-1], strict=True)
        for i, sp in zip(w, s, strict=True)
        if not sp
    ]
    assert inner == body
    for w, s in zip(windows.input_ids, windows.special, strict=True):
        assert w[0] == tok.cls_token_id and w[-1] == tok.sep_token_id and s[0] == s[-1] == 1 and sum(s) == 2
    assert windows.input_ids[-1] == tok("a dog")["input_ids"]
