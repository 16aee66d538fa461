"""A results folder from someone else is untrusted input: one test per class of attack, each with its own
hostile fixtures, and the two readers of whole folders (``poolbench report``, ``bench --runs``) pointed at
one folder holding all of them at once.

Classes: readers (FIFOs, /dev/zero, symlinks, oversized files, YAML alias bombs, malicious pickles,
unreadable folders); writes (planted lock and staging symlinks, a symlinked run folder); text from
records (terminal, Markdown, LaTeX, HTML); ``report --out`` (only what poolbench wrote is replaced);
one-line errors validated before any warning; process hygiene (workers die with their parent, stale
``running`` records recognised by their lock).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_bench import TINY_RUN

from poolbench import records, sweep, text
from poolbench.errors import PoolbenchError

ROOT = Path(__file__).resolve().parents[1]
ESC = "\x1b"
# Nine levels of nine aliases: 9**9 nodes once expanded.
ALIAS_BOMB = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9)
)
EVIL_NAME = f"evil{ESC}[2J{ESC}]0;pwned\x07[bold]op[/]|`x`<script>alert(1)</script>"
LATEX_NAME = r"$\input{/etc/passwd}\write18{touch PWNED}$"


class Evil:
    """Pickled as a call to os.system: a checkpoint that runs code if unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _drop_dac_capabilities() -> None:
    """preexec_fn: as root, drop the capabilities that bypass file permissions (an unreadable folder
    must be unreadable to the child, as it is to any other user)."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP: gone from the exec'd process


def _cli(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env.pop("POOLBENCH_PLUGINS", None)
    return subprocess.run(
        [sys.executable, "-m", "poolbench", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,  # a hang (FIFO, /dev/zero) fails the test instead of blocking it
        preexec_fn=_drop_dac_capabilities,
    )


def _snapshot(folder: Path, *, leave_out: tuple[Path, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every entry under ``folder`` with its size and mtime (symlinks not followed)."""
    found = {}
    for base, dirs, names in os.walk(folder):
        if any(Path(base).is_relative_to(p) for p in leave_out):
            continue
        for name in dirs + names:
            path = Path(base) / name
            if any(path.is_relative_to(p) for p in leave_out):
                continue
            info = path.lstat()
            found[str(path)] = (info.st_size, info.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory, trained_runs: Callable[..., Path]) -> Path:
    """One real completed run (tiny, trained once per session): the template every hostile run is copied from."""
    return trained_runs([*TINY_RUN, "pooling=avg", "seed=0"], tmp_path_factory.mktemp("good"))


def _copy(good: Path, results: Path, name: str, **changes: Any) -> Path:
    run_dir = results / name
    shutil.copytree(good, run_dir, symlinks=True)
    record = json.loads((run_dir / records.RECORD).read_text())
    record.update(run_id=name, **changes)
    records.atomic_write_json(run_dir / records.RECORD, record)
    return run_dir


def _replace(path: Path, make: Callable[[Path], object]) -> None:
    path.unlink()
    make(path)


