"""`probekit report`: files, sections, captions, bad input, atomic replacement, and the page in headless chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from probekit import analysis, load_results
from probekit.cli import app
from probekit.errors import ProbekitError
from probekit.report import SECTIONS, Section, TableItem, build_report, make_context, make_sections, section
from probekit.results import save_results
from tests.test_analysis import TASKS, study, synthetic_probe

runner = CliRunner()
FT = {"bert-cola": "cola", "bert-sst2": "sst2"}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One report of a pre-trained model (probe, MLM-head, off-ramp rows) and two fine-tuned ones."""
    root = tmp_path_factory.mktemp("study")
    paths = study(root)
    out = build_report([paths["bert-cola"], paths["bert-sst2"]], root / "reports" / "study", baseline=paths["bert"])
    return {"paths": paths, "out": out, "root": root}


def test_report_files_tables_and_summary(made: dict) -> None:
    out = made["out"]
    meta = json.loads((out / "report.json").read_text())
    assert meta["sections"] == ["overview", "probing", "curves", "convexity", "deltas", "mlm", "offramp"]
    assert meta["models"] == ["bert", "bert-cola", "bert-sst2"]  # the baseline first
    assert meta["finetune_tasks"] == FT  # from the finetune_task column
    for f in meta["files"]:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    figures = sorted(p.stem for p in (out / "figures").glob("*.png"))
    assert figures == sorted(p.stem for p in (out / "figures").glob("*.svg"))
    assert {
        "heatmap",
        "curves",
        "deltas",
        "finetune-grid-top4",
        "finetune-grid-layers",
        "mlm-curves",
        "offramp-curves",
        "offramp-layer-curves",
        "quality-vs-saving",
        "exit-histograms",
        "saving-calibration",
    } == set(figures)
    for p in (out / "figures").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    everything = load_results(list(made["paths"].values()))
    conv = pd.read_csv(out / "convexity.csv")
    expected = analysis.convexity(everything)
    assert len(conv) == len(expected) == 3 * len(TASKS)
    merged = conv.merge(expected, on=["model", "task"], suffixes=("", "_x"))
    assert (merged["peak_layer"] == merged["peak_layer_x"]).all()
    assert merged["drop"].to_numpy() == pytest.approx(merged["drop_x"].to_numpy())
    d = pd.read_csv(out / "deltas.csv")
    want = analysis.deltas(everything, load_results(made["paths"]["bert"]))
    assert len(d) == len(want) == 2 * len(TASKS) * 7
    assert d["delta"].to_numpy() == pytest.approx(want["delta"].to_numpy())
    assert set(d["finetune_task"]) == {"cola", "sst2"}

    summary = (out / "summary.md").read_text()
    assert "## Convexity" in summary and "| sentence_length |" in summary
    assert "bert-cola (linear, mean): mean" in summary and "largest rise" in summary
    # a rise is named only where a task's mean change over the top layers is positive, a fall where negative
    top = int(re.search(r"mean over the (\d+) highest layers", summary).group(1))
    high = want[want["layer"] >= want["layer"].max() - top + 1]
    for model, one in high.groupby("model"):
        per_task = one.groupby("task")["delta"].mean()
        line = next(ln for ln in summary.splitlines() if ln.startswith(f"- {model} (linear, mean)"))
        assert ("largest rise" in line) == bool((per_task > 0).any()), line
        assert ("largest fall" in line) == bool((per_task < 0).any()), line


def test_summary_names_a_fall_only_where_a_task_fell(tmp_path: Path) -> None:
    """Every probe 1 point higher after fine-tuning: the summary names the largest rise and no fall."""
    pre = synthetic_probe("bert", TASKS[:2], layers=4, seeds=(0,))
    up = pre.assign(model="bert-up", finetune_task="cola")
    up["value"] = up["value"] + 0.01
    base = save_results(pre, tmp_path / "r" / "bert")
    out = build_report([save_results(up, tmp_path / "r" / "up")], tmp_path / "rep", baseline=base)
    [line] = [ln for ln in (out / "summary.md").read_text().splitlines() if ln.startswith("- bert-up (linear, mean)")]
    assert "largest rise" in line and "largest fall" not in line, line


