"""The task registry, the SentEval reader, data-dir lookup, and bad-input errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from probekit.data import get_task, list_tasks, load_task, locate
from probekit.errors import DataError, ProbekitError
from tests.helpers import run_probekit, write_senteval

NAMES = {
    "sentence_length": "SentLen",
    "word_content": "WC",
    "tree_depth": "TreeDepth",
    "top_constituents": "TopConst",
    "bigram_shift": "BShift",
    "past_present": "Tense",
    "subj_number": "SubjNum",
    "obj_number": "ObjNum",
    "odd_man_out": "SOMO",
    "coordination_inversion": "CoordInv",
}
# counts per split of the shared sample (its README)
SHARED_COUNTS = {
    "bigram_shift": (1125, 456, 686),
    "coordination_inversion": (922, 374, 557),
    "obj_number": (1083, 420, 655),
    "odd_man_out": (954, 381, 563),
    "past_present": (1142, 471, 686),
    "sentence_length": (1949, 878, 1299),
    "subj_number": (1023, 426, 623),
    "top_constituents": (1081, 429, 653),
    "tree_depth": (1190, 466, 721),
}


def test_registry_has_the_ten_senteval_tasks_with_aliases() -> None:
    names = {t.name for t in list_tasks("senteval")}
    assert names == set(NAMES)
    for name, alias in NAMES.items():
        assert get_task(alias).name == name
        assert get_task(alias.lower()).name == name
        assert get_task(name.upper()).name == name
        assert get_task(name).relpath == f"senteval/probing/{name}.txt"
        assert get_task(name).url.endswith(f"/data/probing/{name}.txt")


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(ProbekitError, match="unknown task 'nope'.*bigram_shift"):
        get_task("nope")


def test_reader_follows_senteval(tmp_path: Path) -> None:
    path = write_senteval(
        tmp_path / "t.txt",
        [
            ("tr", "b", "the  cat\tsat"[:8]),
            ("tr", "a", "a dog ran"),
            ("tr", "c", "he saw it"),
            ("va", "c", "we ran"),
            ("te", "a", "  they   sat  "),
            ("te", "b", "it is"),
        ],
    )
    data = load_task(path)
    assert data.name == "t"
    assert data.label_names == ["a", "b", "c"]  # sorted train labels, as SentEval maps them
    assert data.splits["train"].labels.tolist() == [1, 0, 2]
    assert data.splits["dev"].labels.tolist() == [2]
    assert data.splits["test"].texts == ["they sat", "it is"]  # whitespace re-joined
    assert data.splits["train"].texts[0] == "the cat"
    assert data.counts() == {"train": 3, "dev": 1, "test": 2}
    assert data.splits["train"].labels.dtype == np.int64


GOOD = "tr\tO\tthe cat sat\nva\tO\ta dog\nte\tI\the ran\ntr\tI\tshe saw\n"


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        (GOOD + "tr\tO\n", 5, "expected 3 tab-separated columns"),
        (GOOD + "tr\tO\t\t\n", 5, "empty sentence"),  # more than 3 fields are SentEval's (tests/test_inputs.py)
        (GOOD.replace("va\t", "dev\t"), 2, "unknown split tag 'dev'"),
        (GOOD + "te\tO\t   \n", 5, "empty sentence"),
        (GOOD + "te\tX\tthe end\n", 5, "label 'X' of the test split never occurs in the train split"),
        ("tr\tO\ta\nte\tO\tb\n", None, "the dev split \\(va\\) has no rows"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path: Path, content: str, line: int | None, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        load_task(path)
    assert info.value.line == line
    assert str(path) in str(info.value)


def test_non_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(GOOD.encode() + "te\tO\tcaf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8 \\(byte 0xe9") as info:
        load_task(path)
    assert info.value.line == 5


def test_unseen_labels_can_be_dropped(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text(GOOD + "te\tX\tthe end\nva\tY\tone more\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="dropped 1 test rows"):
        data = load_task(path, unseen_labels="drop")
    assert data.counts() == {"train": 2, "dev": 1, "test": 1}


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, tiny_model: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(GOOD.replace("va\t", "xx\t"), encoding="utf-8")
    proc = run_probekit("extract", "--model", tiny_model, "--task", path, "--out", tmp_path / "c")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {path}:2: unknown split tag 'xx' (expected tr, va or te)"
    assert "Traceback" not in proc.stdout + proc.stderr


def test_lookup_order_and_missing_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = get_task("bigram_shift")
    explicit, env, cache = tmp_path / "explicit", tmp_path / "env", tmp_path / "xdg" / "probekit" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("PROBEKIT_DATA_DIR", str(env))
    with pytest.raises(ProbekitError, match="probekit data fetch senteval") as info:
        locate(task, explicit)
    for d in (explicit, env, cache):
        assert str(d) in str(info.value)
    for d in (cache, env, explicit):  # each newly present dir takes precedence over the ones before
        write_senteval(d / task.relpath, [("tr", "O", "a"), ("va", "O", "b"), ("te", "O", "c")])
        assert locate(task, explicit) == d / task.relpath


def test_shared_sample_reads_with_the_documented_counts(shared_data: Path) -> None:
    for name, (tr, va, te) in SHARED_COUNTS.items():
        data = load_task(name, shared_data)
        assert data.counts() == {"train": tr, "dev": va, "test": te}, name
    assert load_task("BShift", shared_data).label_names == ["I", "O"]
    assert load_task("TopConst", shared_data).n_classes == 20
    # the WC sample is too small: some dev labels never occur in train
    with pytest.raises(DataError, match="word_content.txt:\\d+: label '.*' of the dev split"):
        load_task("word_content", shared_data)