def _hostile_folder(good: Path, root: Path) -> tuple[Path, dict[str, str]]:
    """A results folder with one hostile case per run; returns it and {run folder: what a reader must say}."""
    results = root / "results"
    results.mkdir()
    markers = root / "markers"
    markers.mkdir()
    _copy(good, results, "good-run")
    expected = {}
    _replace(_copy(good, results, "fifo-metrics") / records.METRICS, os.mkfifo)
    _replace(_copy(good, results, "zero-metrics") / records.METRICS, lambda p: p.symlink_to("/dev/zero"))
    _replace(_copy(good, results, "fifo-env") / records.ENV, os.mkfifo)
    _replace(_copy(good, results, "fifo-config") / records.CONFIG, os.mkfifo)
    (_copy(good, results, "alias-bomb") / records.CONFIG).write_text(ALIAS_BOMB)
    torch.save({"model": Evil(markers / "pickle-ran")}, _copy(good, results, "pickle") / records.CHECKPOINT)
    _replace(_copy(good, results, "fifo-record") / records.RECORD, os.mkfifo)
    _replace(_copy(good, results, "zero-record") / records.RECORD, lambda p: p.symlink_to("/dev/zero"))
    with open(_copy(good, results, "huge-record") / records.RECORD, "r+b") as handle:
        handle.truncate(records.SIZE_CAPS[records.RECORD] + 1)  # sparse: large without writing it
    _copy(good, results, "escapes", pooling=EVIL_NAME, **{"choice.pooling": EVIL_NAME})
    _copy(good, results, "latex", pooling=LATEX_NAME, **{"choice.pooling": LATEX_NAME})
    _copy(good, results, "failed-escapes", status="failed", error=f"boom{ESC}[2J{ESC}]0;title\x07")
    _copy(good, results, "stale", status="running")  # no process holds its lock: it died
    outside = root / "outside"
    _copy(good, outside, "linked")
    (results / "linked").symlink_to(outside / "linked")
    _copy(good, results, "unreadable").chmod(0)
    expected.update(
        {
            "fifo-config": "a FIFO",
            "alias-bomb": "alias bomb",
            "pickle": "not a usable checkpoint",
            "fifo-record": "a FIFO",
            "zero-record": "a symlink",
            "huge-record": "over the",
            "stale": "stale",
            "linked": "not followed",
            "unreadable": "Permission denied",
        }
    )
    return results, expected


