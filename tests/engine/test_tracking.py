"""Per-epoch rows (learned scalars, periodic evaluation), TensorBoard, resume counting, unusable checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_train import TRAINER, interrupt_at, small_model, train  # pytest puts this folder on sys.path
from torch import nn

from poolbench.data.base import DataBundle
from poolbench.engine.checkpoint import CheckpointError
from poolbench.engine.tracking import learned_fields


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_eval_every_records_eval_metrics_without_changing_training(
    tiny_classification: DataBundle, tmp_path: Path
) -> None:
    plain, _ = train(tiny_classification, tmp_path / "plain", epochs=3, steps_per_epoch=None)
    evaluated, _ = train(tiny_classification, tmp_path / "eval", epochs=3, steps_per_epoch=None, eval_every=2)
    for (name, a), b in zip(plain.state_dict().items(), evaluated.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    rows, plain_rows = rows_of(tmp_path / "eval"), rows_of(tmp_path / "plain")
    assert [r["loss"] for r in rows] == [r["loss"] for r in plain_rows]
    assert ["eval.acc@1" in r for r in rows] == [False, True, False]  # epochs 2, 4, ... only
    assert 0.0 <= rows[1]["eval.acc@1"] <= 1.0 and "eval.acc@5" not in rows[1]  # 4 classes: acc@5 is 1 by construction


def test_eval_every_on_retrieval_records_map(tiny_retrieval: DataBundle, tmp_path: Path) -> None:
    train(tiny_retrieval, tmp_path, eval_every=1)
    assert all(0.0 <= r["eval.mAP"] <= 1.0 for r in rows_of(tmp_path))


def with_val(data: DataBundle) -> DataBundle:
    """The bundle with a validation split shaped like its test split (a copy of it: only the routing of
    the curves is under test here; the splits' disjointness is tested per dataset in tests/data)."""
    return dataclasses.replace(data, val=data.test, val_page_writers=data.page_writers)


@pytest.mark.parametrize("kind", ["retrieval", "classification"])
def test_eval_every_curves_are_on_the_validation_split_and_warn_once_without_one(
    kind: str, tiny_retrieval: DataBundle, tiny_classification: DataBundle, tmp_path: Path
) -> None:
    from poolbench.engine import fit

    data = tiny_retrieval if kind == "retrieval" else tiny_classification
    metric = "mAP" if kind == "retrieval" else "acc@1"
    for name, bundle in (("val", with_val(data)), ("none", data)):
        lines: list[str] = []
        fit(small_model(bundle), bundle, {**TRAINER, "epochs": 3, "eval_every": 1}, device=torch.device("cpu"),
            seed=0, run_dir=tmp_path / name, pool_lr_mult=1.0, log=lines.append)
        rows = rows_of(tmp_path / name)
        warnings = [line for line in lines if "TEST split" in line]
        if name == "val":
            assert all(0.0 <= r[f"val.{metric}"] <= 1.0 for r in rows)
            assert not any(k.startswith("eval.") for r in rows for k in r) and warnings == []
        else:
            assert all(f"eval.{metric}" in r and not any(k.startswith("val.") for k in r) for r in rows)
            assert len(warnings) == 1 and "nothing" in warnings[0] and "dataset.val_share" in warnings[0]


class UnitPool(nn.Module):
    """Average pooling scaled by a learned s, stored as log s: learned_values reports s itself."""

    def __init__(self) -> None:
        super().__init__()
        self.log_s = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * self.log_s.exp()

    def learned_values(self) -> dict[str, float]:
        return {"s": float(self.log_s.detach().exp())}


def test_rows_carry_learned_scalars_in_natural_units(tiny_retrieval: DataBundle, tmp_path: Path) -> None:
    model = small_model(tiny_retrieval)
    model.pool = UnitPool()
    from poolbench.engine import fit

    fit(model, tiny_retrieval, TRAINER, device=torch.device("cpu"), seed=0, run_dir=tmp_path, pool_lr_mult=10.0)
    rows = rows_of(tmp_path)
    assert [set(r) - {"epoch", "loss", "lr", "seconds", "steps"} for r in rows] == [{"learned.s"}] * 2
    assert rows[-1]["learned.s"] == pytest.approx(model.pool.log_s.exp().item())
    assert rows[0]["learned.s"] != rows[1]["learned.s"]  # it is learned


def test_local_pool_scalars_are_prefixed(tiny_retrieval: DataBundle) -> None:
    from poolbench.models import build_model

    model = build_model(
        {"name": "smallcnn", "width": 4, "depth": 2, "embedding_dim": 8},
        {"name": "gem"},
        {"name": "mixed"},
        in_channels=1,
        input_size=16,
        num_classes=6,
        task="retrieval",
    )
    fields = learned_fields(model)
    assert any(k.startswith("learned.local.") for k in fields)
    assert any(k.startswith("learned.") and not k.startswith("learned.local.") for k in fields)


def test_tensorboard_logger_writes_step_and_epoch_scalars(tiny_retrieval: DataBundle, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_retrieval, tmp_path, pooling="gem", logger="tensorboard", eval_every=2)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"step/loss", "step/lr", "epoch/loss", "epoch/lr", "eval/mAP"} <= tags
    assert any(tag.startswith("learned/") for tag in tags)
    assert [e.step for e in events.Scalars("step/loss")] == list(range(6))
    losses = [e.value for e in events.Scalars("epoch/loss")]
    assert losses == pytest.approx([r["loss"] for r in rows_of(tmp_path)])


def test_resume_count_is_carried_across_resumes(tiny_retrieval: DataBundle, tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        train(tiny_retrieval, tmp_path, epochs=3, progress=interrupt_at(4))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_retrieval, tmp_path, epochs=3, resume=True, progress=interrupt_at(7))
    _, summary = train(tiny_retrieval, tmp_path, epochs=3, resume=True)
    assert summary["resume_count"] == 2 and summary["epochs_done"] == 3
    _, fresh = train(tiny_retrieval, tmp_path / "fresh")
    assert fresh["resume_count"] == 0


@pytest.mark.parametrize("damage", ["truncated", "foreign", "other model"])
def test_unusable_checkpoint_is_one_line_naming_the_file(
    tiny_retrieval: DataBundle, tmp_path: Path, damage: str
) -> None:
    train(tiny_retrieval, tmp_path, epochs=1)
    path = tmp_path / "checkpoint.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        torch.save({**torch.load(path, weights_only=True), "model": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError) as info:
        train(tiny_retrieval, tmp_path, resume=True)
    message = str(info.value)
    assert str(path) in message and "trainer.overwrite=true" in message and "\n" not in message


def test_report_curves_show_the_validation_metrics() -> None:
    import pandas as pd

    from poolbench.report import plots

    curves = pd.DataFrame([{"epoch": 1, "loss": 1.0, "val.mAP": 0.5, "eval.mAP": 0.4}])
    assert plots.curve_quantities(curves) == ["loss", "eval.mAP", "val.mAP"]
    assert plots.metric_label("val.mAP") == "validation mAP"
