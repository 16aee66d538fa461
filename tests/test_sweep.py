"""`poolbench sweep`: grid expansion, planning, skip/resume/retry, failures, concurrency, executors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig

from poolbench import records, sweep
from poolbench import run as run_module
from poolbench.config import group_options
from poolbench.errors import ConfigError
from poolbench.planner import compose_many

TINY = ["dataset=digits", "trainer.epochs=1", "trainer.steps_per_epoch=2", "trainer.latency.enabled=false"]


class FakeTrainer:
    """Stands in for the training inside run.execute (whose locking and record checks stay real)."""

    def __init__(self, fail_for: tuple[str, ...] = ()) -> None:
        self.fail_for = fail_for
        self.calls: list[tuple[str, bool]] = []

    def __call__(
        self, cfg: DictConfig, work_dir: Path, built: Any, resuming: bool, progress: Any, log: Any, *, run_dir: Path
    ) -> dict[str, Any]:
        self.calls.append((run_dir.name, resuming))
        work_dir.mkdir(parents=True, exist_ok=True)
        run_dir = work_dir
        record: dict[str, Any] = {
            "run_id": run_dir.name,
            "pooling": cfg.pooling.name,
            "seed": cfg.seed,
            "status": "running",
        }
        records.atomic_write_json(run_dir / records.RECORD, record)
        if cfg.pooling.name in self.fail_for:
            record.update(status="failed", error="RuntimeError: boom", wall_time_s=0.01)
            records.atomic_write_json(run_dir / records.RECORD, record)
            raise RuntimeError("boom")
        record.update(status="completed", mAP=0.5, wall_time_s=0.01)
        records.atomic_write_json(run_dir / records.RECORD, record)
        return record


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeTrainer:
    trainer = FakeTrainer(fail_for=("max",))
    monkeypatch.setattr(run_module, "_train", trainer)
    monkeypatch.setattr(run_module, "_build", lambda cfg, progress: None)  # no dataset or model needed
    return trainer


def test_expand_choices_range_and_glob_in_product_order() -> None:
    combos = sweep.expand(["pooling=avg,max", "seed=range(0,2)", "model=glob(resnet1*)", "trainer.epochs=1"])
    assert [swept for _, swept in combos] == [
        ["pooling=avg", "seed=0", "model=resnet18"],
        ["pooling=avg", "seed=1", "model=resnet18"],
        ["pooling=max", "seed=0", "model=resnet18"],
        ["pooling=max", "seed=1", "model=resnet18"],
    ]
    assert all(full[0] == "trainer.epochs=1" for full, _ in combos)
    options = group_options("pooling")
    every_but_avg = [s[0] for _, s in sweep.expand(["pooling=glob(*,exclude=avg)"])]
    assert every_but_avg == [f"pooling={o}" for o in options if o != "avg"] and len(every_but_avg) > 5


def test_preset_grid_and_command_line_overrides() -> None:
    quick = [swept for _, swept in sweep.expand(["experiment=quick"])]
    assert len(quick) == 15 and quick[:2] == [["seed=0", "pooling=avg"], ["seed=0", "pooling=max"]]
    assert all(full[0] == "experiment=quick" for full, _ in sweep.expand(["experiment=quick"]))
    narrowed = sweep.expand(["experiment=quick", "pooling=avg,dgmp", "seed=1"])
    assert [swept for _, swept in narrowed] == [["pooling=avg"], ["pooling=dgmp"]]
    assert all("seed=1" in full for full, _ in narrowed)
    # An axis of override sets carries a per-operator setting (DGMP's λ init 5000 on CLaMM).
    clamm = [swept for _, swept in sweep.expand(["experiment=dgmp_paper_clamm", "seed=0"])]
    assert ["pooling=dgmp", "pooling.lam=5000"] in clamm and ["pooling=avg"] in clamm and len(clamm) == 5


def test_bad_sweeps_fail_before_anything_runs(tmp_path: Path, fake: FakeTrainer) -> None:
    with pytest.raises(ConfigError, match="pooling=dgmpp: unknown pooling option 'dgmpp'. Did you mean 'dgmp'"):
        sweep.plan(["pooling=dgmpp,avg", f"results_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="interval sweeps"):
        sweep.expand(["trainer.lr=interval(0.1,1)"])
    with pytest.raises(ConfigError, match="matches no option"):
        sweep.expand(["pooling=glob(nothing*)"])
    with pytest.raises(ConfigError, match="unknown experiment 'quik'. Did you mean 'quick'"):
        sweep.expand(["experiment=quik"])
    assert list(tmp_path.iterdir()) == [] and fake.calls == []


def test_same_config_twice_is_planned_once(tmp_path: Path) -> None:
    planned = sweep.plan(["pooling=avg", "device=cpu,auto", f"results_dir={tmp_path}"])  # device: not identity
    assert len(planned) == 1 and planned[0].status == "new"


def _plan(tmp_path: Path, *extra: str) -> list[sweep.PlannedRun]:
    return sweep.plan(["pooling=avg,max,gem", f"results_dir={tmp_path}", *extra])


def test_rerun_skips_completed_resumes_unfinished_retries_failed(tmp_path: Path, fake: FakeTrainer) -> None:
    state = sweep.run_sweep(_plan(tmp_path))
    assert [o.run_id.split("-")[0] for o in state.done] == ["avg", "gem"]
    assert [o.run_id.split("-")[0] for o in state.failed] == ["max"]
    assert state.failed[0].error == "RuntimeError: boom"
    assert records.read_record(tmp_path / state.failed[0].run_id)["status"] == "failed"  # type: ignore[index]

    gem = next(p for p in _plan(tmp_path) if p.run_id.startswith("gem"))
    records.atomic_write_json(gem.run_dir / records.RECORD, {"status": "interrupted"})  # killed midway
    (gem.run_dir / "checkpoint.pt").write_bytes(b"")
    fake.calls.clear()
    fake.fail_for = ()
    planned = _plan(tmp_path)
    assert {p.run_id.split("-")[0]: p.status for p in planned} == {
        "avg": "completed",
        "max": "failed",
        "gem": "unfinished",
    }
    state = sweep.run_sweep(planned)
    # gem resumes from its checkpoint, max starts over, avg is not touched
    assert sorted(fake.calls) == sorted([(gem.run_id, True), (planned[1].run_id, False)])
    assert state.skipped == 1 and len(state.done) == 2 and not state.failed
    fake.calls.clear()
    state = sweep.run_sweep(_plan(tmp_path))
    assert fake.calls == [] and state.skipped == 3


def test_fail_fast_starts_nothing_after_a_failure(tmp_path: Path, fake: FakeTrainer) -> None:
    planned = sweep.plan(["pooling=max,avg,gem", f"results_dir={tmp_path}"])
    state = sweep.run_sweep(planned, fail_fast=True)
    assert len(state.failed) == 1 and state.done == [] and state.left == 2
    assert [name.split("-")[0] for name, _ in fake.calls] == ["max"]


def test_run_locked_by_another_process_is_left_to_it(tmp_path: Path, fake: FakeTrainer) -> None:
    planned = _plan(tmp_path)
    with records.run_lock(planned[0].run_dir):  # a live holder (flock: another open file description)
        assert sweep.plan(["pooling=avg", f"results_dir={tmp_path}"])[0].status == "elsewhere"
        state = sweep.run_sweep(planned)  # planned before the lock: execute meets the lock
    assert state.elsewhere == [planned[0].run_id]
    assert planned[0].run_id not in [name for name, _ in fake.calls]


def test_corrupt_record_means_unfinished(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / records.RECORD).write_text('{"status": "compl')
    assert sweep.run_status(tmp_path / "x") == ("unfinished", None)
    assert sweep.run_status(tmp_path / "missing") == ("new", None)


def test_eta_uses_finished_wall_times_and_parallel_slots(tmp_path: Path) -> None:
    planned = [sweep.PlannedRun([], [], f"r{i}", tmp_path / f"r{i}", "new") for i in range(5)]
    state = sweep.SweepState(planned, parallel=2)
    assert state.eta_s() is None
    for run in planned[:2]:
        state.start(run)
    state.finish(sweep.Outcome("r0", "completed", wall_time_s=100.0))
    state.running["r1"] = time.monotonic() - 40.0  # 40 s into a ~100 s run
    # 3 left x 100 s + 60 s remaining of r1, over 2 slots
    assert state.eta_s() == pytest.approx((3 * 100 + 60) / 2, abs=1.0)


def test_cli_dry_run_lists_statuses_and_runs_nothing(
    run_cli: Callable[..., int],
    tmp_path: Path,
    fake: FakeTrainer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sweep.run_sweep(sweep.plan(["pooling=avg,max", f"results_dir={tmp_path}"]))  # avg completed, max failed
    fake.calls.clear()
    monkeypatch.setenv("COLUMNS", "200")
    code = run_cli("sweep", "pooling=avg,max,gem", f"results_dir={tmp_path}", "--dry-run")
    printed = capsys.readouterr().out
    assert code == 0 and fake.calls == []
    planned = sweep.plan(["pooling=avg,max,gem", f"results_dir={tmp_path}"])
    statuses = sorted((run.status, run.action) for run in planned)
    assert statuses == [("completed", "skip"), ("failed", "retry"), ("new", "run")]  # what the table shows
    assert "2 of 3 runs would start; nothing was run" in printed


def test_cli_failure_exit_code_and_summary(
    run_cli: Callable[..., int],
    tmp_path: Path,
    fake: FakeTrainer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = run_cli("sweep", "pooling=avg,max", f"results_dir={tmp_path}", "--name", "t")
    captured = capsys.readouterr()
    assert code == 1
    assert "1 completed, 0 skipped (already completed), 1 failed" in captured.out
    assert "RuntimeError: boom" in captured.err
    assert run_cli("sweep", "pooling=avg", f"results_dir={tmp_path}") == 0  # everything it asks is done


CONCURRENT_SWEEP = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from poolbench import records, run
    from poolbench.cli import main

    EXECUTIONS = sys.argv[1]

    def slow_train(cfg, work_dir, built, resuming, progress, log, *, run_dir):
        with open(EXECUTIONS, "a") as log_file:
            log_file.write(run_dir.name + "\\n")
        time.sleep(0.7)
        work_dir.mkdir(parents=True, exist_ok=True)
        run_dir = work_dir
        record = {"run_id": run_dir.name, "status": "completed", "pooling": cfg.pooling.name, "seed": cfg.seed,
                  "mAP": 0.5, "wall_time_s": 0.7}
        records.atomic_write_json(run_dir / records.RECORD, record)
        return record

    run._train = slow_train
    run._build = lambda cfg, progress: None
    sys.argv = ["poolbench", "sweep", *sys.argv[2:]]
    main()
    """
)


