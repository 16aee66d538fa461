"""Time DGMP's solvers side by side with avg pooling and the authors' formulation, in one process.

The authors' formulation (Christlein et al. 2019), re-implemented here for comparison only: the
batched N×N dual system solved with a general LU solve (``torch.linalg.solve``), λ a raw learnable
scalar, output L2-normalised. Each repeat runs every method once in turn (round robin), so load
from other processes on a shared machine hits all methods alike; median and interquartile range.

    python scripts/bench_dgmp_solvers.py --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from poolbench.pooling.gmp import SOLVERS, generalized_max_pool, resolve_solver

REFERENCE = "dgmp-dual"


def authors_dgmp(x: Tensor, lam: Tensor) -> Tensor:
    """Dual GMP with batched LU and L2 normalisation, as in the authors' layer (device-agnostic here)."""
    batch, channels, height, width = x.shape
    positions = height * width
    descriptors = x.reshape(batch, channels, positions).transpose(1, 2)  # (B, N, C)
    system = descriptors @ descriptors.transpose(1, 2) + lam * torch.eye(positions, device=x.device)
    alpha = torch.linalg.solve(system, torch.ones(batch, positions, 1, device=x.device))
    return F.normalize((alpha.transpose(1, 2) @ descriptors).reshape(batch, channels))


def methods(solvers: list[str]) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    table: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "avg": lambda x, lam: F.adaptive_avg_pool2d(x, 1).flatten(1),
    }
    for solver in solvers:
        table[f"dgmp-{solver}"] = lambda x, lam, s=solver: generalized_max_pool(x, lam, s, normalize=True)
    table["authors-lu"] = authors_dgmp
    return table


def run_once(fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, lam: Tensor, backward: bool) -> tuple[float, float]:
    """(wall, process CPU) seconds. CPU time is robust to other processes sharing the cores, and
    with one thread it is the compute time; with more it also counts threads spinning at barriers."""
    x.grad = lam.grad = None
    wall, cpu = time.perf_counter(), time.process_time()
    if backward:
        out = fn(x, lam)
        # A fixed random cotangent, like a loss's gradient.
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    else:
        with torch.no_grad():
            fn(x, lam)
    return time.perf_counter() - wall, time.process_time() - cpu


@contextlib.contextmanager
def silenced_output() -> Iterator[None]:
    """MKL prints one line per failing LU to the C-level stdout; keep the table readable."""
    sys.stdout.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    with open(os.devnull, "w") as devnull:
        for fd in (1, 2):
            os.dup2(devnull.fileno(), fd)
        try:
            yield
        finally:
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)


def summary(times: list[float]) -> tuple[float, float]:
    """Median and interquartile range, in milliseconds."""
    ms = sorted(t * 1e3 for t in times)
    if len(ms) < 2:
        return ms[0], 0.0
    quartiles = statistics.quantiles(ms, n=4, method="inclusive")
    return statistics.median(ms), quartiles[2] - quartiles[0]


def bench_shape(
    shape: tuple[int, int, int, int], table: dict[str, Callable[[Tensor, Tensor], Tensor]], args: argparse.Namespace
) -> None:
    generator = torch.Generator().manual_seed(0)
    # Post-ReLU-like features, as after ResNet's last block.
    x = torch.randn(shape, generator=generator).relu_().requires_grad_()
    lam = torch.tensor(args.lam, requires_grad=True)

    failures: dict[str, str] = {}
    outputs: dict[str, Tensor] = {}
    positions = shape[2] * shape[3]
    wrong_form = "dgmp-primal" if positions <= shape[1] else "dgmp-dual"
    if wrong_form in table and not args.all_forms:
        # The other form's system is the larger one here (e.g. 2048x2048 instead of 49x49).
        failures[wrong_form] = "skipped: the other form solves the smaller system here (--all-forms)"
    for name, fn in table.items():
        if name in failures:
            continue
        try:
            with torch.no_grad(), silenced_output():
                outputs[name] = fn(x, lam)
        except RuntimeError as error:
            failures[name] = str(error).strip().splitlines()[0][:90]
    live = [name for name in table if name not in failures]

    results: dict[tuple[str, bool], list[float]] = {(n, b): [] for n in live for b in (False, True)}
    cpu_fb: dict[str, list[float]] = {n: [] for n in live}
    for backward in (False, True):
        for _ in range(args.warmup):
            for name in live:
                run_once(table[name], x, lam, backward)
        for _ in range(args.repeats):
            for name in live:
                wall, cpu = run_once(table[name], x, lam, backward)
                results[name, backward].append(wall)
                if backward:
                    cpu_fb[name].append(cpu)

    print(
        f"\nB={shape[0]} C={shape[1]} {shape[2]}x{shape[3]} (N={positions}); "
        f"auto -> {resolve_solver('auto', shape[1], positions)[0]}; {args.repeats} repeats; wall median [IQR] ms, "
        "fwd+bwd process CPU median ms, ratios of wall medians, rel.err = max ‖ξ - ξ_ref‖/‖ξ_ref‖"
    )
    print(
        f"{'method':<12} {'forward':>18} {'fwd+bwd':>18} {'fb cpu':>8} {'fb x avg':>9} {'fb x authors':>13} "
        f"{'rel.err':>9}"
    )
    reference = outputs.get("authors-lu", outputs.get(REFERENCE))
    avg_fb = summary(results["avg", True])[0]
    authors_fb = summary(results["authors-lu", True])[0] if "authors-lu" in live else None
    for name in table:
        if name in failures:
            verdict = failures[name] if failures[name].startswith("skipped") else f"fails: {failures[name]}"
            print(f"{name:<12} {verdict}")
            continue
        fwd, fwd_iqr = summary(results[name, False])
        fb, fb_iqr = summary(results[name, True])
        vs_authors = f"{fb / authors_fb:.2f}" if authors_fb else "-"
        err = "-"
        if name != "avg" and reference is not None:
            rel = ((outputs[name] - reference).norm(dim=1) / reference.norm(dim=1)).max().item()
            err = f"{rel:.1e}" + ("" if rel <= 1e-4 else " FAIL")
        print(
            f"{name:<12} {fwd:>9.1f} [{fwd_iqr:>6.1f}] {fb:>9.1f} [{fb_iqr:>6.1f}] {summary(cpu_fb[name])[0]:>8.1f} "
            f"{fb / avg_fb:>9.1f} {vs_authors:>13} {err:>9}"
        )


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"shape must be BxCxHxW, got '{text}'")
    return parts  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=[(32, 2048, 7, 7), (32, 2048, 24, 24)])
    parser.add_argument("--solvers", nargs="+", choices=SOLVERS, default=["dual", "primal", "cg", "auto"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--lam", type=float, default=1000.0)
    parser.add_argument("--all-forms", action="store_true", help="also time primal for N <= C, dual for N > C")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    print(
        f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, lam={args.lam:g}, CPU"
    )
    table = methods(args.solvers)
    for shape in args.shapes:
        bench_shape(shape, table, args)


if __name__ == "__main__":
    main()
