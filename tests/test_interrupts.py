"""Interruptions: an extraction SIGKILLed at any moment resumes to a byte-identical cache; two processes
writing the same output folder never both write it; a cache about to be trusted is checked.

The killed runs are ``probekit`` invocations (the CLI's own code path, a real process killed by SIGKILL) in
children forked by a fork server that imported probekit once and never ran a model (multiprocessing's
``forkserver``), so a kill point costs milliseconds, not an interpreter start, and no child inherits the test
process's thread pools (forking a process whose OpenMP pool has run is not safe); the lock test runs two real
``python -m probekit`` subprocesses.
"""

from __future__ import annotations

import functools
import importlib
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import probekit.cache as cache_mod
import probekit.extraction as ex
from probekit.cache import LayerCache
from probekit.cli import app
from probekit.errors import ProbekitError
from probekit.io import exclusive
from probekit.results import load_results
from tests.helpers import toy_senteval

BATCH = 2
N = (24, 8, 10)  # 21 batches of 2 sentences


def _extract_args(model: Path, task: Path, out: Path) -> list[str]:
    return [
        "extract",
        "--model",
        str(model),
        "--task",
        str(task),
        "--out",
        str(out),
        "--batch-size",
        str(BATCH),
        "--device",
        "cpu",
        "--quiet",
    ]


_SERVER = multiprocessing.get_context("forkserver")
_SERVER.set_forkserver_preload(["probekit.cli", "tests.test_interrupts"])


