"""Latency, memory and bandwidth of pooling operators and of whole models with each pooling.

Two modes, both returning a list of :class:`BenchRow` (one table, :data:`COLUMNS`):

- :func:`bench_operators`: every global/local operator on given (B, C, H, W) inputs, ``forward``
  (eval mode, no autograd: inference) and ``forward+backward`` (train mode, gradients of the input
  and of the operator's parameters for a fixed random output gradient).
- :func:`bench_models`: backbone × global pooling, ``inference`` and ``train step`` (forward, loss,
  backward, optimiser step).

How the numbers are taken: the compared variants of one shape are interleaved (one call of each
in turn, repeated), so a load spike from other processes hits them alike; every sample is one call
timed by :func:`poolbench.engine.latency.time_fn` (CUDA synchronised) after warm-up; the table shows
the median and interquartile range of the samples. ``ratio_to_avg`` divides by the ``avg`` pool's
median from the same interleaved run. Peak memory is measured in a separate untimed call: on CUDA
``max_memory_allocated`` above the memory in use before the call; on CPU the peak of live tensor
bytes allocated during the call (every tensor an ATen op creates, tracked until it is freed; an
op's internal scratch buffers that never become tensors are not seen).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import socket
import statistics
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from poolbench.engine.policies import build_optimizer, loss_function, resolve_device
from poolbench.errors import ConfigError, unknown_choice

Shape = tuple[int, int, int, int]
DEFAULT_SHAPES: tuple[Shape, ...] = ((32, 2048, 7, 7), (32, 2048, 24, 24), (64, 128, 8, 8))
QUICK_SHAPES: tuple[Shape, ...] = ((16, 256, 7, 7), (8, 128, 24, 24))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Pools that read every input value once and do almost no arithmetic: their speed is memory bandwidth.
MEMORY_BOUND = ("avg", "max", "sum")
BASELINE = "avg"
# A variant keeps being sampled until it has MIN_SAMPLES samples and has used its time budget.
MIN_SAMPLES = 3
NOT_DIFFERENTIABLE = "output has no gradient: backward skipped"
TRIPLET_MARGIN = 0.1  # conf/trainer/default.yaml's margin
CLASSIFICATION_CLASSES = 12  # CLaMM's script classes


@dataclass
class BenchSettings:
    device: torch.device
    dtype: torch.dtype
    threads: int
    warmup: int = 3
    repeats: int = 20
    budget_s: float = 2.0  # per variant and pass: slow variants stop after MIN_SAMPLES samples past this
    memory: bool = True

    @classmethod
    def make(
        cls,
        *,
        device: str = "auto",
        dtype: str = "fp32",
        threads: int | None = None,
        quick: bool = False,
        warmup: int | None = None,
        repeats: int | None = None,
        budget_s: float | None = None,
        memory: bool = True,
    ) -> BenchSettings:
        """Validated settings; fixes torch's CPU thread count (``threads=None`` keeps the current one)."""
        if dtype not in DTYPES:
            raise ConfigError(unknown_choice("dtype", dtype, DTYPES))
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        for name, value, low in (("warmup", warmup, 0), ("repeats", repeats, 1)):
            if value is not None and value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        return cls(
            device=resolve_device(device),
            dtype=DTYPES[dtype],
            threads=torch.get_num_threads(),
            warmup=warmup if warmup is not None else (1 if quick else 3),
            repeats=repeats if repeats is not None else (5 if quick else 20),
            budget_s=budget_s if budget_s is not None else (0.3 if quick else 2.0),
            memory=memory,
        )


@dataclass
class BenchRow:
    section: str  # global | local | baseline | model
    name: str  # operator (or pooling of a model)
    model: str  # backbone in model mode, "-" otherwise
    shape: str  # BxCxHxW input
    dtype: str
    device: str
    threads: int
    pass_: str  # forward | forward+backward | inference | train step
    median_ms: float | None = None
    iqr_ms: float | None = None
    samples: int = 0
    images_per_s: float | None = None
    ratio_to_avg: float | None = None
    peak_mem_mb: float | None = None
    bandwidth_gb_s: float | None = None  # (bytes read + bytes written) / median time
    copy_bandwidth_gb_s: float | None = None
    note: str = ""


