"""Latency, memory, bandwidth and flops of pooling operators and of whole models with each pooling.

Two modes (side-by-side timing of completed runs is :mod:`poolbench.side_by_side`):

- :func:`bench_operators`: every global/local operator on given (B, C, H, W) inputs, ``forward``
  (eval mode, no autograd: inference) and ``forward+backward`` (train mode, gradients of the input
  and of the operator's parameters for a fixed random output gradient), each next to the best
  reference formulation of the same maths (``poolbench.pooling.reference.reference_for``).
- :func:`bench_models`: backbone × global pooling, ``inference`` and ``train step`` (forward, loss,
  backward, optimiser step).

How the numbers are taken: one timing, memory and cost stack, :mod:`poolbench.engine.latency`.
The compared variants are timed in rounds (each round times every variant once, shuffled), so a
load spike from other processes hits them alike; ratios are medians of per-round ratios. Peak
memory is measured in a separate untimed call (:func:`~poolbench.engine.memory.peak_memory_mb`).
Flops are forward flops (:func:`~poolbench.engine.flops.count_flops`).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import os
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from poolbench.engine.flops import count_flops, measure_cost
from poolbench.engine.latency import (
    interleaved_samples,
    median_iqr,
    paired_ratios,
    timing_warnings,  # noqa: F401  (operator and model modes' check, called by the CLI through bench)
    train_step_fn,
)
from poolbench.engine.memory import peak_memory_mb
from poolbench.engine.policies import build_optimizer, loss_name, lr_mults, resolve_device
from poolbench.errors import ConfigError, first_line, unknown_choice
from poolbench.pooling.reference import reference_for

Shape = tuple[int, int, int, int]
DEFAULT_SHAPES: tuple[Shape, ...] = ((32, 2048, 7, 7), (32, 2048, 24, 24), (64, 128, 8, 8))
QUICK_SHAPES: tuple[Shape, ...] = ((16, 256, 7, 7), (8, 128, 24, 24))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Pools that read every input value once and do almost no arithmetic: their speed is memory bandwidth.
MEMORY_BOUND = ("avg", "max", "sum")
BASELINE = "avg"
# The `copy` row of operator mode: what it is for.
COPY_NOTE = "a plain tensor copy of the input: the memory-bandwidth ceiling that GB/s (% copy) refers to"
# A variant keeps being sampled until it has MIN_SAMPLES samples and has used its time budget.
MIN_SAMPLES = 3
NOT_DIFFERENTIABLE = "output has no gradient: backward skipped"
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
        if budget_s is not None and not (math.isfinite(budget_s) and budget_s > 0):
            raise ConfigError(f"budget must be a number of seconds > 0, got {budget_s}")
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
    ratio_to_avg: float | None = None  # median per-round time ratio to avg of the same kind (interleaved)
    ratio_to_avg_ci: tuple[float, float] | None = None  # its 95% interval over the rounds
    ratio_to_reference: float | None = None  # median per-round time ratio to the reference formulation
    peak_mem_mb: float | None = None
    bandwidth_gb_s: float | None = None  # (bytes read + bytes written) / median time
    copy_bandwidth_gb_s: float | None = None
    flops: int | None = None  # forward flops of one call (operators) or of one image (models)
    params: int | None = None  # parameters of the operator (operators) or of the whole model (models)
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


def parse_batch(text: str) -> tuple[int, int]:
    """'16x4' -> (16, 4): writers x patches per writer, both >= 1; ConfigError on anything else."""
    try:
        writers, per_writer = (int(v) for v in text.lower().split("x"))
    except ValueError:
        writers = per_writer = 0
    if writers < 1 or per_writer < 1:
        raise ConfigError(f"bad --batch '{text}': expected PxK with P, K >= 1 (writers x patches), e.g. 16x4")
    return writers, per_writer


def memory_bytes(device: torch.device) -> int:
    """What one process may at most allocate on ``device``: the GPU's memory, or the machine's RAM."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(shape: Sequence[int], settings: BenchSettings, *, what: str = "input") -> None:
    """Refuse, before any work, an input whose one tensor alone cannot be held (a timed pass holds several,
    and a size past int64 overflows torch's storage computation)."""
    element = torch.empty((), dtype=settings.dtype).element_size()
    needed = math.prod(int(s) for s in shape) * max(element, 4)  # the reference formulations compute in fp32
    available = memory_bytes(settings.device)
    if needed > available:
        raise ConfigError(
            f"{what} {shape_str(shape)} needs {needed / 2**30:,.1f} GiB for one tensor, more than the "
            f"{available / 2**30:,.1f} GiB of {settings.device}; choose a smaller shape"
        )


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


def _make_operator(kind: str, name: str) -> nn.Module:
    from poolbench import pooling

    return pooling.from_config({"name": name}, kind)  # type: ignore[arg-type]


def sample_interleaved(
    fns: dict[Any, Callable[[], Any]], settings: BenchSettings
) -> tuple[dict[Any, list[float]], dict]:
    return interleaved_samples(
        fns, warmup=settings.warmup, rounds=settings.repeats, budget_s=settings.budget_s, min_samples=MIN_SAMPLES
    )


