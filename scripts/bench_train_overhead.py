"""`poolbench train`'s training throughput vs a bare PyTorch loop (same model, data, batch, threads).

The framework side calls :func:`poolbench.engine.fit` (what `poolbench train` runs) for one epoch
of ``--steps`` steps and reads the steps/s it reports (its epoch loop: batch sampling, DataLoader,
loss, backward, Adam step, scheduler, NaN checks, progress callback), plus the wall-clock steps/s
of the whole ``fit`` call (that also writes a checkpoint and metrics.jsonl). The bare side is the
loop below: random P×K batches indexed straight from the same DataBundle, the same loss and the
same optimiser groups. Both sides alternate, ``--rounds`` times; each round gives one paired ratio.

Default config: smallcnn, synthwriters (1 × 64 × 64 patches), P×K = 16×4, Adam. Target ≥ 0.95.

    python scripts/bench_train_overhead.py [--threads 2] [--steps 30] [--rounds 4] [--pooling avg]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from poolbench import run
from poolbench.config import compose
from poolbench.engine import fit
from poolbench.engine.losses import batch_hard_triplet_loss
from poolbench.models import PoolNet

TARGET = 0.95


def bare_loop(
    model: PoolNet, train: torch.utils.data.Dataset, labels: torch.Tensor, cfg: DictConfig, steps: int
) -> tuple[float, float]:
    """Steps per wall-clock second and per CPU second of a plain loop: sample P writers × K items,
    stack, forward, loss, backward, Adam."""
    t = cfg.trainer
    groups = [{"params": model.backbone_parameters(), "weight_decay": t.weight_decay}]
    if model.global_pool_parameters():
        lr = t.lr * float(cfg.pooling.get("lr_mult", 1.0))
        groups.append({"params": model.global_pool_parameters(), "lr": lr, "weight_decay": 0.0})
    optimizer = torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)
    by_writer = [torch.nonzero(labels == w).flatten() for w in torch.unique(labels)]
    generator = torch.Generator().manual_seed(0)
    model.train()
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(steps):
        writers = torch.randperm(len(by_writer), generator=generator)[: t.writers_per_batch]
        index = torch.cat(
            [
                by_writer[w][torch.randperm(len(by_writer[w]), generator=generator)[: t.patches_per_writer]]
                for w in writers
            ]
        )
        items = [train[i] for i in index.tolist()]
        x = torch.stack([image for image, _ in items])
        y = torch.tensor([label for _, label in items])
        loss = batch_hard_triplet_loss(model(x), y, t.margin)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps / (time.perf_counter() - started), steps / (time.process_time() - cpu_started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--steps", type=int, default=30, help="train steps per side and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--pooling", default="avg")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = [f"pooling={args.pooling}", "trainer.epochs=1", f"trainer.steps_per_epoch={args.steps}", "device=cpu"]
    cfg = compose(overrides)
    device = torch.device("cpu")
    # The dataset and a model exactly as `poolbench train` builds them (seeded by cfg.seed).
    data = run._build(cfg, None).data

    def fresh_model() -> PoolNet:
        return run._build(cfg, None).model

    bare_model, framework_model = fresh_model(), fresh_model()
    print(
        f"{cfg.model.name} + {args.pooling} on {data.name} ({data.in_channels}x{data.input_size}x{data.input_size}), "
        f"P×K = {cfg.trainer.writers_per_batch}x{cfg.trainer.patches_per_writer}, {torch.get_num_threads()} threads, "
        f"{args.steps} steps per side and round, torch {torch.__version__}"
    )
    bare_loop(bare_model, data.train, data.train_labels, cfg, 3)  # warm-up (allocator, oneDNN primitives)
    ratios: dict[str, list[float]] = {"loop": [], "wall": [], "cpu": []}
    for round_ in range(args.rounds):
        bare, bare_cpu = bare_loop(bare_model, data.train, data.train_labels, cfg, args.steps)
        with tempfile.TemporaryDirectory() as run_dir:
            started, cpu_started = time.perf_counter(), time.process_time()
            summary = fit(
                framework_model,
                data,
                cfg.trainer,
                device=device,
                seed=int(cfg.seed) + round_,
                run_dir=Path(run_dir),
                pool_lr_mult=float(cfg.pooling.get("lr_mult", 1.0)),
            )
            wall = summary["train_steps"] / (time.perf_counter() - started)
            cpu = summary["train_steps"] / (time.process_time() - cpu_started)
        loop = float(summary["steps_per_s"])
        for key, value in (("loop", loop / bare), ("wall", wall / bare), ("cpu", cpu / bare_cpu)):
            ratios[key].append(value)
        print(
            f"round {round_ + 1}: steps/s bare {bare:.2f}, fit {loop:.2f} (its epoch loop), {wall:.2f} (whole call); "
            f"per CPU-second bare {bare_cpu:.2f}, fit {cpu:.2f}"
        )
    for key, label in (
        ("loop", "fit's reported steps/s / bare loop (wall clock)"),
        ("wall", "whole fit call incl. checkpoint / bare loop (wall clock)"),
        ("cpu", "steps per CPU-second, fit / bare loop (robust to other processes)"),
    ):
        values = ratios[key]
        print(
            f"{label}: {statistics.median(values):.3f} "
            f"(median of {len(values)} rounds, {min(values):.3f}–{max(values):.3f})"
        )
    ratio = statistics.median(ratios["loop"])
    print(f"  target >= {TARGET} (fit's reported steps/s): {'met' if ratio >= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
