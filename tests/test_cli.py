"""The real `poolbench` command in subprocesses: help, list, --cfg, one-line errors, an end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from poolbench.errors import ConfigError

TINY = [
    "dataset=digits",
    "trainer.epochs=1",
    "trainer.steps_per_epoch=3",
    "trainer.latency.repeats=2",
    "trainer.latency.warmup=1",
    "trainer.latency.batch_size=4",
]


def poolbench(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "160", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "poolbench", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def test_help_lists_the_commands() -> None:
    result = poolbench("--help")
    assert result.returncode == 0
    for command in ("train", "list"):
        assert command in result.stdout


def test_list_shows_every_operator() -> None:
    from poolbench.pooling import local_names, names

    result = poolbench("list")
    assert result.returncode == 0, result.stderr
    words = set(re.findall(r"[\w.+-]+", result.stdout))  # the table's words, whatever its borders and padding
    assert set(names() + local_names()) <= words
    assert "Christlein" in result.stdout
    groups = poolbench("list", "groups")
    assert groups.returncode == 0 and "synthwriters" in groups.stdout


def test_cfg_prints_resolved_config_without_running(tmp_path: Path) -> None:
    result = poolbench("train", "--cfg", "pooling=gem", "pooling.p=4", f"results_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "p: 4" in result.stdout and "pooling: gem" in result.stdout
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["pooling=dgmpp"], "Did you mean 'dgmp'?"),
        (["trainer.epochs=abc"], "trainer.epochs must be of type int"),
        (["pooling=gem", "pooling.p=-1"], "pooling=gem"),
        (["seed=range(0,3)"], "poolbench sweep"),
        (["--plugin", "x"], "unknown option '--plugin'"),
        (["trainer.optimizer='[/x]'"], "unknown trainer.optimizer '[/x]'"),  # markup in a value: shown as is
        (["trainer.optimizer='[bold]x'"], "'[bold]x'"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    result = poolbench("train", *args, f"results_dir={tmp_path}")
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_version() -> None:
    import poolbench as package

    result = poolbench("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"poolbench {package.__version__}"


@pytest.mark.slow
def test_train_end_to_end_writes_a_complete_record_and_reuses_it(tmp_path: Path) -> None:
    result = poolbench("train", "--quiet", *TINY, f"results_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    for name in ("config.yaml", "env.json", "metrics.jsonl", "checkpoint.pt", "result.json"):
        assert (run_dir / name).is_file(), name
    record = json.loads((run_dir / "result.json").read_text())
    assert record["status"] == "completed"
    assert record["dataset"] == "digits" and record["pooling"] == "avg" and record["choice.model"] == "smallcnn"
    assert 0.0 <= record["acc@1"] <= 1.0
    assert record["latency.infer_image_ms"] > 0
    assert record["feature_map_h"] >= 1 and record["wall_time_s"] > 0
    assert all(not isinstance(v, dict | list) for k, v in record.items() if not k.startswith("cfg."))
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"] and env["device"] == "cpu"

    again = poolbench("train", "--quiet", *TINY, f"results_dir={tmp_path}")
    assert again.returncode == 0 and "reused" in again.stdout
    assert json.loads((run_dir / "result.json").read_text())["finished_at"] == record["finished_at"]


@pytest.mark.slow
def test_train_on_a_tiny_icdar17_folder_reports_writer_retrieval(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "icdar17_layout", Path(__file__).parent / "data" / "test_data_icdar17.py"
    )
    assert spec is not None and spec.loader is not None
    layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout)  # reuse the data tests' writer of the Historical-WI layout

    root = layout.make_layout(tmp_path / "icdar17", train={1001: 3, 1002: 3, 1003: 3}, test={7: 2, 8: 3, 9: 2})
    result = poolbench(
        "train",
        "--quiet",
        "dataset=icdar17",
        f"dataset.root={root}",
        "dataset.page_scale=1.0",
        "dataset.patch_size=60",
        "dataset.input_size=32",
        "trainer.writers_per_batch=3",
        "trainer.patches_per_writer=2",
        "trainer.epochs=1",
        "trainer.steps_per_epoch=2",
        "trainer.latency.enabled=false",
        "pooling=dgmp",
        f"results_dir={tmp_path / 'runs'}",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(next((tmp_path / "runs").glob("*/result.json")).read_text())
    assert record["status"] == "completed" and record["task"] == "retrieval" and record["pooling"] == "dgmp"
    assert 0.0 <= record["mAP"] <= 1.0 and {"top1", "soft@2", "hard@2"} <= record.keys()


def test_python_api_composes_like_the_cli() -> None:
    import poolbench as package

    cfg = package.compose(["pooling=gem", "pooling.p=4"])
    assert cfg.pooling.p == 4 and cfg.choices.pooling == "gem"
    with pytest.raises(ConfigError, match="Did you mean 'dgmp'"):
        package.compose(["pooling=dgmpp"])