def _passes(
    fn: Callable[[torch.Tensor], torch.Tensor], params: Sequence[nn.Parameter], x: torch.Tensor
) -> tuple[Callable[[], Any], Callable[[], Any] | None]:
    """(forward fn, forward+backward fn or None when the output has no gradient) of ``fn`` on ``x``.

    forward+backward: gradients of x and of ``params`` for one fixed random output gradient.
    """

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return fn(x)

    x_grad = x.detach().requires_grad_(True)
    inputs = [x_grad, *(p for p in params if p.requires_grad)]
    with torch.enable_grad():
        train_out = fn(x_grad)
    if not train_out.requires_grad:
        return forward, None
    grad_out = torch.randn_like(train_out)

    def forward_backward() -> tuple[torch.Tensor | None, ...]:
        return torch.autograd.grad(fn(x_grad), inputs, grad_out, allow_unused=True)

    return forward, forward_backward


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
    was not asked for), a tensor copy as the bandwidth baseline, and each asked-for operator's
    reference formulation (when there is one) for ``ratio_to_reference``.
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


def _reference_fn(kind: str, name: str, module: nn.Module) -> tuple[Callable | None, str]:
    """The reference formulation of an operator and a note when there is none."""
    try:
        fn = reference_for(kind, name, module)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        return None, f"reference failed: {first_line(exc)}"
    return fn, "" if fn is not None else "no reference formulation"


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

    # Keys: (section, name) for rows; ("reference", kind, name) for the reference of (kind, name).
    forward_fns: dict[tuple, Callable[[], Any]] = {("baseline", "copy"): lambda: copy_out.copy_(x)}
    backward_fns: dict[tuple, Callable[[], Any]] = {}
    notes: dict[tuple, str] = {}
    out_numel: dict[tuple, int] = {("baseline", "copy"): x.numel()}
    notes[("baseline", "copy")] = COPY_NOTE
    cost: dict[tuple, tuple[int | None, int | None]] = {}
    setup_errors: dict[tuple, str] = {}
    built: list[nn.Module] = []
    for key in ops:
        kind, name = key
        try:
            module = (modules[key] if key in modules else _make_operator(kind, name)).to(device=device, dtype=dtype)
            module.eval()
            with torch.no_grad():
                out = module(x)  # materialises lazy parameters (netvlad) before they are listed
                flops = count_flops(lambda m=module: m(x))
            params = list(module.parameters())
            module.train()
            forward, forward_backward = _passes(module, params, x)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            setup_errors[key] = first_line(exc)
            continue
        built.append(module)
        cost[key] = (flops, sum(p.numel() for p in params))
        forward_fns[key] = forward
        out_numel[key] = out.numel()
        notes[key] = "" if key in requested else "ratio baseline"
        if forward_backward is not None:
            backward_fns[key] = forward_backward
        if key in requested:
            reference, reference_note = _reference_fn(kind, name, module)
            notes[key] = "; ".join(n for n in (notes[key], reference_note) if n)
            if reference is not None:
                ref_forward, ref_backward = _passes(reference, params, x)
                forward_fns[("reference", kind, name)] = ref_forward
                if ref_backward is not None:
                    backward_fns[("reference", kind, name)] = ref_backward

    rows: list[BenchRow] = []
    passes = [("forward", forward_fns)] + ([("forward+backward", backward_fns)] if backward else [])
    copy_bandwidth: float | None = None
    for pass_, fns in passes:
        for module in built:  # forward is inference (eval mode), forward+backward is training
            module.train(pass_ == "forward+backward")
        samples, errors = sample_interleaved(fns, settings)
        medians = {key: median_iqr(values)[0] for key, values in samples.items() if values}
        baseline = {kind: medians.get((kind, BASELINE)) for kind, _ in ops}
        if ("baseline", "copy") in medians:
            copy_bandwidth = 2 * x.numel() * x.element_size() / medians[("baseline", "copy")] / 1e6
        for key in fns:
            if key[0] == "reference":
                continue
            section, name = key
            row = base_row(section, name, pass_)
            row.note = errors.get(key) or notes.get(key, "")
            row.flops, row.params = cost.get(key, (None, None))
            if pass_ == "forward+backward":
                row.flops = None  # counted for the forward only
            if samples[key]:
                row.median_ms, row.iqr_ms = median_iqr(samples[key])
                row.samples = len(samples[key])
                row.images_per_s = shape[0] / row.median_ms * 1e3
                avg_samples = samples.get((section, BASELINE))
                if baseline.get(section) and avg_samples:  # per-round ratios: a load spike hits both alike
                    row.ratio_to_avg, row.ratio_to_avg_ci = paired_ratios(samples[key], avg_samples)
                reference = samples.get(("reference", section, name))
                if reference:
                    row.ratio_to_reference = paired_ratios(samples[key], reference)[0]
                elif ("reference", section, name) in errors:
                    failure = f"reference {errors[('reference', section, name)]}"
                    row.note = "; ".join(n for n in (row.note, failure) if n)
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
    """The complete node of the model option ``name`` with ``overrides``, checked against its schema."""
    from poolbench.models import resolve

    return resolve({"name": name, **overrides})[1]


