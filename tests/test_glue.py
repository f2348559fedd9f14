"""GLUE: the registry entries, the readers of all nine tasks on small files in the official
formats, bad input (file and line), the official metrics, and `probekit data fetch glue`
against a local HTTP server."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import f1_score, matthews_corrcoef

from probekit import metrics
from probekit.data import fetch, get_task, list_tasks, load_task
from probekit.errors import DataError, ProbekitError
from tests.helpers import run_probekit

# task -> (folder, aliases, metrics)
TASKS = {
    "cola": ("CoLA", ["CoLA", "COLA"], ["mcc"]),
    "sst2": ("SST-2", ["SST-2", "sst-2", "SST2"], ["acc"]),
    "mrpc": ("MRPC", ["MRPC"], ["acc", "f1"]),
    "stsb": ("STS-B", ["STS-B", "sts-b"], ["pearson", "spearman"]),
    "qqp": ("QQP", ["QQP"], ["acc", "f1"]),
    "mnli": ("MNLI", ["MNLI", "mnli-m", "mnli_matched"], ["acc"]),
    "qnli": ("QNLI", ["QNLI"], ["acc"]),
    "rte": ("RTE", ["RTE"], ["acc"]),
    "wnli": ("WNLI", ["WNLI"], ["acc"]),
}
MNLI_TRAIN_HEADER = [
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "label1",
    "gold_label",
]
MNLI_DEV_HEADER = [*MNLI_TRAIN_HEADER[:-1], "label2", "label3", "label4", "label5", "gold_label"]
STSB_HEADER = [
    "index",
    "genre",
    "filename",
    "year",
    "old_index",
    "source1",
    "source2",
    "sentence1",
    "sentence2",
    "score",
]


def tsv(path: Path, rows: list[list[str]], header: list[str] | None = None, bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def pairs(n: int, labels: list[str], seed: int = 0) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(seed)
    return [
        (f'the "first" sentence {i}', f"it's the second {i}", labels[int(rng.integers(len(labels)))]) for i in range(n)
    ]


def write_glue(root: Path) -> dict[str, dict[str, list[tuple[str, str | None, str]]]]:
    """Small files of all nine tasks in the official formats; returns what each split should read as."""
    expected: dict[str, dict[str, list[tuple[str, str | None, str]]]] = {}
    g = root / "glue"
    # CoLA: no header; source, label, original label mark, sentence
    cola = {
        "train": [
            ("gj04", "1", "", "Our friends won't buy this."),
            ("gj04", "0", "*", 'He said "go" went.'),
            ("r-67", "1", "", "The dog barked."),
        ],
        "dev": [("gj04", "0", "*", "Sailors rode breeze clear the."), ("gj04", "1", "", "It rained.")],
    }
    for split, rows in cola.items():
        tsv(g / "CoLA" / f"{split}.tsv", [list(r) for r in rows])
    expected["cola"] = {s: [(r[3], None, r[1]) for r in rows] for s, rows in cola.items()}
    # SST-2: header sentence, label (texts end with a space, as in the official file)
    sst = {
        "train": [("a charming and often affecting journey . ", "1"), ("unflinchingly bleak ", "0")],
        "dev": [('it \'s a " quoted " film ', "1"), ("boring ", "0")],
    }
    for split, rows in sst.items():
        tsv(g / "SST-2" / f"{split}.tsv", [list(r) for r in rows], ["sentence", "label"])
    expected["sst2"] = {s: [(t.strip(), None, y) for t, y in rows] for s, rows in sst.items()}
    # MRPC: Quality, #1 ID, #2 ID, #1 String, #2 String (the train file of the GLUE script keeps the BOM)
    expected["mrpc"] = {}
    for split, n in (("train", 6), ("dev", 3)):
        rows = pairs(n, ["0", "1"], seed=n)
        tsv(
            g / "MRPC" / f"{split}.tsv",
            [[y, str(100 + i), str(200 + i), a, b] for i, (a, b, y) in enumerate(rows)],
            ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
            bom=split == "train",
        )
        expected["mrpc"][split] = [(a, b, y) for a, b, y in rows]
    # STS-B: 10 columns, score last
    expected["stsb"] = {}
    for split, n in (("train", 5), ("dev", 4)):
        rows = [(f"A man plays {i}.", f"Someone plays {i}.", f"{i * 1.25:.3f}") for i in range(n)]
        tsv(
            g / "STS-B" / f"{split}.tsv",
            [
                [str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", a, b, y]
                for i, (a, b, y) in enumerate(rows)
            ],
            STSB_HEADER,
        )
        expected["stsb"][split] = rows
    # QQP: id qid1 qid2 question1 question2 is_duplicate
    expected["qqp"] = {}
    for split, n in (("train", 6), ("dev", 3)):
        rows = pairs(n, ["0", "1"], seed=10 + n)
        tsv(
            g / "QQP" / f"{split}.tsv",
            [[str(i), str(2 * i), str(2 * i + 1), a, b, y] for i, (a, b, y) in enumerate(rows)],
            ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        )
        expected["qqp"][split] = rows
    # MNLI: train has 12 columns, dev 16; gold_label last
    nli = ["entailment", "neutral", "contradiction"]
    expected["mnli"] = {}
    for split, fname, header in (
        ("train", "train.tsv", MNLI_TRAIN_HEADER),
        ("dev", "dev_matched.tsv", MNLI_DEV_HEADER),
        ("dev_mismatched", "dev_mismatched.tsv", MNLI_DEV_HEADER),
    ):
        rows = pairs(7 if split == "train" else 3, nli, seed=len(fname))
        extra = len(header) - 12
        tsv(
            g / "MNLI" / fname,
            [
                [
                    str(i),
                    "31193",
                    f"{i}n",
                    "government",
                    "( ( x ) )",
                    "( y )",
                    "(ROOT x)",
                    "(ROOT y)",
                    a,
                    b,
                    y,
                    *([y] * extra),
                    y,
                ]
                for i, (a, b, y) in enumerate(rows)
            ],
            header,
        )
        expected["mnli"][split] = rows
    # QNLI: index question sentence label
    expected["qnli"] = {}
    for split, n in (("train", 5), ("dev", 2)):
        rows = pairs(n, ["entailment", "not_entailment"], seed=20 + n)
        tsv(
            g / "QNLI" / f"{split}.tsv",
            [[str(i), a, b, y] for i, (a, b, y) in enumerate(rows)],
            ["index", "question", "sentence", "label"],
        )
        expected["qnli"][split] = rows
    # RTE / WNLI: index sentence1 sentence2 label
    for name, folder, labels in (("rte", "RTE", ["entailment", "not_entailment"]), ("wnli", "WNLI", ["0", "1"])):
        expected[name] = {}
        for split, n in (("train", 5), ("dev", 3)):
            rows = pairs(n, labels, seed=30 + n)
            tsv(
                g / folder / f"{split}.tsv",
                [[str(i), a, b, y] for i, (a, b, y) in enumerate(rows)],
                ["index", "sentence1", "sentence2", "label"],
            )
            expected[name][split] = rows
    return expected


def test_registry_has_the_nine_glue_tasks_with_aliases() -> None:
    names = {t.name for t in list_tasks("glue")}
    assert names == {*TASKS, "mnli_mm"}
    for name, (folder, aliases, mets) in TASKS.items():
        task = get_task(name)
        assert task.relpath == f"glue/{folder}"
        assert task.collection == "glue" and task.format == "glue"
        assert metrics.task_metrics(task) == mets
        assert task.url.startswith("https://dl.fbaipublicfiles.com/")
        assert len(task.sha256) == 64
        for alias in (*aliases, name.upper()):
            assert get_task(alias).name == name, alias
    assert get_task("cola").sha256 == "f212fcd832b8f7b435fb991f101abf89f96b933ab400603bf198960dfc32cbff"
    assert get_task("MNLI-mm").name == get_task("mnli_mismatched").name == "mnli_mm"
    assert get_task("mnli_mm").relpath == "glue/MNLI"
    assert metrics.is_regression(get_task("stsb")) and not metrics.is_regression(get_task("sst2"))


def test_readers_of_all_nine_tasks(tmp_path: Path) -> None:
    expected = write_glue(tmp_path)
    for name, splits in expected.items():
        data = load_task(name, tmp_path)
        assert data.path == tmp_path / get_task(name).relpath
        assert set(data.splits) == set(splits), name
        regression = name == "stsb"
        names = data.label_names
        if regression:
            assert names == []
        else:
            assert names == sorted({y for _, _, y in splits["train"]}), name
        for split, rows in splits.items():
            got = data.splits[split]
            assert got.texts == [a for a, _, _ in rows], (name, split)
            if rows[0][1] is None:
                assert got.text_pairs is None
            else:
                assert got.text_pairs == [b for _, b, _ in rows], (name, split)
            if regression:
                assert got.labels.dtype == np.float32
                np.testing.assert_allclose(got.labels, [float(y) for _, _, y in rows])
            else:
                assert got.labels.dtype == np.int64
                assert [names[i] for i in got.labels] == [y for _, _, y in rows], (name, split)
    # MNLI mismatched is reachable both ways
    mm = load_task("mnli-mm", tmp_path)
    assert set(mm.splits) == {"train", "dev"}
    assert mm.splits["dev"].texts == load_task("mnli", tmp_path).splits["dev_mismatched"].texts
    # the data hash changes with the content
    before = load_task("rte", tmp_path).sha256
    with open(tmp_path / "glue" / "RTE" / "dev.tsv", "a", encoding="utf-8") as f:
        f.write("99\tone more\tanother\tentailment\n")
    assert load_task("rte", tmp_path).sha256 != before


@pytest.mark.parametrize(
    ("task", "fname", "content", "line", "message"),
    [
        ("sst2", "dev.tsv", "sentence\tlabel\ngood\t1\nbad\t0\textra\n", 3, "expected 2 tab-separated columns"),
        ("sst2", "dev.tsv", "sentence\tlabel\ngood\t1\nbad\t2\n", 3, "label '2' is not one of"),
        ("sst2", "dev.tsv", "sentence\tlabel\n   \t1\n", 2, "empty sentence"),
        ("sst2", "dev.tsv", "text\tlabel\ngood\t1\n", 1, "the header has no text column 'sentence'"),
        ("cola", "train.tsv", "gj04\t1\t\tfine.\ngj04\t1\tfine too.\n", 2, "expected 4 tab-separated columns"),
        (
            "stsb",
            "dev.tsv",
            "\t".join(STSB_HEADER) + "\n" + "\t".join(["0"] * 7 + ["a", "b", "high"]) + "\n",
            2,
            "label 'high' is not a number",
        ),
        ("rte", "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\t\tentailment\n", 2, "empty second sentence"),
    ],
)
def test_bad_input_names_file_and_line(
    tmp_path: Path, task: str, fname: str, content: str, line: int, message: str
) -> None:
    write_glue(tmp_path)
    path = tmp_path / get_task(task).relpath / fname
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        load_task(task, tmp_path)
    assert info.value.line == line
    assert str(info.value).startswith(f"{path}:{line}: ")


def test_unseen_dev_label_and_missing_file(tmp_path: Path) -> None:
    write_glue(tmp_path)
    folder = tmp_path / "glue" / "RTE"
    tsv(folder / "train.tsv", [["0", "a", "b", "entailment"]], ["index", "sentence1", "sentence2", "label"])
    with pytest.raises(DataError, match="label 'not_entailment' of the dev split never occurs") as info:
        load_task("rte", tmp_path)
    assert info.value.path == folder / "dev.tsv" and info.value.line is not None
    with pytest.warns(UserWarning, match="dropped"):
        data = load_task("rte", tmp_path, unseen_labels="drop")
    assert set(data.splits["dev"].labels.tolist()) == {0}
    (tmp_path / "glue" / "MNLI" / "dev_mismatched.tsv").unlink()
    with pytest.raises(DataError, match="dev_mismatched.tsv: missing file .*probekit data fetch glue"):
        load_task("mnli", tmp_path)


def test_cli_bad_glue_file_is_one_line_exit_2(tmp_path: Path, tiny_model: Path) -> None:
    write_glue(tmp_path)
    path = tmp_path / "glue" / "WNLI" / "train.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\t1\n1\ta\tb\n", encoding="utf-8")
    args = ["--task", "wnli", "--data-dir", tmp_path, "--out", tmp_path / "c"]
    proc = run_probekit("extract", "--model", tiny_model, *args)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {path}:3: expected 4 tab-separated columns as the header, found 3"


def test_metrics_match_scikit_learn_and_scipy() -> None:
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert metrics.score(["acc"], y, p)["acc"] == pytest.approx((y == p).mean())
    assert metrics.f1(y, p) == pytest.approx(f1_score(y, p))
    assert metrics.mcc(y, p) == pytest.approx(matthews_corrcoef(y, p))
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert metrics.pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a, b)[0])
    assert metrics.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b)[0])
    # hand-computed: 3 of 4 right; tp=1 fp=1 fn=0 -> F1 = 2/3
    assert metrics.score(["acc", "f1"], [1, 0, 0, 0], [1, 1, 0, 0]) == pytest.approx({"acc": 0.75, "f1": 2 / 3})
    assert np.isnan(metrics.pearson([1, 2, 3], [2, 2, 2]))
    with pytest.raises(ProbekitError, match="unknown metric"):
        metrics.score(["bleu"], y, p)


# ---------------------------------------------------------------- fetch


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[Path, str, list[str]]]:
    """A local server with official-style zips (CoLA, MNLI, QNLIv2) and the MRPC source files."""
    src = tmp_path / "src"
    write_glue(src)
    root = tmp_path / "mirror"
    root.mkdir()
    for zname, folder in (("CoLA.zip", "CoLA"), ("MNLI.zip", "MNLI"), ("QNLIv2.zip", "QNLI")):
        with zipfile.ZipFile(root / zname, "w") as z:
            for f in sorted((src / "glue" / folder).iterdir()):
                z.write(f, f"{folder}/{f.name}")
            z.writestr(f"{folder}/test.tsv", "index\tsentence\n0\tunlabelled\n")
    msr = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    msr += [f"{i % 2}\t{100 + i}\t{200 + i}\tfirst {i}\tsecond {i}" for i in range(8)]
    (root / "msr_paraphrase_train.txt").write_text("\r\n".join(msr) + "\r\n", encoding="utf-8")
    (root / "mrpc_dev_ids.tsv").write_text("101\t201\n105\t205\n", encoding="utf-8")
    log: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            log.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/", log
    server.shutdown()


def sums(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()}


def test_fetch_glue_from_a_mirror(mirror: tuple[Path, str, list[str]], tmp_path: Path) -> None:
    root, url, log = mirror
    dest = tmp_path / "data"
    paths = fetch(
        "glue",
        dest=dest,
        tasks=["cola", "mnli", "mnli-mm", "qnli", "mrpc"],
        base_url=url,
        checksums=sums(root),
        progress=False,
    )
    assert paths == [dest / "glue" / f for f in ("CoLA", "MNLI", "QNLI", "MRPC")]
    assert len(log) == 5  # MNLI.zip once for both MNLI tasks
    assert load_task("cola", dest).counts() == {"train": 3, "dev": 2}
    assert load_task("mnli", dest).counts() == {"train": 7, "dev": 3, "dev_mismatched": 3}
    assert load_task("qnli", dest).counts() == {"train": 5, "dev": 2}
    mrpc = load_task("mrpc", dest)
    assert mrpc.splits["dev"].texts == ["first 1", "first 5"]  # the rows of the GLUE dev ids
    assert len(mrpc.splits["train"]) == 6 and mrpc.splits["train"].text_pairs[0] == "second 0"
    leftovers = [p.name for p in (dest / "glue").iterdir() if p.name.startswith(".") or p.suffix == ".zip"]
    assert leftovers == []
    # everything is there: nothing is downloaded again
    fetch("glue", dest=dest, tasks=["cola", "mnli", "qnli", "mrpc"], base_url=url, progress=False)
    assert len(log) == 5


def test_fetch_glue_rejects_a_bad_checksum(mirror: tuple[Path, str, list[str]], tmp_path: Path) -> None:
    _, url, _ = mirror
    dest = tmp_path / "data"
    with pytest.raises(ProbekitError, match="CoLA.zip: checksum mismatch"):
        fetch("glue", dest=dest, tasks=["cola"], base_url=url, checksums={"CoLA.zip": "0" * 64}, progress=False)
    assert not (dest / "glue" / "CoLA").exists()
    with pytest.raises(ProbekitError, match="is not in the glue collection"):
        fetch("glue", dest=dest, tasks=["bigram_shift"], base_url=url, progress=False)


def test_shared_glue_reads_with_the_documented_counts(shared_data: Path) -> None:
    counts = {"cola": (8551, 1043), "sst2": (67349, 872), "rte": (2490, 277), "wnli": (635, 71)}
    for name, (train, dev) in counts.items():
        data = load_task(name, shared_data)
        assert data.counts() == {"train": train, "dev": dev}, name
    assert load_task("rte", shared_data).splits["dev"].text_pairs is not None
    assert load_task("CoLA", shared_data).label_names == ["0", "1"]