def test_report_html_is_self_contained_with_captions(made: dict) -> None:
    page = (made["out"] / "index.html").read_text()
    assert not re.search(r"(src|href)=\"(https?:|//)", page)
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    imgs = re.findall(r'<img src="([^"]+)"', page)
    assert len(imgs) == 11 and all(src.startswith("data:image/png;base64,") for src in imgs)
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page, flags=re.S)
    assert len(captions) == 11
    heat = next(c for c in captions if "figures/heatmap.png" in c)
    for words in ("Models bert, bert-cola, bert-sst2", "linear probe", "mean pooling", "20,000 train", "2,000 test"):
        assert words in heat, words
    assert "<h2>Off-ramps and early exit</h2>" in page and "<h2>MLM-head probe</h2>" in page


def test_models_side_by_side_baseline_first(made: dict) -> None:
    ctx = make_context([made["paths"]["bert-sst2"], made["paths"]["bert-cola"]], baseline=made["paths"]["bert"])
    sections = {s.id: s for s in make_sections(ctx)}
    heat = sections["probing"].items[0].figure
    titles = [ax.get_title() for ax in heat.axes if ax.get_title()]
    assert titles == ["bert", "bert-sst2", "bert-cola"]
    deltas = sections["deltas"].items[0].figure
    assert [ax.get_title() for ax in deltas.axes if ax.get_title()] == [
        "bert-sst2\n(fine-tuned on sst2)",
        "bert-cola\n(fine-tuned on cola)",
    ]


def test_optional_sections_absent_without_their_data(tmp_path: Path) -> None:
    res = save_results(synthetic_probe("solo", TASKS[:2], layers=3, seeds=(0,)), tmp_path / "res")
    out = build_report(res, tmp_path / "rep")
    meta = json.loads((out / "report.json").read_text())
    assert meta["sections"] == ["overview", "probing", "curves", "convexity"]
    assert not (out / "deltas.csv").exists()
    page = (out / "index.html").read_text()
    assert "Off-ramps" not in page and "MLM-head" not in page and "Fine-tuned vs" not in page


def test_one_figure_per_probe_and_pooling(tmp_path: Path) -> None:
    one = {"tasks": TASKS[:2], "layers": 2, "seeds": (0,)}
    both = pd.concat([synthetic_probe("m", **one), synthetic_probe("m", probe="mlp", **one)], ignore_index=True)
    out = build_report(save_results(both, tmp_path / "res"), tmp_path / "rep")
    figures = sorted(p.stem for p in (out / "figures").glob("*.png"))
    assert figures == ["curves-linear-mean", "curves-mlp-mean", "heatmap-linear-mean", "heatmap-mlp-mean"]
    conv = pd.read_csv(out / "convexity.csv")
    assert sorted(set(conv["probe"])) == ["linear", "mlp"] and len(conv) == 4


def test_adding_a_section_is_one_function(tmp_path: Path) -> None:
    @section("custom")
    def custom(results: pd.DataFrame, ctx) -> Section | None:
        n = len(results)
        return Section("My analysis", [TableItem("custom", pd.DataFrame({"rows": [n]}), "How many rows.")])

    try:
        res = save_results(synthetic_probe("solo", TASKS[:1], layers=2, seeds=(0,)), tmp_path / "res")
        out = build_report(res, tmp_path / "rep")
        assert "<h2>My analysis</h2>" in (out / "index.html").read_text()
        assert (out / "custom.csv").is_file()
    finally:
        SECTIONS.unregister("custom")


def test_bad_inputs_raise_clear_errors(tmp_path: Path) -> None:
    pre = save_results(synthetic_probe("pre", TASKS[:2], layers=2, seeds=(0,)), tmp_path / "pre")
    other = save_results(synthetic_probe("ft", TASKS[:2], layers=2, seeds=(0,), pool="cls"), tmp_path / "ft")
    with pytest.raises(ProbekitError, match="cannot compare 'ft' with baseline 'pre'.*pool=cls"):
        build_report(other, tmp_path / "r1", baseline=pre)
    with pytest.raises(ProbekitError, match="do not exist"):
        build_report(tmp_path / "missing", tmp_path / "r2")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ProbekitError, match="no results found"):
        build_report(empty, tmp_path / "r3")
    mlm_only = synthetic_probe("pre", TASKS[:1], layers=2, seeds=(0,)).assign(source="something-else")
    with pytest.raises(ProbekitError, match="nothing to report"):
        build_report(save_results(mlm_only, tmp_path / "odd"), tmp_path / "r4")
    with pytest.raises(ProbekitError, match="baseline .* has no probe results"):
        build_report(pre, tmp_path / "r5", baseline=save_results(mlm_only, tmp_path / "odd"))
    assert not any(p.name.startswith((".r", "r")) for p in tmp_path.iterdir() if p.name not in {"empty"})


