from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from poolbench.data.base import DataBundle
from poolbench.engine import NonFiniteLossError, fit, seed_everything
from poolbench.engine.losses import batch_hard_triplet_loss
from poolbench.engine.samplers import PKBatchSampler, RandomBatchSampler
from poolbench.errors import ConfigError
from poolbench.models import PoolNet, build_model

SMALL = {"name": "smallcnn", "width": 4, "depth": 2, "embedding_dim": 8}
TRAINER = {
    "epochs": 2,
    "steps_per_epoch": 3,
    "writers_per_batch": 3,
    "patches_per_writer": 4,
    "batch_size": 8,
    "lr": 1e-2,
    "deterministic": True,
}


def small_model(data: DataBundle, pooling: str = "avg", seed: int = 0) -> PoolNet:
    seed_everything(seed)
    return build_model(
        SMALL,
        {"name": pooling, "lr_mult": 1.0},
        {"name": "none"},
        in_channels=data.in_channels,
        input_size=data.input_size,
        num_classes=data.num_classes,
        task=data.task,
    )


def train(
    data: DataBundle,
    run_dir: Path,
    progress: Callable[[str, int, int], None] | None = None,
    resume: bool = False,
    pooling: str = "avg",
    **overrides: object,
) -> tuple[PoolNet, dict]:
    model = small_model(data, pooling)
    cfg = {**TRAINER, **overrides}
    summary = fit(
        model, data, cfg, device=torch.device("cpu"), seed=0, run_dir=run_dir, pool_lr_mult=10.0, progress=progress,
        resume=resume,
    )
    return model, summary


def test_batch_hard_triplet_loss_by_hand() -> None:
    # 1-d embeddings 0, 1 (writer 0) and 3, 10 (writer 1); squared distances:
    # anchor 0: pos 1, neg min(9, 100) = 9  → relu(1 − 9 + 2) = 0
    # anchor 1: pos 1, neg min(4, 81) = 4   → relu(1 − 4 + 2) = 0
    # anchor 3: pos 49, neg min(9, 4) = 4   → relu(49 − 4 + 2) = 47
    # anchor 10: pos 49, neg min(100, 81)=81 → relu(49 − 81 + 2) = 0      mean = 47 / 4
    x = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    loss = batch_hard_triplet_loss(x, torch.tensor([0, 0, 1, 1]), margin=2.0)
    assert loss.item() == pytest.approx(47 / 4)
    with pytest.raises(ValueError, match="at least two items"):
        batch_hard_triplet_loss(x, torch.tensor([0, 1, 2, 3]), margin=0.1)


def test_pk_sampler_draws_p_writers_times_k_patches() -> None:
    labels = torch.tensor([0] * 5 + [1] * 2 + [2] * 4)
    sampler = PKBatchSampler(labels, 2, 3, num_batches=20, generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == 20
    for batch in batches:
        chosen = labels[batch]
        assert len(batch) == 6 and len(set(chosen.tolist())) == 2
        assert all((chosen == c).sum() == 3 for c in set(chosen.tolist()))
    again = list(PKBatchSampler(labels, 2, 3, num_batches=20, generator=torch.Generator().manual_seed(0)))
    assert again == batches
    with pytest.raises(ConfigError, match="only 3 writers"):
        PKBatchSampler(labels, 4, 3, 1, torch.Generator())


def test_random_batch_sampler_chains_permutations() -> None:
    batches = list(RandomBatchSampler(5, 2, num_batches=5, generator=torch.Generator().manual_seed(0)))
    flat = [i for b in batches for i in b]
    assert all(len(b) == 2 for b in batches)
    assert sorted(flat[:5]) == list(range(5))  # the first 5 items are one full permutation


def test_fit_writes_checkpoint_and_metrics(tiny_retrieval: DataBundle, tmp_path: Path) -> None:
    (tmp_path / ".checkpoint.pt.abc.tmp").write_bytes(b"half a checkpoint from a killed run")
    _, summary = train(tiny_retrieval, tmp_path)
    assert not torch.are_deterministic_algorithms_enabled()  # global flag restored after training
    assert summary["epochs_done"] == 2 and summary["train_steps"] == 6 and summary["resumed_from_epoch"] == 0
    assert summary["steps_per_s"] > 0 and summary["train_loss"] >= 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(rows[0]) == {"epoch", "loss", "lr", "seconds", "steps"}
    assert rows[1]["lr"] < rows[0]["lr"]  # cosine decay
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert not list(tmp_path.glob(".*.tmp"))


def interrupt_at(step: int) -> Callable[[str, int, int], None]:
    def progress(_: str, done: int, total: int) -> None:
        if done == step:
            raise KeyboardInterrupt

    return progress


def test_resume_after_interruption_matches_uninterrupted_run(tiny_retrieval: DataBundle, tmp_path: Path) -> None:
    full, _ = train(tiny_retrieval, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):  # killed during step 2 of epoch 2 (global step 5)
        train(tiny_retrieval, tmp_path / "cut", progress=interrupt_at(5))
    resumed, summary = train(tiny_retrieval, tmp_path / "cut", resume=True)
    assert summary["resumed_from_epoch"] == 1 and summary["epochs_done"] == 2
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    cut = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    uninterrupted = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in cut] == [1, 2]  # no duplicated epoch line
    assert [(r["loss"], r["lr"]) for r in cut] == [(r["loss"], r["lr"]) for r in uninterrupted]


