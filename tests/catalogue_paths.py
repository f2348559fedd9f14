"""Catalogue rows for path arguments and output locations: a missing input, a file where a folder is expected and
the reverse, an output that is an existing file or lies under one, a folder holding things probekit did not write,
and a results table without rows (``tests/test_catalogue_paths.py`` runs them)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from probekit.results import REQUIRED, save_results
from tests.catalogue import Case
from tests.helpers import toy_senteval


def _files(tmp: Path) -> None:
    """A task file, a plain file, an empty folder and a folder of someone's notes."""
    toy_senteval(tmp / "toy.txt", n=(8, 4, 4))
    (tmp / "afile").write_text("not a folder\n", encoding="utf-8")
    (tmp / "empty").mkdir()
    (tmp / "notes").mkdir()
    (tmp / "notes" / "thesis.tex").write_text("x", encoding="utf-8")


def _empty_results(tmp: Path) -> None:
    _files(tmp)
    save_results(pd.DataFrame({c: pd.Series(dtype="object") for c in REQUIRED}), tmp / "res")


EXTRACT = ["extract", "--model", "{model}", "--task", "{tmp}/toy.txt", "-q"]
CORPUS = ["--corpus", "{tmp}/toy.txt"]

CASES: list[Case] = [
    Case("extract-out-is-file", [*EXTRACT, "--out", "{tmp}/afile"], "--out: {tmp}/afile is an existing file", _files),
    Case("extract-out-under-file", [*EXTRACT, "--out", "{tmp}/afile/out"], "{tmp}/afile is a file", _files),
    Case("extract-out-foreign", [*EXTRACT, "--out", "{tmp}/notes"], "probekit did not write (thesis.tex)", _files),
    Case("extract-data-dir-is-file", [*EXTRACT, "--out", "{tmp}/o", "--data-dir", "{tmp}/afile"], "--data-dir", _files),
    Case(
        "extract-task-is-folder",
        [*EXTRACT, "--task", "{tmp}/empty", "--out", "{tmp}/o"],
        "--task: {tmp}/empty is a",
        _files,
    ),
    Case(
        "extract-model-is-file",
        ["extract", "--model", "{tmp}/afile", "--task", "{tmp}/toy.txt", "--out", "{tmp}/o"],
        "got a file",
        _files,
    ),
    Case(
        "mlm-corpus-is-folder",
        ["mlm-probe", "--model", "{model}", "--corpus", "{tmp}/empty", "--out", "{tmp}/o"],
        "--corpus: {tmp}/empty is a folder",
        _files,
    ),
    Case(
        "mlm-out-foreign",
        ["mlm-probe", "--model", "{model}", *CORPUS, "--out", "{tmp}/notes"],
        "probekit did not write (thesis.tex)",
        _files,
    ),
    Case(
        "offramp-out-foreign",
        ["offramp", "--model", "{model}", "--task", "sst2", "--out", "{tmp}/notes"],
        "probekit did not write (thesis.tex); choose a new folder or pass --fresh",
        _files,
    ),
    Case(
        "finetune-out-foreign",
        ["finetune", "--model", "{model}", "--task", "cola", "--out", "{tmp}/notes"],
        "probekit did not write (thesis.tex); choose a new folder or pass --fresh",
        _files,
    ),
    Case("probe-caches-missing", ["probe", "{tmp}/nothing", "--out", "{tmp}/o"], "does not exist", _files),
    Case("probe-caches-is-file", ["probe", "{tmp}/afile", "--out", "{tmp}/o"], "is a file; give a folder", _files),
    Case("probe-out-is-file", ["probe", "{tmp}/empty", "--out", "{tmp}/afile"], "--out: {tmp}/afile is an", _files),
    Case("probe-out-under-file", ["probe", "{tmp}/empty", "--out", "{tmp}/afile/r"], "is a file", _files),
    Case(
        "mlm-out-is-file",
        ["mlm-probe", "--model", "{model}", *CORPUS, "--out", "{tmp}/afile"],
        "--out: {tmp}/afile is an existing file",
        _files,
    ),
    Case(
        "offramp-out-is-file",
        ["offramp", "--model", "{model}", "--task", "sst2", "--out", "{tmp}/afile"],
        "--out: {tmp}/afile is an existing file",
        _files,
    ),
    Case(
        "offramp-figures-under-file",
        ["offramp", "--model", "{model}", "--task", "sst2", "--out", "{tmp}/o", "--figures", "{tmp}/afile/f"],
        "--figures:",
        _files,
    ),
    Case(
        "finetune-out-is-file",
        ["finetune", "--model", "{model}", "--task", "cola", "--out", "{tmp}/afile"],
        "--out: {tmp}/afile is an existing file",
        _files,
    ),
    Case("report-results-missing", ["report", "{tmp}/nothing", "--out", "{tmp}/r"], "does not exist", _files),
    Case("report-out-is-file", ["report", "{tmp}/empty", "--out", "{tmp}/afile"], "is an existing file", _files),
    Case(
        "report-baseline-missing",
        ["report", "{tmp}/empty", "--baseline", "{tmp}/nothing", "--out", "{tmp}/r"],
        "--baseline: {tmp}/nothing does not exist",
        _files,
    ),
    Case("report-no-rows", ["report", "{tmp}/res", "--out", "{tmp}/r"], "no results in", _empty_results),
    Case("fetch-dest-is-file", ["data", "fetch", "senteval", "--dest", "{tmp}/afile"], "--dest:", _files),
    Case(
        "fetch-checksums-missing",
        ["data", "fetch", "senteval", "--dest", "{tmp}/d", "--checksums", "{tmp}/nothing"],
        "--checksums: {tmp}/nothing does not exist",
        _files,
    ),
    Case(
        "fetch-checksums-is-folder",
        ["data", "fetch", "senteval", "--dest", "{tmp}/d", "--checksums", "{tmp}/empty"],
        "is a folder; give a file",
        _files,
    ),
    Case("run-suite-missing", ["run", "{tmp}/nothing.toml"], "does not exist", _files),
    Case("run-suite-is-folder", ["run", "{tmp}/empty"], "is a folder; give a file", _files),
]