COLUMNS = tuple("pass" if f.name == "pass_" else f.name for f in fields(BenchRow))


def row_dict(row: BenchRow) -> dict[str, Any]:
    return {("pass" if k == "pass_" else k): v for k, v in asdict(row).items()}


def parse_shape(text: str) -> Shape:
    """'32,2048,7,7' (or 32x2048x7x7) -> (32, 2048, 7, 7); ConfigError on anything else."""
    parts = text.replace("x", ",").split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 1:
        raise ConfigError(f"bad shape '{text}': expected B,C,H,W as four positive integers, e.g. 32,2048,7,7")
    return values  # type: ignore[return-value]


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def select_operators(ops: Sequence[str] | None, kinds: Sequence[str]) -> list[tuple[str, str]]:
    """(kind, name) pairs to time: ``ops`` names (each in every selected kind that has it) or all."""
    from poolbench import pooling

    available = {"global": pooling.names(), "local": pooling.local_names()}
    if not ops:
        return [(kind, name) for kind in kinds for name in available[kind]]
    valid = sorted({name for kind in kinds for name in available[kind]})
    kinds_label = " or ".join(kinds)
    for name in ops:
        if name not in valid:
            raise ConfigError(unknown_choice(f"{kinds_label} pooling", name, valid))
    return [(kind, name) for kind in kinds for name in ops if name in available[kind]]


def _time_once(fn: Callable[[], Any], device: torch.device, warmup: int) -> float:
    from poolbench.engine.latency import time_fn

    return time_fn(fn, device=device, warmup=warmup, repeats=1).median_ms