@pytest.mark.slow
@pytest.mark.reliability
def test_two_sweeps_on_overlapping_grids_run_each_run_once(tmp_path: Path) -> None:
    executions = tmp_path / "executions.txt"
    results = tmp_path / "runs"
    grids = (["pooling=avg,max,gem", "seed=0,1"], ["pooling=gem,max,lse", "seed=1,0"])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_SWEEP, str(executions), *grid, f"results_dir={results}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for grid in grids
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    executed = executions.read_text().split()
    assert len(executed) == len(set(executed)) == 8  # 4 + 4 runs, the 4 shared ones once
    found, problems = records.iter_records(results)
    assert problems == [] and len(found) == 8 and {r["status"] for r in found} == {"completed"}


@pytest.mark.slow
def test_real_sweep_with_two_jobs_then_rerun_skips(tmp_path: Path) -> None:
    results = tmp_path / "runs"
    planned = sweep.plan(["pooling=avg,max", *TINY, f"results_dir={results}"])
    state = sweep.run_sweep(planned, jobs=2)
    assert [o.status for o in state.done] == ["completed", "completed"] and not state.failed
    for outcome in state.done:
        record = records.read_record(results / outcome.run_id)
        assert record is not None and record["cfg.trainer.num_threads"] >= 1 and "acc@1" in record
    again = sweep.plan(["pooling=avg,max", *TINY, f"results_dir={results}"])
    assert [p.status for p in again] == ["completed", "completed"]
    assert sweep.run_sweep(again).skipped == 2

    from poolbench import report

    built = report.build(results, baseline="avg")
    assert list(built.summary["choice.pooling"]) == ["avg", "max"] and len(built.comparison) == 2


