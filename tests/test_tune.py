"""`poolbench tune`: equal budgets, trials as runs, kill -9 and resume, SQLite and PostgreSQL workers,
the protocol in the report, bad input.

Most tests replace the training inside ``run.execute`` (``tests/tune_fake_training.py``: locks, records
and resume stay real) so that a study's behaviour is exact and fast; one slow test trains for real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tune_fake_training as fake  # noqa: E402

from poolbench import records, tune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LR = "trainer.lr=tag(log, interval(1e-4, 1e-1))"
BASE = ["dataset=digits", "trainer.epochs=1", "trainer.steps_per_epoch=2", "trainer.latency.enabled=false"]


@pytest.fixture
def faked(monkeypatch: pytest.MonkeyPatch) -> None:
    fake.install(monkeypatch.setattr)


def _studies(folder: Path, storage: str | None = None) -> dict[str, list[Any]]:
    import optuna

    url = storage or f"sqlite:///{folder / tune.STUDY_DB}"
    protocol = json.loads((folder / tune.PROTOCOL).read_text())
    return {
        t: optuna.load_study(study_name=name, storage=tune.open_storage(url)).get_trials(deepcopy=False)
        for t, name in protocol["studies"].items()
    }


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "POOLBENCH_PLUGINS": str(Path(fake.__file__).resolve()),
        "POOLBENCH_FAKE_TRAIN": "1",
        **extra,
    }


def _tune_process(args: list[str], prelude: str = "", **env: str) -> subprocess.Popen[str]:
    """``poolbench tune <args>`` in a fresh interpreter; ``prelude`` is Python run before the CLI starts."""
    start = ["-m", "poolbench", "tune"]
    if prelude:
        cli = "from poolbench.cli import main\nsys.argv[:1] = ['poolbench', 'tune']\nmain()"
        start = ["-c", f"import sys\n{prelude}\n{cli}"]
    return subprocess.Popen(
        [sys.executable, *start, *args],
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _completed(folder: Path) -> list[Path]:
    out = []
    for record_path in folder.glob(f"*/{records.RECORD}"):
        record = json.loads(record_path.read_text())
        if record["status"] == "completed":
            out.append(record_path.parent)
    return out


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _check_budget(folder: Path, trials: int, storage: str | None = None) -> None:
    """Every study holds exactly trials 0..trials-1 finished, each with its run's recorded value, and no
    run was trained twice (a run cut by a kill is resumed, never started over from a finished state)."""
    from optuna.trial import TrialState

    for treatment, study_trials in _studies(folder, storage).items():
        budget = [t for t in study_trials if t.number < trials]
        assert [t.number for t in budget] == list(range(trials))
        assert all(t.state == TrialState.COMPLETE for t in budget), [(t.number, t.state) for t in budget]
        assert all(t.state == TrialState.FAIL and t.user_attrs.get("over_budget") for t in study_trials[trials:])
        for trial in budget:
            run_dir = folder / tune.TRIALS / trial.user_attrs["run_id"]
            record = records.read_record(run_dir)
            assert record is not None and record["pooling"] == treatment
            assert trial.value == record["val.acc@1"] == fake.score(treatment, trial.params["trainer.lr"])
            calls = fake.calls(run_dir)
            assert len(calls) >= 1 and all("resuming=" in c for c in calls)
            assert len(calls) <= 2, calls  # at most: started, killed, resumed


# ------------------------------------------------------------------------------------------ the study


def test_two_operators_three_trials_same_budget_then_final_seeds(
    run_cli: Callable[..., int], tmp_path: Path, faked: None
) -> None:
    from poolbench import report as reporting

    assert run_cli("tune", "pooling=avg,max", LR, *BASE, "--trials", "3", "--seeds", "2", "--name", "t",
                   f"results_dir={tmp_path}") == 0
    folder = tmp_path / "tune" / "t"
    protocol = json.loads((folder / tune.PROTOCOL).read_text())
    assert protocol["trials_per_treatment"] == 3 and protocol["treatments"] == ["avg", "max"]
    assert protocol["sampler"]["name"] == "tpe" and protocol["sampler"]["seed"] == 0
    assert protocol["selection"]["metric"] == {"avg": "val.acc@1", "max": "val.acc@1"}
    assert "dataset.val_share=0.2" in protocol["fixed_overrides"]  # tune always selects on validation
    assert protocol["tuning_seed"] == 0 and protocol["final_seeds"] == [1, 2]
    _check_budget(folder, 3)
    studies = _studies(folder)
    # The same sampler seed gives every treatment the same startup points: equal effort, not luck.
    lrs = {t: [x.params["trainer.lr"] for x in trials] for t, trials in studies.items()}
    assert lrs["avg"] == lrs["max"]
    for treatment, result in protocol["results"].items():
        assert result["finished"] == result["complete"] == 3
        best = max(studies[treatment], key=lambda x: x.value)
        assert result["best"]["params"] == best.params and result["best"]["value"] == best.value
        final = [records.read_record(folder / tune.FINAL / run_id) for run_id in result["final_run_ids"]]
        assert sorted(r["seed"] for r in final) == [1, 2]  # disjoint from the tuning seed 0
        assert all(r["status"] == "completed" and r["sweep_name"] == "tune.t.final" for r in final)
        assert all(r["cfg.trainer.lr"] == best.params["trainer.lr"] for r in final)
        assert all(r["cfg.dataset.val_share"] == 0.2 for r in final)
    # The report of the final runs states the protocol and pairs each operator at its own tuned lr.
    built = reporting.build(folder / tune.FINAL, baseline="avg")
    assert not [w for w in built.warnings if "CONFOUNDED" in w or "UNEQUAL" in w], built.warnings
    assert "tuned.trainer.lr" in built.runs.columns and "cfg.trainer.lr" not in built.runs.columns
    assert list(built.comparison["operator"].unique()) == ["max"] if "operator" in built.comparison else True
    assert not built.comparison.empty
    assert any("3 trials per treatment" in n and "val.acc@1" in n for n in built.notes)
    # Running it again changes nothing and trains nothing.
    before = {p: p.stat().st_mtime_ns for p in folder.rglob(records.RECORD)}
    assert run_cli("tune", "pooling=avg,max", LR, *BASE, "--trials", "3", "--seeds", "2", "--name", "t",
                   f"results_dir={tmp_path}") == 0
    assert {p: p.stat().st_mtime_ns for p in folder.rglob(records.RECORD)} == before
    # The whole tune folder mixes trials in: said loudly.
    mixed = reporting.build(folder, baseline="avg")
    assert any("tuning trials" in w for w in mixed.warnings)


def test_qmc_sampler_and_failed_trials_count_in_the_budget(
    run_cli: Callable[..., int], tmp_path: Path, faked: None
) -> None:
    from optuna.trial import TrialState

    # lr above 0.5 "diverges" in the fake: such trials fail, count as spent, and are never selected.
    args = ["pooling=avg", "trainer.lr=interval(0.001, 0.9)", *BASE, "--trials", "4", "--sampler", "qmc",
            "--sampler-seed", "3", "--no-final", "--name", "q", f"results_dir={tmp_path}"]
    assert run_cli("tune", *args) == 0
    folder = tmp_path / "tune" / "q"
    trials = _studies(folder)["avg"]
    assert len(trials) == 4 and {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.FAIL}
    protocol = json.loads((folder / tune.PROTOCOL).read_text())
    assert protocol["sampler"]["name"] == "qmc" and protocol["sampler"]["seed"] == 3
    result = protocol["results"]["avg"]
    assert result["finished"] == 4 and result["complete"] + result["failed"] == 4
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert all(t.params["trainer.lr"] > 0.5 and "nan" in t.user_attrs["error"] for t in failed)
    assert result["best"]["params"]["trainer.lr"] <= 0.5
    assert not (folder / tune.FINAL).exists()  # --no-final


def test_operator_parameters_join_the_space_of_their_operator_only(
    run_cli: Callable[..., int], tmp_path: Path, faked: None
) -> None:
    args = ["pooling=avg,gem", "pooling.p=interval(1.5, 6)", "trainer.optimizer=choice(adam,sgd)", *BASE,
            "--trials", "2", "--no-final", "--name", "g", f"results_dir={tmp_path}"]
    assert run_cli("tune", *args) == 0
    studies = _studies(tmp_path / "tune" / "g")
    assert all(set(t.params) == {"trainer.optimizer"} for t in studies["avg"])
    assert all(set(t.params) == {"pooling.p", "trainer.optimizer"} for t in studies["gem"])
    for trial in studies["gem"]:
        record = records.read_record(tmp_path / "tune" / "g" / tune.TRIALS / trial.user_attrs["run_id"])
        assert record is not None and record["cfg.pooling.p"] == trial.params["pooling.p"]


def test_another_treatment_axis(run_cli: Callable[..., int], tmp_path: Path, faked: None) -> None:
    args = ["--treatment", "local_pooling", "local_pooling=max,avg", LR, *BASE, "--trials", "2", "--no-final",
            "--name", "lp", f"results_dir={tmp_path}"]
    assert run_cli("tune", *args) == 0
    folder = tmp_path / "tune" / "lp"
    protocol = json.loads((folder / tune.PROTOCOL).read_text())
    assert protocol["treatment_key"] == "local_pooling" and protocol["studies"] == {"max": "lp.max", "avg": "lp.avg"}
    for treatment, trials in _studies(folder).items():
        assert len(trials) == 2
        for trial in trials:
            record = records.read_record(folder / tune.TRIALS / trial.user_attrs["run_id"])
            assert record is not None and record["local_pooling"] == treatment and record["pooling"] == "avg"


# ------------------------------------------------------------------------------------------ kill and resume


# A killed worker's trial taken over, the budget kept and no finished run retrained: in the fast tier with the
# concurrent workers' test below; this one adds a lone process resuming the study, with its final seeds.
@pytest.mark.slow
def test_kill_9_mid_study_then_resume_loses_and_repeats_no_trial(tmp_path: Path) -> None:
    args = ["pooling=avg,max", LR, *BASE, "--trials", "3", "--seeds", "1", "--name", "k", f"results_dir={tmp_path}"]
    trials_dir = tmp_path / "tune" / "k" / tune.TRIALS
    process = _tune_process(args, POOLBENCH_FAKE_SLEEP="1.5")
    try:
        # Killed while a trial's run is in flight (its record says running) after two trials finished.
        def mid_run() -> bool:
            running = [p for p in trials_dir.glob(f"*/{records.RECORD}") if '"running"' in p.read_text()]
            return len(_completed(trials_dir)) >= 2 and bool(running)

        _wait_for(mid_run, 240, "two finished trials and one in flight")
        finished_before = {p: fake.calls(p) for p in _completed(trials_dir)}
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    resumed = _tune_process(args)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert "taken over" in output  # the dead process's RUNNING trial, same number, same parameters
    folder = tmp_path / "tune" / "k"
    _check_budget(folder, 3)
    for run_dir, calls in finished_before.items():  # finished before the kill: never trained again
        assert fake.calls(run_dir) == calls and len(calls) == 1, (run_dir.name, calls, output)
    protocol = json.loads((folder / tune.PROTOCOL).read_text())
    assert all(len(r["final_run_ids"]) == 1 for r in protocol["results"].values())


def _postgres_url() -> str:
    try:
        done = subprocess.run(
            [str(ROOT / "scripts" / "postgres_local.sh"), "url"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"no PostgreSQL server: {exc}")
    if done.returncode != 0 or not done.stdout.strip():
        pytest.skip("no PostgreSQL server answers (start one with scripts/postgres_local.sh start)")
    return done.stdout.strip()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_two_concurrent_workers_share_each_study_and_one_is_killed(backend: str, tmp_path: Path) -> None:
    storage = [] if backend == "sqlite" else ["--storage", _postgres_url()]
    name = f"w{uuid.uuid4().hex[:8]}"  # a PostgreSQL database outlives the test: a study name of its own
    args = ["pooling=avg,max", LR, *BASE, "--trials", "4", "--no-final", "--name", name, f"results_dir={tmp_path}",
            *storage]
    folder = tmp_path / "tune" / name
    first = _tune_process(args, POOLBENCH_FAKE_SLEEP="1.5")
    _wait_for(lambda: (folder / tune.PROTOCOL).is_file(), 240, "the first worker's protocol")
    second = _tune_process([*args, "--jobs", "2"], POOLBENCH_FAKE_SLEEP="1.5")  # a local process pool
    try:
        _wait_for(lambda: len(_completed(folder / tune.TRIALS)) >= 2, 240, "two finished trials")
        first.send_signal(signal.SIGKILL)  # a worker dies mid-study; the other takes its trial over
        first.wait(30)
        output, _ = second.communicate(timeout=600)
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert second.returncode == 0, output
    _check_budget(folder, 4, storage[1] if storage else None)
    runs = [p for p in (folder / tune.TRIALS).iterdir() if p.is_dir()]
    assert sum(len(fake.calls(p)) for p in runs) <= len(runs) + 1  # only the killed worker's run twice


def test_submitit_executor_runs_the_trials_as_jobs(tmp_path: Path) -> None:
    # submitit's local executor: the same pool code as a SLURM job array (tests/test_slurm.py). Where SLURM is
    # installed (srun on PATH), submitit's auto executor would pick slurm and fail when its controller is down:
    # the process sees SLURM as unavailable, as on a machine without it (the real cluster: tests marked slurm).
    args = ["pooling=avg", LR, *BASE, "--trials", "2", "--seeds", "1", "--name", "s", f"results_dir={tmp_path}",
            "--executor", "submitit", "--jobs", "2"]
    no_slurm = "import submitit\nsubmitit.SlurmExecutor.affinity = staticmethod(lambda: -1)"
    process = _tune_process(args, prelude=no_slurm)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    folder = tmp_path / "tune" / "s"
    _check_budget(folder, 2)
    assert list((folder / ".submitit").iterdir())  # submitit's job folders
    protocol = json.loads((folder / tune.PROTOCOL).read_text())
    assert len(protocol["results"]["avg"]["final_run_ids"]) == 1


# ------------------------------------------------------------------------------------------ the report


def test_unequal_budgets_are_a_loud_warning(run_cli: Callable[..., int], tmp_path: Path, faked: None) -> None:
    from poolbench import report as reporting

    for pooling, trials in (("avg", "2"), ("max", "3")):
        args = [f"pooling={pooling}", LR, *BASE, "--trials", trials, "--seeds", "2", "--name", pooling,
                f"results_dir={tmp_path}"]
        assert run_cli("tune", *args) == 0
    built = reporting.build(tmp_path / "tune", baseline="avg")
    budget = [w for w in built.warnings if w.startswith("UNEQUAL TUNING BUDGET")]
    assert len(budget) == 1 and "2 of 2 trials" in budget[0] and "3 of 3 trials" in budget[0]
    assert any("protocols differ in" in w for w in built.warnings)
    assert any("WARNING: UNEQUAL TUNING BUDGET" in line for line in built.provenance())  # in every file


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pooling=avg,max", *BASE], "empty search space"),
        (["pooling=avg,max", "trainer.lrr=interval(0.1, 1)"], "unknown config key 'trainer.lrr'"),
        (["pooling=avg,max", "trainer.lr=interval(0.1, 0.01)"], "lower bound 0.1 is not below the upper bound 0.01"),
        (["pooling=avg,max", "trainer.lr=interval(0, 0.1)"], "trainer.lr must be > 0"),
        (["pooling=avg,max", "trainer.lr=tag(log, interval(0, 0.1))"], "log interval needs a lower bound > 0"),
        (["pooling=avg,max", "trainer.epochs=range(3,3)"], "range is empty"),
        (["pooling=avg,max", "seed=range(0,3)"], "seed cannot be tuned"),
        (["trainer.lr=interval(0.01, 0.1)"], "no treatments"),
        (["pooling=avg,dgmpp", "trainer.lr=interval(0.01, 0.1)"], "unknown pooling option 'dgmpp'"),
        (["pooling=avg", "trainer.lr=interval(0.01, 0.1)", "dataset.val_share=0"], "validation split"),
        (["pooling=avg", "trainer.lr=interval(0.01, 0.1)", "--sampler", "grid"], "unknown sampler 'grid'"),
        (["pooling=avg", "trainer.lr=interval(0.01, 0.1)", "--storage", "nonsense"], "not a database URL"),
        (["pooling=avg", "trainer.lr=interval(0.01, 0.1)", "--storage", "postgresql://u@127.0.0.1:1/x"],
         "does not answer"),
        (["pooling=avg", "trainer.lr=interval(0.01, 0.1)", "--name", "../x"], "not allowed"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], run_cli: Callable[..., int]
) -> None:
    results = tmp_path / "results"
    assert run_cli("tune", *args, f"results_dir={results}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert len(err.splitlines()) <= 3  # one line, wrapped by the terminal width at most
    assert not results.exists()


def test_another_protocol_under_the_same_name_is_refused(
    run_cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str], faked: None
) -> None:
    args = ["pooling=avg", LR, *BASE, "--seeds", "1", "--name", "same", f"results_dir={tmp_path}"]
    assert run_cli("tune", *args, "--trials", "1") == 0
    before = sorted(p for p in (tmp_path / "tune").rglob("*") if p.is_file())
    assert run_cli("tune", *args, "--trials", "2") == 2
    assert "another protocol" in capsys.readouterr().err
    assert sorted(p for p in (tmp_path / "tune").rglob("*") if p.is_file()) == before


def test_more_final_seeds_extend_the_final_stage_and_retune_nothing(
    run_cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str], faked: None
) -> None:
    args = ["pooling=avg,max", LR, *BASE, "--trials", "2", "--name", "grow", f"results_dir={tmp_path}"]
    assert run_cli("tune", *args, "--seeds", "2") == 0
    folder = tmp_path / "tune" / "grow"
    trials_before = {p: p.stat().st_mtime_ns for p in (folder / tune.TRIALS).rglob(records.RECORD)}
    finals_before = {p: p.stat().st_mtime_ns for p in (folder / tune.FINAL).rglob(records.RECORD)}
    assert run_cli("tune", *args, "--seeds", "4") == 0
    protocol = json.loads((folder / tune.PROTOCOL).read_text())
    assert protocol["final_seeds"] == [1, 2, 3, 4]
    assert {p: p.stat().st_mtime_ns for p in (folder / tune.TRIALS).rglob(records.RECORD)} == trials_before
    finals = {p: p.stat().st_mtime_ns for p in (folder / tune.FINAL).rglob(records.RECORD)}
    assert len(finals) == 8 and all(finals[p] == t for p, t in finals_before.items())  # old seeds kept
    for result in protocol["results"].values():
        assert sorted(records.read_record(folder / tune.FINAL / r)["seed"] for r in result["final_run_ids"]) == [
            1, 2, 3, 4,
        ]  # fmt: skip
    capsys.readouterr()
    assert run_cli("tune", *args, "--seeds", "3") == 2  # fewer would leave finished final runs out
    assert "another protocol" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ for real


@pytest.mark.slow
def test_real_training_two_operators_three_trials(run_cli: Callable[..., int], tmp_path: Path) -> None:
    from poolbench import report as reporting

    args = ["pooling=avg,max", LR, *BASE, "--trials", "3", "--seeds", "2", "--name", "real", f"results_dir={tmp_path}"]
    assert run_cli("tune", *args) == 0
    folder = tmp_path / "tune" / "real"
    for trials in _studies(folder).values():
        assert len(trials) == 3
        for trial in trials:
            record = records.read_record(folder / tune.TRIALS / trial.user_attrs["run_id"])
            assert record is not None and trial.value == record["val.acc@1"]
    built = reporting.build(folder / tune.FINAL, baseline="avg")
    assert len(built.runs) == 4 and not built.comparison.empty