def test_resume_of_finished_training_returns_immediately(tiny_retrieval: DataBundle, tmp_path: Path) -> None:
    trained, _ = train(tiny_retrieval, tmp_path)
    again, summary = train(tiny_retrieval, tmp_path, resume=True)
    assert summary["resumed_from_epoch"] == 2 and summary["epochs_done"] == 2
    pairs = zip(trained.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_pool_parameters_get_their_own_group(tiny_retrieval: DataBundle, tmp_path: Path) -> None:
    model, _ = train(tiny_retrieval, tmp_path)
    gem = small_model(tiny_retrieval, "gem")
    p_before = gem.pool.p.detach().clone()
    fit(gem, tiny_retrieval, {**TRAINER, "epochs": 1}, device=torch.device("cpu"), seed=0, run_dir=tmp_path / "g",
        pool_lr_mult=100.0)
    assert not torch.equal(gem.pool.p, p_before)
    state = torch.load(tmp_path / "g" / "checkpoint.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0 and groups[1]["initial_lr"] == pytest.approx(1.0)


class NaNPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * float("nan")


def test_nan_loss_raises_with_epoch_and_step(tiny_retrieval: DataBundle, tmp_path: Path) -> None:
    model = small_model(tiny_retrieval)
    model.pool = NaNPool()
    with pytest.raises(NonFiniteLossError) as info:
        fit(model, tiny_retrieval, TRAINER, device=torch.device("cpu"), seed=0, run_dir=tmp_path, pool_lr_mult=1.0)
    assert (info.value.epoch, info.value.step) == (1, 1)
    assert "epoch 1, step 1" in str(info.value)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_keyboard_interrupt_propagates_and_keeps_checkpoint(tiny_retrieval: DataBundle, tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        train(tiny_retrieval, tmp_path, epochs=3, progress=interrupt_at(4))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(KeyboardInterrupt):  # interrupted again, in the first step after resuming
        train(tiny_retrieval, tmp_path, epochs=3, resume=True, progress=interrupt_at(4))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_classification_with_sgd_and_exponential_decay(tiny_classification: DataBundle, tmp_path: Path) -> None:
    messages: list[str] = []
    model = small_model(tiny_classification)
    cfg = {**TRAINER, "optimizer": "sgd", "scheduler": "exponential", "gamma": 0.5, "decay_start_epoch": 1,
           "epochs": 3, "steps_per_epoch": None, "grad_clip": 1.0}
    summary = fit(model, tiny_classification, cfg, device=torch.device("cpu"), seed=0, run_dir=tmp_path,
                  pool_lr_mult=1.0, log=messages.append)
    assert summary["train_steps"] == 3 * (32 // 8)  # null steps_per_epoch = one pass
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-2, 1e-2, 5e-3])  # constant up to decay_start_epoch, then × gamma
    assert len(messages) == 3 and messages[0].startswith("epoch 1/3")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"optimizer": "adamm"}, "unknown trainer.optimizer 'adamm'. Did you mean 'adam'"),
        ({"loss": "ce"}, "does not fit a retrieval dataset"),
        ({"writers_per_batch": 7}, "only 6 writers"),
        ({"patches_per_writer": 1}, "patches_per_writer must be an integer >= 2"),
    ],
)
def test_bad_trainer_settings(tiny_retrieval: DataBundle, tmp_path: Path, override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train(tiny_retrieval, tmp_path, **override)