@pytest.mark.slow
def test_submitit_local_executor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import submitit

    # As on a machine without SLURM, even where a test cluster runs (tests/test_slurm.py covers that one).
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", staticmethod(lambda: -1))
    results = tmp_path / "runs"
    planned = sweep.plan(["pooling=avg,gem", *TINY, f"results_dir={results}"])
    state = sweep.run_sweep(planned, jobs=2, executor="submitit", executor_params={"timeout_min": 10})
    assert len(state.done) == 2 and not state.failed, state.failed
    assert {records.read_record(p.run_dir)["status"] for p in planned} == {"completed"}  # type: ignore[index]
    logs = list((results / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2  # submitit's own job folders, under the results directory
    result_files = list((results / ".submitit").rglob("*_result.pkl"))
    assert len(result_files) == 2
    assert json.loads((planned[0].run_dir / records.RECORD).read_text())["status"] == "completed"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has ended; only its exit status waits to be collected


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").is_file() else []
        for child in map(int, children):
            found |= {child, *_descendants(child)}
    return found


@pytest.mark.slow
@pytest.mark.reliability
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the worker processes")
def test_sigterm_to_a_parallel_sweep_stops_its_workers_and_marks_runs_interrupted(tmp_path: Path) -> None:
    grid = ["pooling=avg,max", "dataset=digits", "trainer.epochs=50", "trainer.latency.enabled=false"]
    command = [sys.executable, "-m", "poolbench", "sweep", *grid, f"results_dir={tmp_path}", "--jobs", "2"]
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 120
    while len([d for d in tmp_path.glob("*/metrics.jsonl")]) < 2:  # both runs are training
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0] if proc.poll() else "timeout"
        time.sleep(0.2)
    workers = _descendants(proc.pid)
    assert len(workers) >= 2
    proc.terminate()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    assert "stopped (SIGTERM)" in out and "re-run the same command to resume" in out
    time.sleep(0.5)
    assert [pid for pid in workers if _alive(pid)] == []
    statuses = {records.read_record(d)["status"] for d in tmp_path.iterdir() if (d / records.RECORD).is_file()}  # type: ignore[index]
    assert statuses == {"interrupted"}
    assert {p.status for p in sweep.plan([*grid, f"results_dir={tmp_path}"])} == {"unfinished"}  # resumes next time


def test_sweep_names_and_run_ids_cannot_become_paths(
    run_cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("../x", "a/b", ".hidden", "[bold]x", ""):
        with pytest.raises(ConfigError, match="sweep name"):
            sweep.plan(["pooling=avg", f"results_dir={tmp_path}"], name=name)
    assert run_cli("sweep", "pooling=avg", f"results_dir={tmp_path}", "--name", "../../x", "--dry-run") == 2
    assert "error: sweep name '../../x' is not allowed" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="dataset.name is set by the option"):
        sweep.plan(["pooling=avg", "dataset.name=/../../X", f"results_dir={tmp_path / 'r'}"])
    assert not (tmp_path / "r").exists() and not (tmp_path.parent / "X").exists()


@pytest.mark.slow
def test_fast_planner_composes_exactly_what_compose_does() -> None:
    from omegaconf import OmegaConf

    from poolbench.config import compose, run_id

    grid = ["pooling=avg,gem,dgmp", "model=smallcnn,resnet18", "local_pooling=none,max", "trainer.lr=0.1,0.001"]
    override_sets = [full for full, _ in sweep.expand([*grid, "seed=0,1", "dataset=digits"])]
    override_sets += [  # the paths that work on a copy, presets, bundles, adds and interpolated values
        ["pooling=gem", "trainer.latency={enabled: false, batch_size: 8, warmup: 1, repeats: 2}"],
        ["pooling=avg", "++trainer.lr=0.5", "seed=3"],
        ["experiment=dgmp_paper_clamm", "dataset.train_images=/d/tr", "dataset.test_images=/d/te", "pooling=dgmp"],
        ["experiment=quick", "pooling=lse", "trainer.eval_batch_size=${trainer.batch_size}"],
        ["pooling=dgmp", "trainer.epochs=2", "trainer.epochs=3"],  # the last of a repeated key wins
    ]
    assert len(override_sets) >= 50
    fast = compose_many(override_sets)
    for overrides, cfg in zip(override_sets, fast, strict=True):
        slow = compose(overrides)
        assert run_id(cfg) == run_id(slow), overrides
        assert OmegaConf.to_container(cfg) == OmegaConf.to_container(slow), overrides
    # In-place edits are undone: a config composed later is not affected by an earlier one.
    assert [run_id(c) for c in compose_many(override_sets[::-1])] == [run_id(c) for c in fast[::-1]]
    with pytest.raises(ConfigError, match="unknown config key 'trainer.nope'"):
        compose_many([["pooling=avg"], ["pooling=avg", "trainer.nope=1"]])
    with pytest.raises(ConfigError, match="trainer.lr must be > 0"):
        compose_many([["trainer.lr=-1"]])
    with pytest.raises(ConfigError, match="is a sweep"):
        compose_many([["trainer.lr=0.1,0.2"]])
    with pytest.raises(ConfigError, match="Overrides look like"):
        compose_many([["trainer.lr=(("]])


@pytest.mark.slow
def test_a_local_sweep_ends_with_side_by_side_latency(run_cli: Callable[..., int], tmp_path: Path) -> None:
    grid = ["pooling=avg,max", "dataset=digits", "trainer.epochs=1", "trainer.steps_per_epoch=2"]
    assert run_cli("sweep", *grid, "trainer.latency.enabled=false", f"results_dir={tmp_path}") == 0
    timed = json.loads((tmp_path / "side_by_side.json").read_text())
    assert timed["baseline"] == "avg" and {row["pooling"] for row in timed["rows"]} == {"avg", "max"}
    assert run_cli("sweep", *grid[1:], "pooling=gem", f"results_dir={tmp_path / 'b'}", "--no-side-by-side") == 0
    assert not (tmp_path / "b" / "side_by_side.json").exists()