def local_pooling_config(name: str) -> dict[str, Any]:
    """The config node of the local pool ``name`` (``none`` keeps the backbone's max-pools)."""
    from poolbench import pooling

    if name == "none":
        return {"name": "none"}
    try:
        return pooling.spec(name, "local").config_node()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def build_case(
    model_name: str,
    pooling: str,
    *,
    in_channels: int,
    input_size: int,
    local_pooling: str = "none",
    task: str = "retrieval",
    num_classes: int = CLASSIFICATION_CLASSES,
    model_overrides: dict[str, Any] | None = None,
    lr: float = 1e-3,
) -> ModelCase:
    """The model with Adam; the global and the local pools' parameters each in their own group
    (lr × their own lr_mult, no decay), as in training (:func:`~poolbench.engine.policies.build_optimizer`)."""
    from poolbench.models import build_model

    pool_cfg, local_cfg = pooling_config(pooling), local_pooling_config(local_pooling)
    net = build_model(
        model_config(model_name, **(model_overrides or {})),
        pool_cfg,
        local_cfg,
        in_channels=in_channels,
        input_size=input_size,
        num_classes=num_classes,
        task=task,
    )
    optimizer = build_optimizer(
        net,
        optimizer="adam",
        lr=lr,
        weight_decay=1e-5,
        **lr_mults(pool_cfg, local_cfg),
    )
    return ModelCase(model_name, pooling, net, optimizer, task, net.feature_map_size)


def model_step_fns(
    case: ModelCase, images: torch.Tensor, labels: torch.Tensor
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(inference, train step) closures: eval-mode no-grad forward; train-mode forward/loss/backward/step.

    The loss is the task's training loss: batch-hard triplet (retrieval) or cross-entropy.
    """

    def inference() -> torch.Tensor:
        case.net.eval()
        with torch.no_grad():
            return case.net(images)

    train_step = train_step_fn(case.net, images, labels, loss_name("auto", case.task), case.optimizer, None)
    return inference, train_step


def writer_batch(
    writers: int, per_writer: int, in_channels: int, size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random P×K batch: ``writers`` labels with ``per_writer`` images each (as retrieval training draws)."""
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(writers * per_writer, in_channels, size, size, device=device, generator=generator)
    labels = torch.arange(writers, device=device).repeat_interleave(per_writer)
    return images, labels


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
        costs = {p: measure_cost(case.net, images.shape[1:]) for p, case in cases.items()}
        fns = {p: model_step_fns(case, images, labels) for p, case in cases.items()}
        for index, pass_ in enumerate(("inference", "train step")):
            samples, errors = sample_interleaved({p: pair[index] for p, pair in fns.items()}, settings)
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
                    flops=costs[p]["flops_per_image"] if pass_ == "inference" else None,
                    params=costs[p]["params"],
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


def environment(settings: BenchSettings, warnings: Sequence[str] = ()) -> dict[str, Any]:
    from poolbench.environment import capture_env

    env = capture_env(str(settings.device))
    env.update(
        dtype=next(k for k, v in DTYPES.items() if v == settings.dtype),
        warmup=settings.warmup,
        repeats=settings.repeats,
        budget_s=settings.budget_s,
        timed_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        timing_warnings=list(warnings),
        reference="poolbench.pooling.reference.reference_for",
    )
    return env


def check_out_dir(out_dir: Path) -> Path:
    """The folder results go to, checked before anything is timed: a folder (created later if missing)
    that is not an existing file and is writable; ConfigError otherwise."""
    out_dir = Path(out_dir)
    existing = next((p for p in (out_dir, *out_dir.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise ConfigError(f"--out {out_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out_dir}: {existing} is not writable; choose another folder with --out")
    return out_dir


def _safe_component(text: str) -> str:
    """A file-name component from text that did not come from poolbench (host names, labels): no separators."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).strip("._") or "host"


def write_results(rows: Sequence[BenchRow], env: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """<out_dir>/<UTC timestamp>-<host>.csv and .json (rows plus environment); atomic writes, only inside out_dir."""
    from poolbench.files import atomic_write_json, atomic_write_text, json_safe

    out_dir = check_out_dir(out_dir)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    host = _safe_component(socket.gethostname())
    stem = f"{stamp}-{host}"
    suffix = 0
    while (out_dir / f"{stem}.json").exists():  # two runs in one second must not overwrite each other
        suffix += 1
        stem = f"{stamp}-{host}-{suffix}"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    records = [row_dict(row) for row in rows]
    writer.writerows(records)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    atomic_write_text(csv_path, buffer.getvalue())
    atomic_write_json(json_path, {"environment": env, "columns": list(COLUMNS), "rows": json_safe(records)})
    return csv_path, json_path
