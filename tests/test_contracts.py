"""The contracts every component builds on: Registry, Config, the resume kernel, the results schema, errors."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from probekit.cli.options import derive
from probekit.config import Config, option
from probekit.errors import ParamError, ProbekitError, ResumeError
from probekit.fingerprint import fingerprint, resume_rule, write_stamp
from probekit.registry import Registry
from probekit.results import SCHEMA, load_results, migrate, tidy, validate

V1 = Path(__file__).parent / "data" / "results_v1.csv"


# ---------------------------------------------------------------- Registry


def test_registry_names_aliases_and_typos() -> None:
    reg: Registry[int] = Registry("widget", "widget")
    reg.register("linear-thing", 1, aliases=("lin",), help="A linear thing.")

    @reg.register("other")
    class Other:
        """Another one."""

    assert reg.get("Linear_Thing") == 1 and reg.get("LIN") == 1 and reg.canonical("lin") == "linear-thing"
    assert reg.names() == ["linear-thing", "other"] and "lin" in reg and "nope" not in reg
    assert reg.help("other") == "Another one." and reg.help("lin") == "A linear thing."
    with pytest.raises(ParamError, match=r"widget: unknown widget 'linaer-thing' \(did you mean 'linear-thing'\?\)"):
        reg.get("linaer-thing")
    with pytest.raises(ParamError, match="choose one of: linear-thing, other"):
        reg.get("zzz")
    with pytest.raises(ValueError, match="already taken"):
        reg.register("lin", 2)
    reg.unregister("lin")
    assert reg.names() == ["other"] and "lin" not in reg


# ---------------------------------------------------------------- Config


@dataclass(frozen=True)
class ToyConfig(Config):
    component = "the toy"
    max_iter: int = option(1000, "Iteration limit.", ge=1)
    grid: tuple[float, ...] = option((0.25, 0.5, 1.0), "A grid.", gt=0)
    pool: Literal["mean", "cls"] = option("mean", "Pooling.")
    ratio: float = option(0.5, "A ratio.", ge=0, le=1)
    tol: float | None = option(None, "Tolerance.", gt=0)
    seeds: int | tuple[int, ...] = option(1, "A count or a list.", ge=0)
    per_task: int | dict[str, int] | None = option(None, "One number or one per task.", ge=1)
    on: bool = option(True, "A switch.")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_iter": 0}, "max_iter: must be >= 1, got 0"),
        ({"max_iter": 1.5}, "max_iter: must be an integer, got 1.5"),
        ({"ratio": 1.5}, r"ratio: must be in \[0, 1\], got 1.5"),
        ({"grid": [1, -1]}, "grid: must be > 0, got -1"),
        ({"pool": "max"}, "pool: must be one of mean, cls, got 'max'"),
        ({"on": 1}, "on: must be true or false, got 1"),
        ({"per_task": {"cola": 0}}, "per_task: must be >= 1, got 0"),
        ({"nope": 1}, "nope: is not an option of the toy; its options: max_iter, grid"),
    ],
)
def test_config_errors_name_the_parameter_and_the_accepted_range(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ParamError, match=message) as err:
        ToyConfig.from_mapping(values)
    assert err.value.param == next(iter(values))


def test_config_coerces_and_round_trips_through_toml() -> None:
    cfg = ToyConfig.from_mapping({"grid": [1, 2], "seeds": [0, 3], "per_task": {"cola": 5}, "ratio": 1, "tol": 1e-3})
    assert cfg.grid == (1.0, 2.0) and isinstance(cfg.ratio, float) and cfg.seeds == (0, 3)
    assert ToyConfig.from_mapping(tomllib.loads(cfg.to_toml())) == cfg
    assert ToyConfig.from_mapping(tomllib.loads(ToyConfig().to_toml("t"))["t"]) == ToyConfig()
    assert cfg.to_dict()["grid"] == [1.0, 2.0]  # JSON-ready
    assert ToyConfig(grid="0.5, 2").grid == (0.5, 2.0)  # the CLI's comma-separated form


def test_derived_cli_options_pass_only_what_was_given_and_render_errors_as_flags() -> None:
    app = typer.Typer()
    got: dict[str, Any] = {}

    @app.command()
    @derive(lambda: [("toy", ToyConfig)])
    def run(name: str = typer.Option("x", "--name"), options: dict[str, Any] | None = None) -> None:
        got.update(options or {})
        ToyConfig.from_mapping(options)

    @app.callback()
    def main() -> None: ...

    runner = CliRunner()
    help_text = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--max-iter", "--grid", "--pool", "--ratio", "--on", "--no-on"):
        assert flag in help_text, flag
    assert "toy: Iteration limit (default: 1000)" in help_text
    assert runner.invoke(app, ["run", "--max-iter", "5", "--grid", "1,2", "--no-on"]).exit_code == 0
    assert got == {"max_iter": 5, "grid": "1,2", "on": False}
    err = ParamError("max_iter", "must be >= 1, got 0")
    assert err.render({"max_iter": "--max-iter"}) == "--max-iter: must be >= 1, got 0" and str(err).startswith(
        "max_iter"
    )


def test_the_cli_error_boundary_renders_parameters_as_flags(tmp_path: Path) -> None:
    from probekit.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "r"), "--top", "0"])
    assert result.exit_code == 2 and result.output.strip() == "error: --top: must be >= 1, got 0"


# ---------------------------------------------------------------- the resume kernel


def test_fingerprint_is_canonical() -> None:
    a = fingerprint({"grid": (1, 2), "x": {"b": 1, "a": Path("p")}}, {"data": "abc"})
    b = fingerprint({"x": {"a": "p", "b": 1}, "grid": [1, 2]}, {"data": "abc"})
    assert a == b and a != fingerprint({"grid": [1, 2], "x": {"a": "p", "b": 2}}, {"data": "abc"})
    assert fingerprint({"v": np.float32(0.5)}) == fingerprint({"v": 0.5})


def test_one_rule_new_reuse_refuse_fresh(tmp_path: Path) -> None:
    settings = {"grid": [0.25, 1.0], "max_iter": 100, "nested": {"lr": 0.1}}
    assert resume_rule(tmp_path, settings) == "new"
    write_stamp(tmp_path, settings, {"cache": "k1"})
    assert resume_rule(tmp_path, settings, {"cache": "k1"}) == "reuse"
    with pytest.raises(ResumeError) as err:
        resume_rule(tmp_path, {**settings, "max_iter": 200, "nested": {"lr": 0.2}}, {"cache": "k1"})
    text = str(err.value)
    assert str(tmp_path) in text and "max_iter 100 -> 200" in text and "nested.lr 0.1 -> 0.2" in text
    assert "grid" not in text and text.endswith("rerun with fresh to start over")
    assert err.value.render({"fresh": "--fresh"}).endswith("rerun with --fresh to start over")
    with pytest.raises(ResumeError, match=r"inputs\.cache"):
        resume_rule(tmp_path, settings, {"cache": "k2"})
    assert resume_rule(tmp_path, {"other": 1}, fresh=True) == "fresh"


# ---------------------------------------------------------------- the results schema


def test_schema_columns_are_documented_and_tidy_applies_them() -> None:
    assert all(c.meaning for c in SCHEMA) and len({c.name for c in SCHEMA}) == len(SCHEMA)
    df = tidy([{"model": "m", "task": "t", "layer": None, "split": "dev", "metric": "acc", "value": 0.5, "seed": 1}])
    validate(df)
    assert str(df["layer"].dtype) == "Int64" and df["layer"].isna().all() and df["seed"].iloc[0] == 1
    with pytest.raises(ValueError, match="layer must be 0..L or empty"):
        validate(tidy([{"model": "m", "task": "t", "layer": -1, "split": "d", "metric": "acc", "value": 1.0}]))
    with pytest.raises(ValueError, match="unknown source"):
        validate(
            tidy([{"model": "m", "task": "t", "layer": 0, "split": "d", "metric": "a", "value": 1, "source": "x"}])
        )


def test_tables_written_by_the_previous_version_are_migrated(tmp_path: Path) -> None:
    """tests/data/results_v1.csv was written by probekit before the schema had a ``mode`` column (probe and
        off-ramp rows of a tiny BERT): the training mode sat in ``probe``, exit-policy rows had layer -1 and the
    shuffled-label gap was called ``selectivity``."""
    old = pd.read_csv(V1)
    new = load_results(V1)
    validate(new)
    assert len(new) == len(old)
    ramps = old["source"].isin(["offramp", "exit-policy"]).to_numpy()
    assert list(new.loc[ramps, "mode"]) == list(old.loc[ramps, "probe"]) and set(new.loc[ramps, "probe"]) == {"offramp"}
    policy_scores = (old["source"] == "exit-policy") & (old["metric"] != "exit_fraction")
    assert (old.loc[policy_scores, "layer"] == -1).all() and new.loc[policy_scores.to_numpy(), "layer"].isna().all()
    hist = (old["source"] == "exit-policy") & (old["metric"] == "exit_fraction")
    assert list(new.loc[hist.to_numpy(), "layer"]) == list(old.loc[hist, "layer"])  # exit layers stay
    probe = ~ramps
    assert new.loc[probe, "mode"].isna().all() and list(new.loc[probe, "probe"]) == list(old.loc[probe, "probe"])
    np.testing.assert_array_equal(new["value"].to_numpy(), old["value"].to_numpy())
    renamed = (old["metric"] == "selectivity").to_numpy()  # schema 3: the shuffled-label gap's own name
    assert renamed.sum() == 6 and set(new.loc[renamed, "metric"]) == {"control_gap"}
    assert "selectivity" not in set(new["metric"]) and set(new.loc[~renamed, "metric"]) == set(
        old.loc[~renamed, "metric"]
    )
    assert migrate(new) is new  # a current table is left as it is


def test_library_errors_are_user_errors() -> None:
    assert issubclass(ParamError, ProbekitError) and issubclass(ResumeError, ProbekitError)
    e = ProbekitError("pass {fresh} or remove {out}", params=("fresh", "out"))
    assert str(e) == "pass fresh or remove out" and e.render({"fresh": "--fresh"}) == "pass --fresh or remove out"
