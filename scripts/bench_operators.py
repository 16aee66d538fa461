"""Every registered operator against the best known formulation of its maths, side by side in one process.

For each operator: poolbench's module, its reference (``poolbench.pooling.reference.reference_for``:
timm / cirtorch / the authors' formulations / native torch pools) and, for local operators, the
native max pool (the ≤ 3× target for operators without a native twin). Each round runs every
variant once in turn (interleaved), so load from other processes hits them alike; the table shows
the median over rounds of the per-round ratio op / reference with its quartiles, for the forward
(eval, no_grad) and forward+backward (train mode; gradients of the input and of the operator's
parameters for a fixed random output gradient). Peak memory: live CPU tensor bytes allocated during
one forward+backward (``poolbench.engine.memory.peak_memory_mb``), op / reference.

    python scripts/bench_operators.py --kind local --shape 32x64x112x112 --threads 2 --rounds 5
    python scripts/bench_operators.py --kind global --shape 32x2048x7x7 --threads 1 --rounds 15
    python scripts/bench_operators.py --kind local --ops softpool lpnorm max --threads 2 --contention 2

``--contention N`` starts a competing process that keeps N threads busy (another PyTorch job doing
matrix products, as on a shared workstation or node) for the whole measurement, and stops it at the
end (also on Ctrl-C). Targets (issue 22): under a 2-thread competitor every operator's fwd+bwd ratio
to its fastest public formulation stays <= 1.2x (<= 1.5x where that formulation is numerically
unsafe), and the quiet-machine ratios do not regress.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poolbench import pooling
from poolbench.engine.memory import peak_memory_mb
from poolbench.pooling.reference import reference_for

Fn = Callable[[Tensor], Tensor]


def _forward(fn: Fn, x: Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return fn(x)

    return run


def _forward_backward(fn: Fn, x: Tensor, params: list[nn.Parameter]) -> Callable[[], object] | None:
    x = x.detach().requires_grad_()
    out = fn(x)
    if not out.requires_grad:
        return None
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)

    def run() -> object:
        return torch.autograd.grad(fn(x), [x, *params], grad_out, allow_unused=True)

    return run


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def _make(kind: str, name: str, geometry: tuple[int, int, int]) -> nn.Module:
    if kind == "global":
        return pooling.create(name)
    kernel, stride, padding = geometry
    return pooling.create_local(name, kernel_size=kernel, stride=stride, padding=padding)


def bench(kind: str, names: list[str], shape: tuple[int, ...], geometry: tuple[int, int, int], rounds: int) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 0.5  # mostly positive, some negative
    kernel, stride, padding = geometry
    print(
        f"| {kind} op | vs | fwd ratio [q1, q3] | fwd ms op / vs | fwd+bwd ratio [q1, q3] | fwd+bwd ms op / vs "
        "| peak mem op / vs (MiB) |"
    )
    print("|---|---|--:|--:|--:|--:|--:|")
    for name in names:
        module = _make(kind, name, geometry)
        with torch.no_grad():
            module.eval()(x)  # materialises lazy parameters (netvlad)
        params = [p for p in module.parameters() if p.requires_grad]
        variants: dict[str, Fn] = {"op": module}
        reference = reference_for(kind, name, module)
        if reference is not None:
            variants["reference"] = reference
        if kind == "local" and name != "max":
            variants["native max"] = lambda t: F.max_pool2d(t, kernel, stride, padding)
        passes = {}
        for key, fn in variants.items():
            passes[key, "fwd"] = _forward(fn, x)
            module.train()
            passes[key, "fwdbwd"] = _forward_backward(fn, x, params)
            module.eval()
        times: dict[tuple[str, str], list[float]] = {key: [] for key, fn in passes.items() if fn is not None}
        for run in (fn for fn in passes.values() if fn is not None):  # warm-up
            run()
        for _ in range(rounds):
            for key in times:
                module.train(key[1] == "fwdbwd")
                times[key].append(_seconds(passes[key]))  # type: ignore[arg-type]
        module.train()
        memory = {
            key: peak_memory_mb(passes[key, "fwdbwd"], torch.device("cpu"))  # type: ignore[arg-type]
            for key in variants
            if passes[key, "fwdbwd"] is not None
        }
        for other in variants:
            if other == "op":
                continue
            cells = []
            for mode in ("fwd", "fwdbwd"):
                if ("op", mode) not in times or (other, mode) not in times:
                    cells += ["–", "–"]
                    continue
                ratios = [a / b for a, b in zip(times["op", mode], times[other, mode], strict=True)]
                q1, median, q3 = _quartiles(ratios)
                ms_op = statistics.median(times["op", mode]) * 1e3
                ms_other = statistics.median(times[other, mode]) * 1e3
                cells += [f"{median:.2f} [{q1:.2f}, {q3:.2f}]", f"{ms_op:.1f} / {ms_other:.1f}"]
            mem = f"{memory['op']:.0f} / {memory[other]:.0f}" if "op" in memory and other in memory else "–"
            print(f"| {name} | {other} | {' | '.join(cells)} | {mem} |", flush=True)


# The competitor: N threads of float32 matrix products, forever (killed by the parent).
_LOAD = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.rand(768, 768)
print("ready", flush=True)
while True:
    a = torch.tanh(a @ a)
"""


@contextlib.contextmanager
def contention(threads: int) -> Iterator[None]:
    """A competing process keeping ``threads`` threads busy while the block runs (nothing when 0)."""
    if threads <= 0:
        yield
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    # SIGTERM (timeout, kill, a closed terminal) unwinds through the `finally` below like Ctrl-C, so the
    # competing process never outlives the benchmark.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    load = subprocess.Popen(
        [sys.executable, "-c", _LOAD, str(threads)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert load.stdout is not None
        load.stdout.readline()  # "ready": torch imported and the loop about to start
        time.sleep(2.0)  # let the scheduler see it as a steady load
        yield
    finally:
        load.terminate()
        try:
            load.wait(timeout=10)
        except subprocess.TimeoutExpired:
            load.kill()
            load.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("global", "local"), default="local")
    parser.add_argument("--shape", default=None, help="BxCxHxW (default 32x64x112x112 local, 32x2048x7x7 global)")
    parser.add_argument("--geometry", default="3,2,1", help="local kernel,stride,padding (default 3,2,1)")
    parser.add_argument("--ops", nargs="*", help="operator names (default: every registered one)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--contention", type=int, default=0, metavar="N", help="run a competing N-thread process meanwhile (default 0)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default_shape = "32x64x112x112" if args.kind == "local" else "32x2048x7x7"
    shape = tuple(int(v) for v in (args.shape or default_shape).lower().split("x"))
    geometry = tuple(int(v) for v in args.geometry.split(","))
    names = args.ops or (pooling.local_names() if args.kind == "local" else pooling.names())
    cpu = platform.processor() or platform.machine()
    geometry_text = f", k,s,p = {args.geometry}" if args.kind == "local" else ""
    competing = f", a competing {args.contention}-thread process" if args.contention else ", no competing load"
    with contention(args.contention):
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {cpu}, "
            f"shape {'x'.join(map(str, shape))}{geometry_text}, {args.rounds} rounds{competing}, "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        bench(args.kind, names, shape, geometry, args.rounds)  # type: ignore[arg-type]
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
