"""poolbench.run.execute in-process: nothing written on build errors, full disks, file modes,
the trained model returned, the record's resume and learned fields, overwrite safety."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from poolbench import files, records, run
from poolbench.config import compose
from poolbench.config import run_dir as config_run_dir
from poolbench.errors import PoolbenchError

TINY = [
    "dataset=digits",
    "trainer.epochs=2",
    "trainer.steps_per_epoch=3",
    "trainer.latency.enabled=false",
    "trainer.num_threads=1",
]


def config(tmp_path: Path, *extra: str):  # noqa: ANN201
    return compose([*TINY, f"results_dir={tmp_path}", *extra])


@pytest.mark.parametrize(
    "bad",
    [
        ["model=resnet18", "pooling=spp", "pooling.levels=[8]"],  # the pool cannot cut the 1x1 map into 8x8 cells
        ["dataset=icdar17", "dataset.root=/nonexistent/icdar17"],
    ],
)
def test_errors_found_while_building_write_nothing(tmp_path: Path, bad: list[str]) -> None:
    cfg = config(tmp_path, *bad)
    with pytest.raises(PoolbenchError):
        run.execute(cfg)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_architecture_is_refused_when_composing(tmp_path: Path) -> None:
    with pytest.raises(PoolbenchError, match="unknown torchvision model 'nosuchmodel'"):
        config(tmp_path, "model=torchvision", "model.arch=nosuchmodel")


def test_record_fields_learned_resume_and_model(tmp_path: Path) -> None:
    cfg = config(tmp_path, "pooling=gem")
    record, model = run.execute(cfg, return_model=True)
    assert record["status"] == "completed" and record["resumed"] is False and record["resume_count"] == 0
    from poolbench.pooling import learned_scalars

    assert {k: v for k, v in record.items() if k.startswith("learned.")} == {
        f"learned.{k}": v for k, v in learned_scalars(model.pool).items()
    }
    run_dir = Path(record["run_dir"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(any(k.startswith("learned.") for k in row) for row in rows)
    assert [p.name for p in tmp_path.iterdir()] == [run_dir.name]  # no lock or staging left behind

    again, reused_model = run.execute(cfg, return_model=True)
    assert again["reused"] is True
    for a, b in zip(model.state_dict().values(), reused_model.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b)


def test_disk_full_mid_run_fails_in_one_line_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = files.atomic_write
    saved: list[Path] = []

    def fill_up(path: Path, write) -> None:  # noqa: ANN001
        if path.name == "checkpoint.pt":
            saved.append(path)
            if len(saved) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, write)

    monkeypatch.setattr(files, "atomic_write", fill_up)
    cfg = config(tmp_path)
    with pytest.raises(run.DiskFullError) as info:
        run.execute(cfg)
    assert "\n" not in str(info.value) and "trainer.resume=true" in str(info.value)
    run_dir = config_run_dir(cfg)
    record = records.read_record(run_dir)
    assert record is not None and record["status"] == "failed" and "disk full" in record["error"]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1  # the last good one

    monkeypatch.setattr(files, "atomic_write", real)  # space freed: the run resumes and completes
    resumed = run.execute(config(tmp_path, "trainer.resume=true"))
    assert resumed["status"] == "completed" and resumed["resume_count"] == 1


def test_files_follow_the_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[int] = []
    real_lock = records.run_lock

    def spy_lock(run_dir: Path):  # noqa: ANN202
        context = real_lock(run_dir)
        context.__enter__()
        taken.append(stat.S_IMODE(records.lock_path(run_dir).stat().st_mode))
        return _Exit(context)

    class _Exit:
        def __init__(self, context) -> None:  # noqa: ANN001
            self.context = context

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: object) -> None:
            self.context.__exit__(*exc)

    monkeypatch.setattr(records, "run_lock", spy_lock)
    previous = os.umask(0o002)
    try:
        record = run.execute(config(tmp_path, "trainer.logger=tensorboard"))
    finally:
        os.umask(previous)
    run_dir = Path(record["run_dir"])
    assert taken == [0o664]
    paths = [run_dir, *run_dir.rglob("*")]
    assert any(p.parent.name == "tb" for p in paths)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert modes == {name: (0o775 if (tmp_path / name).is_dir() else 0o664) for name in modes}


def test_overwrite_replaces_a_completed_run_only_once_it_completed(tmp_path: Path) -> None:
    first = run.execute(config(tmp_path))
    run_dir = Path(first["run_dir"])
    old = {name: (run_dir / name).read_bytes() for name in ("result.json", "checkpoint.pt", "metrics.jsonl")}

    def interrupt(task: str, done: int, total: int) -> None:
        if task == "train" and done == 4:
            assert records.read_record(run_dir) == first  # untouched while the new run trains
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.execute(config(tmp_path, "trainer.overwrite=true"), progress=interrupt)
    assert {name: (run_dir / name).read_bytes() for name in old} == old
    assert run.execute(config(tmp_path))["reused"] is True  # the interrupted overwrite left nothing behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_dir.name]

    second = run.execute(config(tmp_path, "trainer.overwrite=true"))
    assert second["status"] == "completed" and second["started_at"] >= first["started_at"]
    assert records.read_record(run_dir) == json.loads(json.dumps(second, default=str))
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_dir.name]


def test_recover_finishes_a_swap_killed_between_its_renames(tmp_path: Path) -> None:
    run_dir, staged = tmp_path / "r", records.staging_dir(tmp_path / "r")
    staged.mkdir(parents=True)
    (staged / "result.json").write_text("new")
    replaced = staged.with_name("r.replaced")
    replaced.mkdir()
    (replaced / "result.json").write_text("old")
    records.recover(run_dir)  # killed after run_dir → .replaced, before staged → run_dir
    assert (run_dir / "result.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_a_really_full_disk_is_reported_as_one(tmp_path: Path) -> None:
    """torch.save on a full disk raises an unrelated RuntimeError; checkpoints must surface ENOSPC."""
    import subprocess

    from poolbench.engine.checkpoint import TrainState

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        model = torch.nn.Linear(512, 512)  # 1 MiB of weights: more than the disk holds
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        state = TrainState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                           torch.amp.GradScaler("cpu", enabled=False))
        with pytest.raises(OSError) as info:
            state.save(disk / "checkpoint.pt")
        assert files.is_disk_full(info.value)
        assert list(disk.iterdir()) == []  # no partial temp file left
    finally:
        subprocess.run(["umount", str(disk)], check=True)


SMALL_WRITERS = [
    "dataset.page_size=96", "dataset.patch_size=32", "dataset.train_writers=5", "dataset.test_writers=3",
    "dataset.test_pages_per_writer=2", "dataset.train_patches_per_page=4", "trainer.writers_per_batch=2",
    "trainer.epochs=1", "trainer.steps_per_epoch=2", "trainer.latency.enabled=false", "trainer.num_threads=1",
]


@pytest.mark.parametrize(
    ("overrides", "metrics"),
    [
        ([*TINY, "dataset.val_share=0.2"], ("acc@1", "acc@5")),
        (["dataset=synthwriters", *SMALL_WRITERS, "dataset.val_share=2"], ("mAP", "top1", "soft@4")),
    ],
    ids=["classification", "retrieval"],
)
def test_records_carry_validation_metrics_beside_the_test_ones(
    tmp_path: Path, overrides: list[str], metrics: tuple[str, ...]
) -> None:
    cache = f"dataset.cache_dir={tmp_path / 'cache'}" if "dataset=synthwriters" in overrides else "seed=0"
    record = run.execute(compose([*overrides, f"results_dir={tmp_path / 'runs'}", cache]))
    for metric in metrics:
        assert 0.0 <= record[metric] <= 1.0 and 0.0 <= record[f"val.{metric}"] <= 1.0
    assert record.get("data.val_size", record.get("data.val_writers", 0)) >= 2  # the split's size is recorded
    plain = run.execute(compose([*overrides[:-1], f"results_dir={tmp_path / 'plain'}", cache]))
    assert not any(k.startswith("val.") for k in plain) and metrics[0] in plain
