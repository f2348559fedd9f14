"""Contract checks run over EVERY registered probe kind (as scikit-learn's estimator checks): defaults,
config round trip, a planted signal, the results schema, resuming, option errors (library and CLI); plus
the runner's resume warnings, the 80-column summary and a plugin kind from outside the package."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

import probekit
import probekit.probes.run as probe_run
from probekit import LayerwiseProbe, extract, load_results
from probekit.cli import app  # before the plugin below: the in-process CLI knows the built-in kinds only
from probekit.cli.probe import print_summary
from probekit.config import fields_of
from probekit.errors import ConvergenceWarning, ParamError, ProbekitWarning
from probekit.probes import PROBE_KINDS, KindConfig
from probekit.results import tidy, validate
from tests import helpers_probes
from tests.helpers import toy_senteval

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one thread is faster on a shared CPU

REPO = Path(__file__).resolve().parents[1]
KINDS = PROBE_KINDS.names()  # the built-in kinds and the test plugin's
BUILT_IN = [n for n in KINDS if n != helpers_probes.NAME]
runner = CliRunner()


def planted(n: int = 480, layers: int = 3, dim: int = 8, signal_layer: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Noise on every layer; only ``signal_layer`` separates the two classes (by 4 standard deviations)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, layers, dim)) + rng.normal(size=(1, layers, dim))
    direction = rng.normal(size=dim)
    x[:, signal_layer] += np.outer(2 * y - 1, 2.0 * direction / np.linalg.norm(direction))
    return x.astype(np.float32), y


def bad_values(config: type[KindConfig]) -> list[tuple[str, Any]]:
    """(field, a value just outside its declared range) for every bounded field of ``config``."""
    out = []
    for spec in fields_of(config):
        t = spec.element or spec.type
        for bound, v in spec.bounds.items():
            bad = {"ge": v - 1, "gt": v, "le": v + 1, "lt": v}[bound]
            bad = int(bad) if t is int else float(bad)
            out.append((spec.name, (bad,) if spec.element is not None else bad))
    return out


def plain(df: pd.DataFrame) -> pd.DataFrame:
    """Empty cells alike whatever their origin (None, or NaN as a Parquet round trip reads them back)."""
    return df.astype(object).where(df.notna(), "(empty)")


@pytest.fixture(scope="module")
def two_caches(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("contract-caches")
    files = [
        toy_senteval(tmp / "alpha.txt", n=(60, 24, 30), seed=1),
        toy_senteval(tmp / "beta.txt", n=(60, 24, 30), seed=2, labels=("A", "B", "C")),
    ]
    return [c.path for c in extract(tiny_model, files, out=tmp / "caches", progress=False)]


# ---------------------------------------------------------------- every kind


@pytest.mark.parametrize("name", KINDS)
def test_kind_constructs_from_its_config_defaults(name: str) -> None:
    cls = PROBE_KINDS.get(name)
    cfg = cls.Config()
    assert isinstance(cfg, KindConfig) and len(cfg.grid) >= 1  # type: ignore[attr-defined]
    kind = cls(cfg, seed=3)
    assert kind.config == cfg and kind.seed == 3 and kind.grid == tuple(cfg.grid)  # type: ignore[attr-defined]
    expected = {"kind": name, "control": True, **cfg.to_dict(), "reg_name": cls.reg_name, **cls.fixed_settings}
    assert LayerwiseProbe(kind=name).settings() == expected
    assert LayerwiseProbe(kind=cls).settings() == expected  # the class itself works as well as its name
    lp = LayerwiseProbe(kind=name, not_an_option=1)  # the constructor only stores
    assert lp.get_params()["not_an_option"] == 1
    x, y = planted(60)
    with pytest.raises(ParamError, match="not_an_option") as err:
        lp.fit(x[:40], y[:40], x[40:], y[40:])
    assert err.value.param == "not_an_option"


@pytest.mark.parametrize("name", KINDS)
def test_config_round_trips_through_toml(name: str) -> None:
    cls = PROBE_KINDS.get(name).Config
    for cfg in (cls(), cls(grid=(0.5,))):  # type: ignore[call-arg]
        back = cls.from_mapping(tomllib.loads(cfg.to_toml()))
        assert back == cfg and back.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("name", KINDS)
def test_finds_a_planted_signal_and_its_rows_follow_the_schema(name: str) -> None:
    x, y = planted()
    xtr, ytr, xdv, ydv, xte, yte = x[:240], y[:240], x[240:360], y[240:360], x[360:], y[360:]
    lp = LayerwiseProbe(kind=name, device="cpu")
    assert lp.fit(xtr, ytr, xdv, ydv) is lp
    acc = lp.score(xte, yte)
    assert isinstance(acc, np.ndarray) and acc.shape == (3,)
    assert int(np.argmax(acc)) == 1 and acc[1] >= 0.9, acc
    assert np.all(np.delete(acc, 1) < 0.7), acc
    # accuracy computed here from the predicted labels, independently of score()
    assert np.allclose(acc, (lp.predict(xte) == yte[None]).mean(1))
    rows = tidy(lp.rows(xte, yte, "test", model="m", task="planted"))
    validate(rows)
    assert set(rows["metric"]) == {"acc", "control_acc", "control_gap", "majority_acc"}
    got = rows[rows["metric"] == "acc"].sort_values("layer")["value"].to_numpy()
    assert np.allclose(got, acc) and (rows["probe"] == name).all() and (rows["n"] == len(yte)).all()
    assert np.allclose(rows[rows["metric"] == "majority_acc"]["value"], np.mean(yte == np.bincount(ytr).argmax()))


@pytest.mark.parametrize("name", KINDS)
def test_bad_option_values_are_param_errors_naming_the_parameter(name: str) -> None:
    cls = PROBE_KINDS.get(name).Config
    cases = bad_values(cls)
    assert any(field == "grid" for field, _ in cases)  # every kind bounds its grid
    x, y = planted(60)
    for field, value in cases:
        with pytest.raises(ParamError) as err:
            cls(**{field: value})
        assert err.value.param == field
        with pytest.raises(ParamError) as err:
            LayerwiseProbe(kind=name, device="cpu", **{field: value}).fit(x[:40], y[:40], x[40:], y[40:])
        assert err.value.param == field and str(err.value).startswith(f"{field}: ")
    with pytest.raises(ParamError) as err:
        cls(grid=())  # type: ignore[call-arg]
    assert err.value.param == "grid"


@pytest.mark.parametrize("name", KINDS)
def test_interrupted_run_resumes_to_the_same_rows(
    name: str, two_caches: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = probekit.probe(two_caches, kind=name, device="cpu", out=tmp_path / "whole", progress=False)
    assert whole.paths["out"] == tmp_path / "whole" and "fit" in whole.timings
    validate(whole.results)

    class Interrupted(Exception):
        pass

    fit = LayerwiseProbe.fit
    calls = []

    def once(self: LayerwiseProbe, *args: Any, **kwargs: Any) -> LayerwiseProbe:
        calls.append(1)
        if len(calls) > 1:
            raise Interrupted
        return fit(self, *args, **kwargs)

    out = tmp_path / "cut"
    monkeypatch.setattr(LayerwiseProbe, "fit", once)
    with pytest.raises(Interrupted):
        probekit.probe(two_caches, kind=name, device="cpu", out=out, progress=False)
    monkeypatch.undo()
    assert len(load_results(out)) == len(whole.results) // 2  # the first cache's rows were saved
    again = probekit.probe(two_caches, kind=name, device="cpu", out=out, progress=False)
    assert again.details["fitted"] == 1 and again.details["reused"] == 1
    pd.testing.assert_frame_equal(plain(again.results), plain(whole.results), check_dtype=False)
    saved = (plain(load_results(path)) for path in (out, tmp_path / "whole"))
    pd.testing.assert_frame_equal(*saved, check_dtype=False)


@pytest.mark.parametrize("name", BUILT_IN)
def test_cli_bad_value_is_one_line_naming_the_flag(name: str, two_caches: list[Path], tmp_path: Path) -> None:
    field, value = bad_values(PROBE_KINDS.get(name).Config)[0]
    spec = next(f for f in fields_of(PROBE_KINDS.get(name).Config) if f.name == field)
    flag = spec.flag or "--" + field.replace("_", "-")
    text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    args = ["probe", str(two_caches[0]), "--out", str(tmp_path / "r"), "--probe", name, flag, text, "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}: must be"), lines


def test_cli_refuses_an_option_of_another_kind(two_caches: list[Path], tmp_path: Path) -> None:
    args = ["probe", str(two_caches[0]), "--out", str(tmp_path / "r"), "--probe", "linear", "--nhid", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --nhid: is not an option of the linear probe; its options: grid, max_iter, tol, history"
    ]


# ---------------------------------------------------------------- the runner


def test_each_cache_is_read_once_whatever_the_seeds(two_caches: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    load = probe_run.load_features

    def counted(cache: Any, device: Any) -> Any:
        loads.append(cache.task)
        return load(cache, device)

    monkeypatch.setattr(probe_run, "load_features", counted)
    run = probekit.probe(two_caches, seeds=2, device="cpu", progress=False)
    assert sorted(loads) == ["alpha", "beta"] and set(run.results["seed"]) == {0, 1}


def test_changed_settings_refit_with_a_warning_naming_them(two_caches: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "r"
    probekit.probe(two_caches[0], device="cpu", out=out, progress=False)
    with pytest.warns(ProbekitWarning, match=r"1 linear probe fit\(s\) .*other settings \(grid, max_iter\)"):
        run = probekit.probe(two_caches[0], device="cpu", out=out, progress=False, grid=[1.0], max_iter=50)
    assert run.details["fitted"] == 1
    df = load_results(out)
    assert set(df.loc[df["metric"] == "acc", "reg"]) == {1.0}  # the rows were replaced, not added
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same settings again: reused, no warning
        assert (
            probekit.probe(two_caches[0], device="cpu", out=out, progress=False, grid=[1.0], max_iter=50).details[
                "reused"
            ]
            == 1
        )


def test_non_convergence_names_the_parameter(two_caches: list[Path]) -> None:
    with pytest.warns(ConvergenceWarning, match=r"alpha \(seed 0\): .* stopped at the limit .*raise max_iter"):
        probekit.probe(two_caches[0], device="cpu", progress=False, max_iter=1)


def test_a_layerwise_probe_is_a_template(two_caches: list[Path]) -> None:
    template = LayerwiseProbe(kind="linear", grid=[2.0], control=False, tol=1e-3)
    run = probekit.probe(two_caches[0], kind=template, device="cpu", progress=False)
    assert set(run.results["metric"]) == {"acc", "majority_acc"} and set(run.results["reg"].dropna()) == {2.0}
    assert run.details["settings"]["tol"] == 1e-3 and run.estimator.best_reg_.tolist() == [2.0, 2.0, 2.0]
    assert not hasattr(template, "estimator_")  # the caller's object is left alone
    with pytest.raises(ParamError, match="seeds: must be at least 1"):
        probekit.probe(two_caches[0], seeds=[], progress=False)


# ---------------------------------------------------------------- the summary on 80 columns


def synthetic_results(tasks: list[str], layers: int, seeds: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [
        {"model": "m", "task": t, "layer": layer, "split": "test", "metric": m, "value": rng.uniform(0.4, 1.0)}
        | {"source": "probe", "probe": "linear", "seed": s}
        for t in tasks
        for layer in range(layers)
        for s in range(seeds)
        for m in ("acc", "control_acc", "majority_acc")
    ]
    return tidy(rows)


def test_summary_fits_80_columns_without_cutting_a_word() -> None:
    tasks = ["bigram_shift", "coordination_inversion", "a_file_with_a_rather_long_name"]
    console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    print_summary(synthetic_results(tasks, layers=25), console)
    text = console.export_text()
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80
    for name in ("BShift", "CoordInv", "a_file_with_a_rather_long_name"):  # short names, whole on a line
        assert sum(name in line for line in lines) >= 2  # one row per table: the layers were split
    headers = [line for line in lines if "task" in line]
    shown = [int(tok) for h in headers for tok in h.replace("┃", " ").split() if tok.isdigit()]
    assert sorted(shown) == list(range(25)) and "majority" in text  # every layer once, in some table


def test_cli_summary_at_80_columns(two_caches: list[Path], tmp_path: Path) -> None:
    args = ["probe", *map(str, two_caches), "--out", str(tmp_path / "r"), "--seeds", "2", "-q"]
    result = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 80
    rows = [line for line in lines if line.startswith("│ alpha") or line.startswith("│ beta")]
    assert len(rows) == 2 and all("±" in r for r in rows)  # tasks in rows, mean±sd over the two seeds


# ---------------------------------------------------------------- a kind from a plugin


def _plugin_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PROBEKIT_PLUGINS": "tests.helpers_probes", "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "probekit", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )


def test_a_plugin_kind_gets_its_cli_options(two_caches: list[Path], tmp_path: Path) -> None:
    help_text = _plugin_cli("probe", "--help").stdout
    assert helpers_probes.NAME in help_text and "--metric-power" in help_text
    bad = _plugin_cli("probe", str(two_caches[0]), "-o", str(tmp_path / "r"), "--probe", helpers_probes.NAME,
                      "--metric-power", "0", "-q")  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: --metric-power: must be > 0, got 0"]
