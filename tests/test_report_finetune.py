"""`probekit report` on a fine-tuning folder alone: the comparison from the tidy fine-tuning rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from probekit.cli import app
from probekit.finetune import Grid, finetune
from tests.helpers import make_tiny_bert
from tests.test_finetune import write_cola


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ftreport")
    model = make_tiny_bert(root / "tiny3", layers=3)
    data = write_cola(root / "data")
    out = root / "ft"
    finetune(
        model,
        "cola",
        out,
        seeds=2,
        grid=Grid((16,), (1e-3,), 2),
        variants=["plain", "drop-layers"],
        drop=1,
        data_dir=data,
        max_train_samples=32,
        max_dev_samples=16,
        threads=1,
    )
    return out


def test_report_shows_the_fine_tuning_comparison(finetuned: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(finetuned), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "rep" / "index.html").read_text(encoding="utf-8")
    assert "<h2>Fine-tuning</h2>" in page and (tmp_path / "rep" / "figures" / "finetune-epochs.png").is_file()
    table = pd.read_csv(tmp_path / "rep" / "finetune.csv")
    # independently: the chosen dev score of each seed, from the metrics.json files fine-tuning wrote
    expected: dict[tuple[str, str], list[float]] = {}
    for path in sorted(finetuned.glob("cola/*/seed*/best/metrics.json")):
        m = json.loads(path.read_text())
        expected.setdefault(("cola", path.parents[2].name), []).append(m["chosen"]["value"])
    main = table[table["metric"] == "mcc"].set_index(["task", "variant"])
    assert set(main.index) == set(expected) == {("cola", "plain"), ("cola", "drop-layers-n1")}
    for key, values in expected.items():
        assert main.loc[key, "mean"] == pytest.approx(sum(values) / len(values))
        assert main.loc[key, "seeds"] == len(values) == 2