def interleaved_samples(
    fns: dict[str, Callable[[], Any]], settings: BenchSettings
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Per-call times (ms) of each function, sampled in turn; and the error of each one that failed."""
    samples: dict[str, list[float]] = {key: [] for key in fns}
    errors: dict[str, str] = {}
    for key, fn in fns.items():
        try:
            _time_once(fn, settings.device, settings.warmup)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            errors[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    spent = dict.fromkeys(fns, 0.0)
    for _ in range(settings.repeats):
        for key, fn in fns.items():
            if key in errors or (len(samples[key]) >= MIN_SAMPLES and spent[key] > settings.budget_s):
                continue
            ms = _time_once(fn, settings.device, 0)
            samples[key].append(ms)
            spent[key] += ms / 1e3
    return samples, errors


def median_iqr(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], 0.0
    quartiles = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), quartiles[2] - quartiles[0]


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of CPU tensor storage created inside the ``with`` block and still alive."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:  # the default imports torch._dynamo (seconds) for nothing here
        return False

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [nbytes, tensors referring to it]

    def _release(self, ptr: int) -> None:
        entry = self._storages[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[ptr]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        input_ptrs = None
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0:
                continue
            entry = self._storages.get(ptr)
            if entry is None:
                if input_ptrs is None:  # views and in-place results share an input's storage: not new
                    input_ptrs = {
                        a.untyped_storage().data_ptr()
                        for a in tree_leaves((args, kwargs))
                        if isinstance(a, torch.Tensor)
                    }
                if ptr in input_ptrs:
                    continue
                entry = self._storages[ptr] = [storage.nbytes(), 0]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(tensor, self._release, ptr)
        return out


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory (MiB) one call of ``fn`` allocates beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    tracker = _LiveTensorBytes()
    with tracker:
        fn()
    return tracker.peak / 2**20


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _make_operator(kind: str, name: str) -> nn.Module:
    from poolbench import pooling

    return pooling.from_config({"name": name}, kind)  # type: ignore[arg-type]


def _passes(module: nn.Module, x: torch.Tensor) -> tuple[Callable[[], Any], Callable[[], Any] | None, torch.Tensor]:
    """(forward fn, forward+backward fn or None when the output has no gradient, output) of an operator."""

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    module.eval()
    out = forward()  # materialises lazy parameters (netvlad) before they are listed below
    module.train()
    x_grad = x.detach().requires_grad_(True)
    inputs = [x_grad, *(p for p in module.parameters() if p.requires_grad)]
    train_out = module(x_grad)
    if not train_out.requires_grad:
        return forward, None, out
    grad_out = torch.randn_like(train_out)

    def forward_backward() -> tuple[torch.Tensor | None, ...]:
        return torch.autograd.grad(module(x_grad), inputs, grad_out, allow_unused=True)

    return forward, forward_backward, out


def bench_operators(
    operators: Sequence[tuple[str, str]] | Sequence[tuple[str, str, nn.Module]],
    shapes: Iterable[Shape],
    settings: BenchSettings,
    *,
    backward: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """Time each (kind, name) operator on each shape; (kind, name, module) times a given module.

    The ``avg`` pool of each kind is always timed as the ratio baseline (marked in its note when it
    was not asked for), and a tensor copy as the bandwidth baseline.
    """
    requested = [(op[0], op[1]) for op in operators]
    modules = {(op[0], op[1]): op[2] for op in operators if len(op) == 3}
    ops = list(requested)
    for kind in dict.fromkeys(kind for kind, _ in requested):
        if (kind, BASELINE) not in ops:
            ops.insert(0, (kind, BASELINE))
    rows: list[BenchRow] = []
    for shape in shapes:
        if progress:
            progress(f"shape {shape_str(shape)}")
        rows.extend(_bench_shape(ops, set(requested), modules, shape, settings, backward))
    return rows


def _bench_shape(
    ops: list[tuple[str, str]],
    requested: set[tuple[str, str]],
    modules: dict[tuple[str, str], nn.Module],
    shape: Shape,
    settings: BenchSettings,
    backward: bool,
) -> list[BenchRow]:
    device, dtype = settings.device, settings.dtype
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype, generator=generator)
    copy_out = torch.empty_like(x)
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)

    def base_row(section: str, name: str, pass_: str) -> BenchRow:
        return BenchRow(section, name, "-", shape_str(shape), dtype_name, str(device), settings.threads, pass_)

    forward_fns: dict[tuple[str, str], Callable[[], Any]] = {("baseline", "copy"): lambda: copy_out.copy_(x)}
    backward_fns: dict[tuple[str, str], Callable[[], Any]] = {}
    notes: dict[tuple[str, str], str] = {}
    out_numel: dict[tuple[str, str], int] = {("baseline", "copy"): x.numel()}
    setup_errors: dict[tuple[str, str], str] = {}
    for key in ops:
        kind, name = key
        try:
            module = modules[key] if key in modules else _make_operator(kind, name)
            forward, forward_backward, out = _passes(module.to(device=device, dtype=dtype), x)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            setup_errors[key] = _first_line(exc)
            continue
        forward_fns[key] = forward
        out_numel[key] = out.numel()
        notes[key] = "" if key in requested else "ratio baseline"
        if forward_backward is not None:
            backward_fns[key] = forward_backward

    rows: list[BenchRow] = []
    passes = [("forward", forward_fns)] + ([("forward+backward", backward_fns)] if backward else [])
    copy_bandwidth: float | None = None
    for pass_, fns in passes:
        samples, errors = interleaved_samples(fns, settings)
        medians = {key: median_iqr(values)[0] for key, values in samples.items() if values}
        baseline = {kind: medians.get((kind, BASELINE)) for kind, _ in ops}
        if ("baseline", "copy") in medians:
            copy_bandwidth = 2 * x.numel() * x.element_size() / medians[("baseline", "copy")] / 1e6
        for key in fns:
            section, name = key
            row = base_row(section, name, pass_)
            row.note = errors.get(key) or notes.get(key, "")
            if samples[key]:
                row.median_ms, row.iqr_ms = median_iqr(samples[key])
                row.samples = len(samples[key])
                row.images_per_s = shape[0] / row.median_ms * 1e3
                if baseline.get(section):
                    row.ratio_to_avg = row.median_ms / baseline[section]
                if pass_ == "forward" and (name in MEMORY_BOUND or key == ("baseline", "copy")):
                    moved = (x.numel() + out_numel[key]) * x.element_size()
                    row.bandwidth_gb_s = moved / row.median_ms / 1e6
                    row.copy_bandwidth_gb_s = copy_bandwidth
                if settings.memory:
                    row.peak_mem_mb = peak_memory_mb(fns[key], device)
            rows.append(row)
        if pass_ == "forward+backward":
            for key in ops:
                if key in forward_fns and key not in backward_fns:
                    rows.append(base_row(key[0], key[1], pass_))
                    rows[-1].note = NOT_DIFFERENTIABLE
    for key, error in setup_errors.items():
        rows.append(base_row(key[0], key[1], "forward"))
        rows[-1].note = error
    return rows


# ----------------------------------------------------------------------------------------- models


@dataclass
class ModelCase:
    """A backbone with one global pooling, its optimiser and its task's loss, ready to time."""

    model_name: str
    pooling: str
    net: nn.Module
    optimizer: torch.optim.Optimizer
    task: str
    feature_map: tuple[int, int]


def pooling_config(name: str) -> dict[str, Any]:
    """The config node of the global pool ``name`` (its registered defaults and lr_mult)."""
    from poolbench import pooling

    try:
        return pooling.spec(name).config_node()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from poolbench.config import conf_dir, group_options

    options = group_options("model")
    if name not in options:
        raise ConfigError(unknown_choice("model", name, options))
    node = OmegaConf.to_container(OmegaConf.load(conf_dir() / "model" / f"{name}.yaml"), resolve=True)
    return {**node, **overrides}  # type: ignore[dict-item]


def build_case(
    model_name: str,
    pooling: str,
    *,
    in_channels: int,
    input_size: int,
    task: str = "retrieval",
    num_classes: int = CLASSIFICATION_CLASSES,
    model_overrides: dict[str, Any] | None = None,
    lr: float = 1e-3,
) -> ModelCase:
    """The model with Adam, pooling parameters in their own group (lr × lr_mult, no decay) as in training."""
    from poolbench.models import build_model

    pool_cfg = pooling_config(pooling)
    net = build_model(
        model_config(model_name, **(model_overrides or {})),
        pool_cfg,
        {"name": "none"},
        in_channels=in_channels,
        input_size=input_size,
        num_classes=num_classes,
        task=task,
    )
    optimizer = build_optimizer(
        net, optimizer="adam", lr=lr, weight_decay=1e-5, pool_lr_mult=float(pool_cfg.get("lr_mult", 1.0))
    )
    return ModelCase(model_name, pooling, net, optimizer, task, net.feature_map_size)


def model_step_fns(
    case: ModelCase, images: torch.Tensor, labels: torch.Tensor
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(inference, train step) closures: eval-mode no-grad forward; train-mode forward/loss/backward/step.

    The loss is the task's training loss: batch-hard triplet (retrieval) or cross-entropy.
    """
    loss_fn = loss_function("auto", case.task)

    def inference() -> torch.Tensor:
        case.net.eval()
        with torch.no_grad():
            return case.net(images)

    def train_step() -> torch.Tensor:
        case.net.train()
        case.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(case.net(images), labels, TRIPLET_MARGIN)
        loss.backward()
        case.optimizer.step()
        return loss

    return inference, train_step


def writer_batch(
    writers: int, per_writer: int, in_channels: int, size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random P×K batch: ``writers`` labels with ``per_writer`` images each (as retrieval training draws)."""
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(writers * per_writer, in_channels, size, size, device=device, generator=generator)
    labels = torch.arange(writers, device=device).repeat_interleave(per_writer)
    return images, labels


def paired_ratios(samples: Sequence[float], baseline: Sequence[float]) -> tuple[float, float, float]:
    """Median, first and third quartile of sample_i / baseline_i over interleaved pairs.

    Pairs were taken moments apart, so load from other processes mostly cancels in each ratio;
    the quartiles state the noise that is left.
    """
    ratios = [a / b for a, b in zip(samples, baseline, strict=False)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, q1, q3


def bench_models(
    model_names: Sequence[str],
    poolings: Sequence[str],
    settings: BenchSettings,
    *,
    input_size: int = 64,
    in_channels: int = 1,
    writers: int = 16,
    per_writer: int = 4,
    task: str = "retrieval",
    model_overrides: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """Backbone × pooling: inference and train step on one random P×K batch, poolings interleaved.

    Retrieval (the default dataset's setting): embedding head and batch-hard triplet loss;
    classification: linear head and cross-entropy. Adam in both.
    """
    if settings.dtype != torch.float32:
        raise ConfigError("model mode times fp32 models only (bf16 training uses autocast: trainer.amp=bf16)")
    poolings = list(dict.fromkeys([BASELINE, *poolings]))
    images, labels = writer_batch(writers, per_writer, in_channels, input_size, settings.device)
    if task == "classification":
        labels = labels % CLASSIFICATION_CLASSES
    rows: list[BenchRow] = []
    for model_name in model_names:
        if progress:
            progress(f"model {model_name}")
        torch.manual_seed(0)
        cases = {
            p: build_case(
                model_name,
                p,
                in_channels=in_channels,
                input_size=input_size,
                task=task,
                model_overrides=model_overrides,
            )
            for p in poolings
        }
        for case in cases.values():
            case.net.to(settings.device)
        fns = {p: model_step_fns(case, images, labels) for p, case in cases.items()}
        for index, pass_ in enumerate(("inference", "train step")):
            samples, errors = interleaved_samples({p: pair[index] for p, pair in fns.items()}, settings)
            for p, case in cases.items():
                height, width = case.feature_map
                row = BenchRow(
                    "model",
                    p,
                    model_name,
                    shape_str(images.shape),
                    "fp32",
                    str(settings.device),
                    settings.threads,
                    pass_,
                    note=errors.get(p, f"feature map {height}x{width}"),
                )
                if samples[p]:
                    row.median_ms, row.iqr_ms = median_iqr(samples[p])
                    row.samples = len(samples[p])
                    row.images_per_s = images.shape[0] / row.median_ms * 1e3
                    if samples[BASELINE]:
                        row.ratio_to_avg = row.median_ms / median_iqr(samples[BASELINE])[0]
                    if settings.memory:
                        row.peak_mem_mb = peak_memory_mb(fns[p][index], settings.device)
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- results


def environment(settings: BenchSettings) -> dict[str, Any]:
    from poolbench.environment import capture_env

    env = capture_env(str(settings.device))
    env.update(
        dtype=next(k for k, v in DTYPES.items() if v == settings.dtype),
        warmup=settings.warmup,
        repeats=settings.repeats,
        budget_s=settings.budget_s,
        timed_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    return env


def write_results(rows: Sequence[BenchRow], env: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """results/bench/<UTC timestamp>-<host>.csv and .json (rows plus environment); atomic writes."""
    from poolbench.files import atomic_write_json, atomic_write_text

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = f"{stamp}-{socket.gethostname()}"
    suffix = 0
    while (out_dir / f"{stem}.json").exists():  # two runs in one second must not overwrite each other
        suffix += 1
        stem = f"{stamp}-{socket.gethostname()}-{suffix}"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    records = [row_dict(row) for row in rows]
    writer.writerows(records)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    atomic_write_text(csv_path, buffer.getvalue())
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in records]
    atomic_write_json(json_path, {"environment": env, "columns": list(COLUMNS), "rows": clean})
    return csv_path, json_path
