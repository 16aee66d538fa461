"""DGMP train step vs average-pooling train step, measured side by side in one process.

1. The default backbone as `poolbench train` builds it: smallcnn on synthwriters patches (1 × 64 × 64),
   a P×K = 16×4 batch, batch-hard triplet loss, Adam. Target: DGMP ≤ 1.15× avg.
2. ResNet-50 at the DGMP paper's CLaMM shape: 384² input, layer4 stride 1 (24×24 final map, C=2048),
   12-class cross-entropy. On a CPU only a small batch is practical (--resnet-batch, default 2).

The two poolings' train steps alternate call by call; the ratio reported is the median of the
per-pair ratios dgmp_i / avg_i with its interquartile range (the noise left after pairing).

    python scripts/bench_model_ratio.py [--threads 2] [--repeats 15] [--resnet-batch 2] [--skip-resnet50]
"""

from __future__ import annotations

import argparse
import math

import torch

from poolbench import bench
from poolbench.engine import latency

TARGET = 1.15


def compare(
    model: str,
    *,
    input_size: int,
    in_channels: int,
    writers: int,
    per_writer: int,
    task: str,
    settings: bench.BenchSettings,
    model_overrides: dict[str, object] | None = None,
) -> tuple[float, float, float, float, float]:
    """(dgmp median ms, avg median ms, paired ratio median, q1, q3) of the train step."""
    images, labels = bench.writer_batch(writers, per_writer, in_channels, input_size, settings.device)
    if task == "classification":
        labels = labels % bench.CLASSIFICATION_CLASSES
    steps = {}
    for pooling in ("avg", "dgmp"):
        torch.manual_seed(0)
        case = bench.build_case(
            model,
            pooling,
            in_channels=in_channels,
            input_size=input_size,
            task=task,
            model_overrides=model_overrides,
        )
        case.net.to(settings.device)
        steps[pooling] = bench.model_step_fns(case, images, labels)[1]
        map_h, map_w = case.feature_map
    samples, errors = bench.sample_interleaved(steps, settings)
    if errors:
        raise RuntimeError(f"{model}: {errors}")
    ratio, (q1, q3) = latency.paired_ratios(samples["dgmp"], samples["avg"])
    dgmp_ms, avg_ms = (latency.median_iqr(samples[p])[0] for p in ("dgmp", "avg"))
    print(
        f"{model:9s} input {images.shape[0]}x{in_channels}x{input_size}x{input_size} (final map {map_h}x{map_w}): "
        f"avg {avg_ms:.1f} ms, dgmp {dgmp_ms:.1f} ms per train step, "
        f"dgmp/avg = {ratio:.3f} (95% CI {q1:.3f}–{q3:.3f}, {len(samples['dgmp'])} pairs)"
    )
    return dgmp_ms, avg_ms, ratio, q1, q3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=15, help="train steps per pooling, smallcnn")
    parser.add_argument("--resnet-repeats", type=int, default=5, help="train steps per pooling, ResNet-50")
    parser.add_argument(
        "--resnet-batch", type=int, default=None, help="ResNet-50 batch (default: 2 on CPU, 28 on CUDA)"
    )
    parser.add_argument("--skip-resnet50", action="store_true")
    args = parser.parse_args()

    settings = bench.BenchSettings.make(
        device=args.device, threads=args.threads, warmup=3, repeats=args.repeats, budget_s=math.inf, memory=False
    )
    print(f"device {settings.device}, {settings.threads} torch threads, torch {torch.__version__}")
    *_, ratio, _, q3 = compare(
        "smallcnn", input_size=64, in_channels=1, writers=16, per_writer=4, task="retrieval", settings=settings
    )
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(f"  target dgmp/avg <= {TARGET} on the default backbone: {verdict}")
    if args.skip_resnet50:
        return
    batch = args.resnet_batch or (28 if settings.device.type == "cuda" else 2)
    resnet_settings = bench.BenchSettings.make(
        device=args.device, threads=args.threads, warmup=1, repeats=args.resnet_repeats, budget_s=math.inf, memory=False
    )
    # CLaMM batches are 28 single-class images; a batch of `batch` with labels 0..batch-1 times the same step.
    compare(
        "resnet50",
        input_size=384,
        in_channels=1,
        writers=batch,
        per_writer=1,
        task="classification",
        settings=resnet_settings,
        model_overrides={"last_stride": 1},
    )


if __name__ == "__main__":
    main()