@pytest.fixture
def hostile(good_run: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    results, expected = _hostile_folder(good_run, tmp_path)
    yield results, expected
    (results / "unreadable").chmod(0o755)  # so that pytest can delete it


# ------------------------------------------------------------------------------ the whole folder at once


def test_report_on_a_hostile_folder_finishes_and_says_why_it_skipped_each_run(
    hostile: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    results, expected = hostile
    out = tmp_path / "out"
    before = _snapshot(tmp_path, leave_out=(out,))
    started = time.monotonic()
    done = _cli("report", str(results), "--out", str(out), "--format", "csv,md,tex", "--html", cwd=results)
    assert time.monotonic() - started < 200
    assert done.returncode == 0, done.stderr[-2000:]
    shown = done.stdout + done.stderr
    assert ESC not in shown and "\x07" not in shown and "Traceback" not in shown
    report_skips = {k: v for k, v in expected.items() if k not in ("fifo-config", "alias-bomb", "pickle")}
    for name, reason in report_skips.items():  # every skipped run printed, with its reason
        assert any(name in line and reason in line for line in shown.splitlines()), (name, reason, shown[-3000:])
    for name in ("fifo-metrics", "zero-metrics"):  # their curve is left out (or the run as a duplicate), saying why
        assert any(name in line and ("no curve" in line or "duplicate" in line) for line in shown.splitlines()), name
    assert "failed-escapes is failed: boom\\x1b[2J" in shown
    tex = "".join(p.read_text() for p in out.glob("*.tex"))
    assert "\\input{" not in tex and "\\write18" not in tex and "\\textbackslash{}input" in tex
    markdown = "".join(p.read_text() for p in out.glob("*.md"))
    assert "|`x`" not in markdown and "\\|\\`x\\`" in markdown and ESC not in markdown
    page = (out / "report.html").read_text()
    assert "<script>alert" not in page and ESC not in page
    assert _snapshot(tmp_path, leave_out=(out,)) == before  # wrote only inside --out
    assert not (tmp_path / "markers" / "pickle-ran").exists()


def test_bench_runs_on_a_hostile_folder_times_the_good_runs_and_skips_each_other_with_why(
    hostile: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    results, expected = hostile
    before = _snapshot(tmp_path, leave_out=(results / records.SIDE_BY_SIDE,))
    done = _cli("bench", "--runs", str(results), "--repeats", "1", "--warmup", "0", cwd=results)
    assert done.returncode == 0, done.stderr[-2000:]
    shown = done.stdout + done.stderr
    assert ESC not in shown and "Traceback" not in shown
    for name, reason in expected.items():
        assert any(name in line and reason in line for line in shown.splitlines()), (name, reason, shown[-3000:])
    document = json.loads((results / records.SIDE_BY_SIDE).read_text())
    timed = {run_id for row in document["rows"] for run_id in row["run_ids"]}
    assert {"good-run", "fifo-metrics", "zero-metrics", "fifo-env", "escapes", "latex"} <= timed
    assert document["schema"] == records.SIDE_BY_SIDE_SCHEMA
    assert all(set(row) == set(records.SIDE_BY_SIDE_ROW_FIELDS) for row in document["rows"])  # the contract
    assert not (tmp_path / "markers" / "pickle-ran").exists()
    after = _snapshot(tmp_path, leave_out=(results / records.SIDE_BY_SIDE,))
    after.pop(str(results)), before.pop(str(results))  # its mtime: side_by_side.json was added
    assert after == before  # nothing else written or changed


def test_planted_code_beside_the_runs_or_named_by_their_config_is_never_imported(
    good_run: Path, tmp_path: Path
) -> None:
    from poolbench import plugins

    if not hasattr(plugins, "rebuilding"):
        pytest.skip("the rule that rebuilt runs import only user-named code lands with helper 'parts' (issue 19)")
    results = tmp_path / "results"
    results.mkdir()
    marker = tmp_path / "imported"
    for module in ("evil_plugin", "evil_target"):
        (results / f"{module}.py").write_text(f"open({str(marker)!r}, 'a').write({module!r})\nclass Pool: pass\n")
    _copy(good_run, results, "good-run")
    config = (good_run / records.CONFIG).read_text()
    plugin_run = _copy(good_run, results, "plugin-run")
    (plugin_run / records.CONFIG).write_text(config.replace("plugins: []", f"plugins: [{results / 'evil_plugin.py'}]"))
    target_run = _copy(good_run, results, "target-run")
    targeted = config.replace("pooling:\n  name: avg", "pooling:\n  _target_: evil_target.Pool")
    (target_run / records.CONFIG).write_text(targeted)
    for args in (("report", ".", "--out", str(tmp_path / "out")), ("bench", "--runs", ".", "--repeats", "1")):
        done = _cli(*args, cwd=results)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- readers


def test_load_run_returns_config_record_and_the_trained_model(good_run: Path) -> None:
    loaded = records.load_run(good_run, model=True)
    assert loaded.record["status"] == "completed" and loaded.config.pooling.name == "avg"
    state = torch.load(good_run / records.CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(value, state[key]) for key, value in loaded.model.state_dict().items())
    assert records.load_run(good_run).model is None


READERS = {
    "record": lambda d: records.read_record(d),
    "config": lambda d: records.read_config(d),
    "env": lambda d: records.read_env(d),
    "metrics": lambda d: records.read_metrics(d),
    "checkpoint": lambda d: records.load_checkpoint(d),
}
FILE_OF = {"record": records.RECORD, "config": records.CONFIG, "env": records.ENV, "metrics": records.METRICS,
           "checkpoint": records.CHECKPOINT}
HOSTILE_FILES: dict[str, Callable[[Path, Path], object]] = {
    "fifo": lambda p, _: os.mkfifo(p),
    "dev-zero": lambda p, _: p.symlink_to("/dev/zero"),
    "symlink-out": lambda p, outside: p.symlink_to(outside),
    "folder": lambda p, _: p.mkdir(),
    "socket": lambda p, _: __import__("socket").socket(__import__("socket").AF_UNIX).bind(str(p)),
}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("kind", sorted(HOSTILE_FILES))
def test_readers_open_only_regular_files_without_following_symlinks(tmp_path: Path, reader: str, kind: str) -> None:
    outside = tmp_path / "secret.json"
    outside.write_text('{"status": "completed", "run_id": "stolen"}')
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    HOSTILE_FILES[kind](run_dir / FILE_OF[reader], outside)
    started = time.monotonic()
    with pytest.raises(records.UnsafeFileError):
        READERS[reader](run_dir)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("reader", sorted(set(READERS) - {"checkpoint"}))
def test_readers_refuse_files_over_their_cap(tmp_path: Path, reader: str) -> None:
    path = tmp_path / FILE_OF[reader]
    with open(path, "wb") as handle:
        handle.truncate(records.SIZE_CAPS[FILE_OF[reader]] + 1)
    with pytest.raises(records.UnsafeFileError, match="over the"):
        READERS[reader](tmp_path)


def test_alias_bomb_config_is_refused_fast_in_one_line(tmp_path: Path) -> None:
    (tmp_path / records.CONFIG).write_text(ALIAS_BOMB)
    started = time.monotonic()
    with pytest.raises(ValueError, match="alias bomb") as info:
        records.read_config(tmp_path)
    assert time.monotonic() - started < 5 and "\n" not in str(info.value)


def test_a_config_with_a_few_aliases_still_loads(tmp_path: Path) -> None:
    (tmp_path / records.CONFIG).write_text("base: &b {x: 1}\nother: *b\n")
    assert records.read_config(tmp_path).other.x == 1


def test_malicious_pickle_checkpoint_runs_nothing_and_is_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    torch.save({"model": Evil(marker)}, tmp_path / records.CHECKPOINT)
    with pytest.raises(ValueError, match="not a usable checkpoint") as info:
        records.load_checkpoint(tmp_path)
    assert not marker.exists() and "\n" not in str(info.value)


def test_unreadable_run_folder_is_reported_not_silently_dropped(tmp_path: Path) -> None:
    results = tmp_path / "results"
    for name in ("a", "b", "c"):
        records.atomic_write_json(results / name / records.RECORD, {"status": "completed", "run_id": name})
    (results / "b").chmod(0)
    try:
        probe = "from poolbench import records; f, p = records.iter_records(%r); print(len(f)); print(*p, sep='\\n')"
        done = subprocess.run(
            [sys.executable, "-c", probe % str(results)],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=_drop_dac_capabilities,
        )
    finally:
        (results / "b").chmod(0o755)
    count, *problems = done.stdout.splitlines()
    assert count == "2" and len(problems) == 1 and "/b" in problems[0] and "Permission denied" in problems[0]


# ----------------------------------------------------------------------------------------------- writes


def test_planted_lock_symlink_is_never_truncated(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    results = tmp_path / "results"
    results.mkdir()
    run_dir = results / "run"
    records.lock_path(run_dir).symlink_to(victim)
    with pytest.raises(records.UnsafeFileError, match="symlink"), records.run_lock(run_dir):
        pass
    assert victim.read_text() == "precious"
    assert not records.is_locked(run_dir)


def test_planted_lock_fifo_does_not_block(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    os.mkfifo(records.lock_path(run_dir))
    with pytest.raises(records.UnsafeFileError, match="FIFO"), records.run_lock(run_dir):
        pass
    assert not records.is_locked(run_dir)


@pytest.mark.parametrize("planted", ["staging-root", "staged-run", "replaced-run"])
def test_planted_staging_symlink_is_never_followed_or_deleted_through(tmp_path: Path, planted: str) -> None:
    target = tmp_path / "target"
    (target / "keep").mkdir(parents=True)
    (target / "keep" / "file").write_text("precious")
    results = tmp_path / "results"
    run_dir = results / "run"
    run_dir.mkdir(parents=True)
    if planted == "staging-root":
        (results / records.STAGING).symlink_to(target)
    else:
        (results / records.STAGING).mkdir()
        name = "run" if planted == "staged-run" else "run.replaced"
        (results / records.STAGING / name).symlink_to(target / "keep")
    records.recover(run_dir)
    records.discard_staged(run_dir)
    assert (target / "keep" / "file").read_text() == "precious"
    if planted == "staging-root":
        with pytest.raises(records.UnsafeFileError, match="symlink"):
            records.staging_dir(run_dir)
        assert not records.has_staged(run_dir)


def test_overwrite_with_a_planted_staging_symlink_is_one_line_and_writes_nothing_there(
    good_run: Path, tmp_path: Path
) -> None:
    from poolbench.config import compose
    from poolbench.run import execute

    results = tmp_path / "results"
    shutil.copytree(good_run, results / good_run.name)
    target = tmp_path / "target"
    target.mkdir()
    (results / records.STAGING).symlink_to(target)
    cfg = compose([*TINY_RUN, "pooling=avg", "seed=0", f"results_dir={results}", "trainer.overwrite=true"])
    with pytest.raises(PoolbenchError, match="refusing to train an overwrite"):
        execute(cfg)
    assert list(target.iterdir()) == []
    assert records.read_record(results / good_run.name)["status"] == "completed"  # type: ignore[index]


def test_a_symlinked_run_folder_is_never_written_into(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    run_dir = tmp_path / "results" / "run"
    run_dir.parent.mkdir()
    run_dir.symlink_to(target)
    with pytest.raises(records.UnsafeFileError, match="symlink"):
        records.check_run_dir(run_dir)


# ------------------------------------------------------------------------------------- text from records

HOSTILE_TEXT = [
    f"{ESC}[2Jcleared",
    f"{ESC}]0;title\x07",
    "\x9b31mC1 CSI",
    "bidi \u202eevil",
    "[bold red]markup[/]",
    "a|b`c`*d*_e_[link](x)<b>",
    r"$\input{/etc/passwd}$ \write18{rm -rf ~} 100% #1 & ^ ~ {}",
    "<script>alert('x')</script>&amp;",
    "line\nbreak\r\x00nul",
    "undecodable \udcff byte",
]


@pytest.mark.parametrize("value", HOSTILE_TEXT)
def test_every_output_kind_neutralises_hostile_text(value: str) -> None:
    for kind in (text.plain, text.terminal, text.markdown, text.latex, text.latex_cell, text.html):
        shown = kind(value)
        assert not any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F or ch in "\u202e\u2028" for ch in shown), kind
        shown.encode("utf-8")  # no lone surrogates
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(text.terminal(value))
    assert console.export_text().rstrip("\n") == text.plain(value)  # markup shown as text, never applied
    latex = text.latex_cell(value)
    assert "\\input{" not in latex and "\\write18" not in latex and not latex.startswith("$\\")
    assert "|" not in text.markdown(value).replace("\\|", "")
    assert "`" not in text.markdown(value).replace("\\`", "")
    assert "<" not in text.html(value) and ">" not in text.html(value)


def test_own_math_cells_stay_math() -> None:
    assert text.latex_cell("$0.712 \\pm 0.013$ (3)") == "$0.712 \\pm 0.013$ (3)"
    assert text.latex_cell("$\\input{x}$") == "\\$\\textbackslash{}input\\{x\\}\\$"


# ------------------------------------------------------------------------------------------ report --out


def _results_for_report(tmp_path: Path) -> Path:
    from test_report import make_record, write

    results = tmp_path / "runs"
    for pooling in ("avg", "gem"):
        for seed in range(2):
            write(results, make_record(pooling, seed, mAP=0.5 + seed / 10 + (pooling == "gem") / 10))
    return results


@pytest.mark.parametrize("case", ["report-json-without-manifest", "user-file-beside-ours", "our-file-edited"])
def test_report_out_replaces_only_what_its_manifest_lists(
    run_cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    results, out = _results_for_report(tmp_path), tmp_path / "out"
    if case == "report-json-without-manifest":
        out.mkdir()
        (out / "report.json").write_text("{}")
        (out / "thesis.tex").write_text("precious")
        kept = out / "thesis.tex"
    else:
        assert run_cli("report", str(results), "--out", str(out), "--format", "csv", "--no-plots") == 0
        if case == "user-file-beside-ours":
            kept = out / "thesis.tex"
            kept.write_text("precious")
        else:
            kept = out / "summary.csv"
            kept.write_text("my edits")
    before = _snapshot(out)
    capsys.readouterr()
    assert run_cli("report", str(results), "--out", str(out), "--format", "csv", "--no-plots") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and kept.name in err and len(err.strip().splitlines()) == 1
    assert _snapshot(out) == before and kept.read_text() in ("precious", "my edits")


def test_report_out_over_its_own_report_replaces_it(
    run_cli: Callable[..., int], tmp_path: Path
) -> None:
    results, out = _results_for_report(tmp_path), tmp_path / "out"
    assert run_cli("report", str(results), "--out", str(out), "--format", "csv,md", "--no-plots") == 0
    assert run_cli("report", str(results), "--out", str(out), "--format", "csv", "--no-plots") == 0
    assert not list(out.glob("*.md"))


# ------------------------------------------------------------------------------- one line, validated first


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("bench", "--shape", "99999,99999,99999,99999"), "GiB"),
        (("bench", "--shape", "1,1,1,0"), "positive"),
        (("bench", "--models", "smallcnn", "--batch", "0x4"), "--batch"),
        (("bench", "--models", "smallcnn", "--batch", "4x-1"), "--batch"),
        (("bench", "--models", "smallcnn", "--input-size", "0"), "--input-size"),
        (("bench", "--models", "smallcnn", "--input-size", "999999"), "GiB"),
        (("bench", "--budget", "0"), "budget"),
        (("bench", "--runs", ".", "--warmup", "-1"), "warmup"),
        (("sweep", "--jobs", "0", "--dry-run"), "--jobs"),
        (("sweep", "--jobs", "-3"), "--jobs"),
        (("sweep", "--timeout-min", "0"), "--timeout-min"),
        (("sweep", "--mem-gb", "-1"), "--mem-gb"),
        (("tune", "--jobs", "0", "pooling=avg,max", "trainer.lr=interval(0.01,0.1)"), "--jobs"),  # the same
        (("tune", "--cpus-per-task", "0", "pooling=avg,max", "trainer.lr=interval(0.01,0.1)"), "--cpus-per-task"),
        (("tune", "--slurm-param", "account"), "--slurm-param"),
    ],
)
def test_bad_numbers_are_one_line_before_any_warning_or_work(
    run_cli: Callable[..., int],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    args: tuple[str, ...],
    expected: str,
) -> None:
    from poolbench import bench

    monkeypatch.setattr(bench, "timing_warnings", lambda device: ["the machine is busy"])  # as under load
    monkeypatch.chdir(tmp_path)
    assert run_cli(*args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error:") and expected in captured.err, captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "unreliable" not in captured.out + captured.err
    assert list(tmp_path.iterdir()) == []


def test_sweep_dry_run_on_an_unreadable_results_dir_is_one_line(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    locked.chmod(0)
    try:
        done = _cli("sweep", "--dry-run", "pooling=avg,max", f"results_dir={locked}", cwd=tmp_path, timeout=120)
    finally:
        locked.chmod(0o755)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("error:") and "Permission denied" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ processes

POOL_SCRIPT = """
import concurrent.futures, multiprocessing, os, sys, time
from poolbench.executors import die_with_parent
if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(2, mp_context=context, initializer=die_with_parent,
                                                  initargs=(os.getpid(),))
    futures = [pool.submit(time.sleep, 120) for _ in range(2)]
    time.sleep(0.5)
    while len(getattr(pool, "_processes", {})) < 2:
        time.sleep(0.1)
    print("ready", flush=True)
    time.sleep(120)
"""


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pool_workers_and_resource_tracker_die_with_a_killed_parent(tmp_path: Path) -> None:
    script = tmp_path / "pool.py"
    script.write_text(POOL_SCRIPT)
    parent = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        children = _children(parent.pid)
        assert len(children) >= 3  # two workers and the resource tracker
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [pid for pid in children if _alive(pid)] == []
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_running_record_without_a_live_lock_is_stale_and_with_one_is_not(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    records.atomic_write_json(run_dir / records.RECORD, {"status": "running", "run_id": "run"})
    (found,), _ = records.iter_records(tmp_path)
    assert found["status_detail"] == records.STALE
    assert sweep.run_status(run_dir) == ("stale", None) and sweep.ACTIONS["stale"].startswith("resume")
    with records.run_lock(run_dir):
        (found,), _ = records.iter_records(tmp_path)
        assert "status_detail" not in found
        assert sweep.run_status(run_dir) == ("elsewhere", None)