def _child(args: list[str], env: dict[str, str] | None, patch: Callable[[], None] | None) -> None:
    """A forked child: run ``probekit ARGS`` (a checkpoint after every batch) and exit with its code."""
    code = 3
    try:
        os.environ.update(env or {})
        ex.CHECKPOINT_SECONDS = 0.0
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        if patch is not None:
            patch()
        rc = app(args=args, prog_name="probekit", standalone_mode=False)
        code = rc if isinstance(rc, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 3
    except BaseException:
        code = 3
    finally:
        os._exit(code)


def _fork(
    args: list[str], env: dict[str, str] | None = None, patch: Callable[[], None] | None = None
) -> multiprocessing.process.BaseProcess:
    """Run ``probekit ARGS`` in a child forked by the fork server; return the process."""
    proc = _SERVER.Process(target=_child, args=(args, env, patch), daemon=True)
    proc.start()
    return proc


HANG_SECONDS = 90.0
HUNG = -1000
"""What :func:`_wait` returns for a child that did not end in time (a safety net: a stuck child is killed, one more
kill point, and rerun, so that no test waits forever)."""


def _wait(proc: multiprocessing.process.BaseProcess, timeout: float = HANG_SECONDS) -> int:
    """The child's exit code, or minus the signal that killed it; :data:`HUNG` (after killing it) when it has not
    ended within ``timeout`` seconds, so that no child ever outlives its test."""
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        return HUNG
    return int(proc.exitcode)


def _wait_pid(pid: int) -> int:
    """An ``os.fork`` child's exit code, or minus the signal that killed it."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _complete(args: list[str], env: dict[str, str] | None = None, patch: Callable[[], None] | None = None) -> int:
    """Run ``probekit ARGS`` in a fork to its end: a child that hung is killed and run again (at most 3 times)."""
    code = HUNG
    for _ in range(3):
        code = _wait(_fork(args, env, patch))
        if code != HUNG:
            break
    return code


def _killed(code: int) -> int:
    """A kill point's exit code: a child that hung before its kill point was killed all the same."""
    return -signal.SIGKILL if code == HUNG else code


def _finished(out: Path) -> list[Path]:
    return [m.parent for m in out.glob("*/*/manifest.json") if not m.parent.name.endswith(".partial")]


def _cache_dir(out: Path) -> Path:
    [path] = _finished(out)
    assert not list(out.glob("*/*.partial"))
    return path


def _arrays(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(_cache_dir(out).glob("*.npy"))}


def _die(*args: object, **kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _patch_to_die(module: str, name: str) -> None:
    setattr(importlib.import_module(module), name, _die)


def _suicide_in(module: types.ModuleType, name: str) -> Callable[[], None]:
    """A patch (picklable, for the fork server) making ``module.name`` SIGKILL the process when called."""
    return functools.partial(_patch_to_die, module.__name__, name)


def test_extraction_killed_anywhere_resumes_to_a_byte_identical_cache(tiny_model: Path, tmp_path: Path) -> None:
    task = toy_senteval(tmp_path / "toy task é.txt", n=N)
    ref_out = tmp_path / "ref"
    assert _complete(["--version"]) == 0  # the fork server is up before the reference run is timed
    t0 = time.perf_counter()
    assert _complete(_extract_args(tiny_model, task, ref_out)) == 0
    duration = time.perf_counter() - t0
    ref = _arrays(ref_out)
    manifest = LayerCache.open(_cache_dir(ref_out), verify=True).manifest
    n_batches = sum(-(-info["n"] // BATCH) for info in manifest["splits"].values())
    assert n_batches == 21

    rng = random.Random(0)
    points: list[tuple[str, dict[str, str], Callable[[], None] | None, float | None]] = []
    points += [(f"after batch {k}", {"PROBEKIT_FAULT": f"0:{k}"}, None, None) for k in range(1, n_batches + 1)]
    points += [("while checksumming", {}, _suicide_in(cache_mod, "sha256_file"), None)]
    points += [("before the rename", {}, _suicide_in(cache_mod, "replace_dir"), None)]
    points += [(f"at {t:.2f}s", {}, None, t) for t in sorted(rng.uniform(0.05, 0.9 * duration) for _ in range(10))]
    tried = identical = 0
    for i, (where, env, patch, at) in enumerate(points):
        out = tmp_path / f"run{i}"
        proc = _fork(_extract_args(tiny_model, task, out), env, patch)
        if at is not None:
            time.sleep(at)
            proc.kill()  # SIGKILL; nothing when the run has already ended (then it is no kill point)
        code = _killed(_wait(proc))
        if code == 0:
            continue  # the random kill came after the run had finished: not a kill point
        assert code == -signal.SIGKILL, f"{where}: exit {code}"
        tried += 1
        assert not _finished(out) or at is not None  # killed before the cache was in place
        assert _complete(_extract_args(tiny_model, task, out)) == 0, f"resume after a kill {where} failed"
        assert _arrays(out) == ref, f"resume after a kill {where} is not byte-identical"
        LayerCache.open(_cache_dir(out), verify=True)
        identical += 1

    # one run killed again and again, each resume going on from where the last one stopped
    out = tmp_path / "chain"
    chained = 0
    while _complete(_extract_args(tiny_model, task, out), {"PROBEKIT_FAULT": "0:4"}) == -signal.SIGKILL:
        chained += 1
        assert chained <= n_batches
    assert chained == n_batches // 4 and _arrays(out) == ref  # 21 batches, 4 per life: 5 kills, then done
    print(
        f"\nkill points tried: {tried + chained} ({tried} runs killed once, each resumed; one run killed {chained} "
        f"times in a row); byte-identical resumes: {identical + 1} of {tried + 1}"
    )
    assert tried + chained >= 20 and identical == tried


def test_a_damaged_cache_is_caught_when_extract_reuses_it(tiny_model: Path, tmp_path: Path) -> None:
    task = toy_senteval(tmp_path / "toy.txt", n=N)
    [cache] = ex.extract(tiny_model, [task], out=tmp_path / "out", batch_size=BATCH, device="cpu", progress=False)
    ref = _arrays(tmp_path / "out")
    path = cache.path / "train.features.npy"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10  # one flipped bit in the last row: sizes and labels still look right
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"train.features.npy does not match its checksum; extracting it again"):
        ex.extract(tiny_model, [task], out=tmp_path / "out", batch_size=BATCH, device="cpu", progress=False)
    assert _arrays(tmp_path / "out") == ref


def test_a_label_id_out_of_range_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    task = toy_senteval(tmp_path / "toy.txt", n=N)
    [cache] = ex.extract(tiny_model, [task], out=tmp_path / "out", device="cpu", progress=False)
    labels = np.load(cache.path / "dev.labels.npy")
    labels[3] = 2  # a 2-class task
    np.save(cache.path / "dev.labels.npy", labels)
    with pytest.raises(ProbekitError, match=r"dev.labels.npy holds label id 2, but the task has 2 classes"):
        LayerCache.open(cache.path)


def test_exclusive_refuses_a_second_writer_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    with exclusive(out):
        assert (tmp_path / "a" / ".b.lock").read_text().strip() == str(os.getpid())
        with (
            pytest.raises(
                ProbekitError, match=rf"{out} is being written by another probekit process \(pid {os.getpid()}\)"
            ),
            exclusive(out),
        ):
            pass
    assert not (tmp_path / "a").exists()  # made only for the lock: removed again
    with exclusive(out):
        out.mkdir()
    assert out.is_dir() and not (tmp_path / "a" / ".b.lock").exists()
    pid = os.fork()
    if pid == 0:  # a holder killed with its lock held never blocks the next writer
        with exclusive(out):
            os.kill(os.getpid(), signal.SIGKILL)
    assert _wait_pid(pid) == -signal.SIGKILL
    with exclusive(out):
        pass


@pytest.mark.slow
def test_two_processes_writing_the_same_out(tiny_model: Path, tmp_path: Path) -> None:
    """Two real ``probekit extract`` processes on one --out: both finish, or one refuses in one line; the cache
    is complete and verified either way."""
    task = toy_senteval(tmp_path / "toy.txt", n=N)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PROBEKIT_CHECKPOINT_SECONDS": "0"}
    cmd = [sys.executable, "-m", "probekit", *_extract_args(tiny_model, task, out)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    try:
        results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    finally:  # never leave a process behind the test
        for p in procs:
            p.kill()
    for code, err in results:
        assert "Traceback" not in err
        if code:
            lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
            assert code == 2 and len(lines) == 1, err
            assert "is being written by another probekit process (pid" in lines[0]
    assert any(code == 0 for code, _ in results)
    [cache] = [p for p in (out / tiny_model.name).iterdir() if p.is_dir()]
    LayerCache.open(cache, verify=True)


def _patch_replace(k: int) -> None:
    real, calls = os.replace, [0]

    def replace(src: str | Path, dst: str | Path) -> None:
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)

    os.replace = replace  # type: ignore[assignment]


def _kill_at_replace(k: int) -> Callable[[], None]:
    """A patch (picklable) that SIGKILLs the process just before its k-th ``os.replace``: an artifact fully
    written to its temporary file, not yet renamed into place (or, k > 1, the earlier ones in place)."""
    return functools.partial(_patch_replace, k)


def _numbers(out: Path) -> pd.DataFrame:
    """The results without what differs between runs by design: the settings (they name the output folder),
    wall times and speed-ups measured by a clock."""
    df = load_results(out)
    df = df.drop(columns=[c for c in df if c == "settings" or "seconds" in c or "measured" in c or "timed" in c])
    return df.astype(object).where(df.notna(), "(empty)")


@pytest.fixture(scope="module")
def two_caches(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("interrupt-caches")
    for i in range(2):
        task = toy_senteval(tmp / f"task{i}.txt", n=(60, 20, 20), seed=i)
        ex.extract(tiny_model, [task], out=tmp / "caches", device="cpu", progress=False)
    return tmp / "caches"


@pytest.mark.parametrize("command", ["probe", "mlm-probe", "offramp"])
def test_a_command_killed_midway_and_rerun_gives_the_same_numbers(
    command: str, tiny_model: Path, two_caches: Path, tmp_path: Path
) -> None:
    """SIGKILLed before each of its renames (an artifact written, not yet in place), then rerun: the same rows
    as an uninterrupted run, and no temporary file ever read as an artifact."""
    if command == "probe":
        args = ["probe", str(two_caches), "--device", "cpu", "--quiet", "--max-iter", "20", "--out"]
    elif command == "offramp":
        task = toy_senteval(tmp_path / "toy.txt", n=(24, 8, 8))
        args = ["offramp", "--model", str(tiny_model), "--task", str(task), "--time-n", "8", "--time-thresholds"]
        args += ["2", "--device", "cpu", "--quiet", "--out"]
    else:
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("\n".join(f"the cat sat on mat number {i} today" for i in range(60)) + "\n")
        args = ["mlm-probe", "--model", str(tiny_model), "--corpus", str(corpus), "--steps", "4", "--batch-size", "8"]
        args += ["--heldout", "10", "--device", "cpu", "--quiet", "--out"]
    assert _complete([*args, str(tmp_path / "whole")]) == 0
    whole = _numbers(tmp_path / "whole")
    kills = 0
    points = (1, 4, 13) if command == "offramp" else (1, 2, 3, 4, 6, 9, 13)  # offramp: many renames, slow runs
    for k in points:
        out = tmp_path / f"cut{k}"
        if _killed(_wait(_fork([*args, str(out)], patch=_kill_at_replace(k)))) == 0:
            break  # fewer than k renames: every kill point tried
        kills += 1
        assert _complete([*args, str(out)]) == 0, f"rerun after a kill before rename {k} failed"
        pd.testing.assert_frame_equal(_numbers(out), whole, check_dtype=False)
    assert kills >= 2
    print(f"\n{command}: {kills} kill points, each rerun gave the uninterrupted numbers")


def test_concurrent_probes_on_one_out_never_both_write(two_caches: Path, tmp_path: Path) -> None:
    """Two ``probekit probe`` processes on one --out at once: one refuses (exit 2) or both finish; the results
    are those of a single run either way."""
    args = ["probe", str(two_caches), "--device", "cpu", "--quiet", "--max-iter", "20", "--out"]
    assert _complete([*args, str(tmp_path / "alone")]) == 0
    for attempt in range(3):  # a pair with a hung child (the fork trick, see HUNG) is run again in a new folder
        both = tmp_path / f"both{attempt}"
        codes = [_wait(proc) for proc in [_fork([*args, str(both)]) for _ in range(2)]]
        if HUNG not in codes:
            break
    assert sorted(codes) in ([0, 0], [0, 2]), codes
    pd.testing.assert_frame_equal(_numbers(both), _numbers(tmp_path / "alone"), check_dtype=False)