def test_cli_report_and_one_line_errors(tmp_path: Path) -> None:
    pre = save_results(synthetic_probe("pre", TASKS[:2], layers=2, seeds=(0,)), tmp_path / "pre")
    ft = save_results(synthetic_probe("ft", TASKS[:2], layers=2, seeds=(0,), shift=0.1), tmp_path / "ft")
    out = tmp_path / "reports" / "x"
    result = runner.invoke(
        app, ["report", str(ft), "--baseline", str(pre), "--finetune-task", "ft=rte", "--out", str(out), "--top", "2"]
    )
    assert result.exit_code == 0, result.output
    assert str(out / "index.html") in result.output
    assert json.loads((out / "report.json").read_text())["finetune_tasks"] == {"ft": "rte"}
    assert (out / "figures" / "finetune-grid-top2.png").is_file()

    bad = save_results(synthetic_probe("ft", TASKS[:2], layers=2, seeds=(0,), data="other"), tmp_path / "bad")
    result = runner.invoke(app, ["report", str(bad), "--baseline", str(pre), "--out", str(tmp_path / "y")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot compare 'ft'") and result.stderr.count("\n") == 1
    result = runner.invoke(app, ["report", str(ft), "--finetune-task", "ft", "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "MODEL=TASK" in result.stderr


def test_report_replaces_only_reports_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res = save_results(synthetic_probe("m", TASKS[:1], layers=2, seeds=(0,)), tmp_path / "res")
    out = build_report(res, tmp_path / "rep")
    (out / "screenshot.png").write_bytes(b"old")
    build_report(res, out)  # a report is replaced whole
    assert not (out / "screenshot.png").exists() and (out / "index.html").is_file()

    first = (out / "index.html").read_text()
    import probekit.report.render as render

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(render, "summary_markdown", broken)
    monkeypatch.setattr("probekit.report.summary_markdown", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        build_report(res, out)
    assert (out / "index.html").read_text() == first  # the old report is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep", "res"]  # no temporary folder left

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ProbekitError, match="is not a probekit report"):
        build_report(res, precious)
    assert (precious / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# The page in a real browser: Chrome DevTools Protocol over --remote-debugging-pipe (stdlib only)
# ---------------------------------------------------------------------------------------------


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """A headless chromium driven over the DevTools pipe (fds 3 and 4, NUL-separated JSON)."""

    def __init__(self, binary: str, profile: Path, timeout: float = 60.0) -> None:
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()

        def wire() -> None:  # in the child: the pipe's ends become fds 3 (commands) and 4 (replies)
            a, b = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args,
            preexec_fn=wire,
            close_fds=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.timeout, self._buf, self._id, self.events = timeout, b"", 0, []
        self.session: str | None = None

    def _recv(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buf:
            if not select.select([self._r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise EOFError(f"chromium exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, **params: object) -> dict:
        self._id += 1
        msg: dict = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._recv(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, event: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._recv(deadline))

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(timeout=20)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._w)
            os.close(self._r)
            self.proc.stderr.close()


def problems(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions, error log entries and requests that leave the disk."""
    found = []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            found.append(f"console.{p['type']}: {[a.get('value') for a in p.get('args', [])]}")
        elif method == "Runtime.exceptionThrown":
            found.append(f"exception: {p['exceptionDetails'].get('text')}")
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            found.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        elif method == "Network.requestWillBeSent" and not p["request"]["url"].startswith(("file:", "data:")):
            found.append(f"network request: {p['request']['url']}")
    return found


def test_report_in_headless_chromium(made: dict) -> None:
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    out = made["out"]
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        browser = Browser(binary, Path(profile))
        try:
            browser.open((out / "index.html").resolve().as_uri())
            images = browser.evaluate(
                "Promise.all([...document.images].map(i => i.decode().catch(() => null)))"
                ".then(() => [...document.images].map(i => [i.alt.slice(0, 60), i.complete, i.naturalWidth]))"
            )
            title = browser.evaluate("document.title")
            height = browser.evaluate("document.documentElement.scrollHeight")
            shot = browser.call(
                "Page.captureScreenshot",
                format="png",
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": 1400, "height": min(int(height), 6000), "scale": 1},
            )
            browser.evaluate("1")  # a round trip, so that late console/log events have arrived
        finally:
            browser.close()
    (out / "screenshot.png").write_bytes(base64.b64decode(shot["data"]))
    assert title == "probekit report: study"
    assert len(images) == 11
    broken = [alt for alt, complete, width in images if not complete or width <= 0]
    assert not broken, f"images that did not load: {broken}"
    assert not problems(browser.events), problems(browser.events)
    png = (out / "screenshot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
