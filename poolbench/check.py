"""The operator contract: what every built-in pooling passes, checked in seconds on any operator.

:func:`check` takes a registered name or a ``_target_`` class path; :func:`check_module` any factory
of modules. Each check is one :class:`CheckResult` (``poolbench check`` prints them as a table):

- output shape (global: (B, F) with F = ``out_features(C)`` when defined; local: MaxPool2d's size rule);
- dtype kept for float16 and bfloat16 inputs;
- finite outputs and gradients on a 1×1 map (local: one window), all zeros, negatives and ±1e4;
- float64 ``torch.autograd.gradcheck`` w.r.t. the input and every learnable parameter;
- batch independence: sample 0's output and gradient do not change with the other samples, and no
  gradient flows from sample 0's output into them (train and eval mode);
- eval-mode determinism; every learnable parameter receives a non-zero gradient;
- ``learned_scalars`` gives finite numbers; CUDA agrees with CPU (skipped without a GPU).

Random operators (stochastic, fractional pooling) are called under a fixed seed wherever two calls are
compared, so the checks test the maths, not the draws.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.autograd.gradcheck import GradcheckError

from poolbench import pooling
from poolbench.errors import ConfigError, first_line, unknown_choice
from poolbench.pooling.registry import Kind

Status = Literal["pass", "fail", "skip"]
CHANNELS = 3  # small, so gradcheck and lazy parameters stay cheap; one C for every check
BATCH = 3
GLOBAL_MAP = (5, 6)  # not square: an operator mixing up H and W shows in the shape check
LOCAL_MAP = (6, 7)
GRADCHECK_MAP = (4, 5)


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str

    @property
    def passed(self) -> bool:
        return self.status != "fail"


def operator_node(operator: str, params: Mapping[str, Any] = {}, kind: Kind | None = None) -> tuple[dict, Kind]:
    """The config node of ``operator`` (a registered name or a dotted class path) and its kind: the
    one given, else the registry's (global when a name is both), else local for a LocalPool subclass."""
    global_names, local_names = pooling.names(), pooling.local_names()
    if operator in global_names or operator in local_names:
        return {"name": operator, **params}, kind or ("global" if operator in global_names else "local")
    if "." not in operator:
        raise ConfigError(
            unknown_choice("operator", operator, sorted({*global_names, *local_names}))
            + ", or a class path such as mypkg.pools.MyPool"
        )
    cls = pooling.registry.target_class(operator, "operator")
    detected: Kind = "local" if issubclass(cls, pooling.LocalPool) else "global"
    return {"name": pooling.CUSTOM, "_target_": operator, **params}, kind or detected


def check(operator: str, params: Mapping[str, Any] = {}, *, kind: Kind | None = None) -> list[CheckResult]:
    """Run the contract on ``operator`` built with ``params`` (ConfigError for a bad name or parameter)."""
    node, kind = operator_node(operator, params, kind)
    pooling.from_config(node, kind)  # a bad parameter is the user's error, not a failed check
    return check_module(lambda: pooling.from_config(node, kind), kind)


@contextmanager
def _seeded(seed: int = 0) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _call(module: nn.Module, x: Tensor, seed: int = 0) -> Tensor:
    with _seeded(seed):
        return module(x)


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _learnable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


class _Contract:
    """The checks, sharing one materialised prototype that each check deep-copies."""

    def __init__(self, factory: Callable[[], nn.Module], kind: Kind) -> None:
        self.kind = kind
        self.prototype = factory()
        self.map = GLOBAL_MAP if kind == "global" else LOCAL_MAP
        with torch.no_grad():  # lazy parameters (netvlad) exist after one forward
            self.prototype.eval()(_randn(BATCH, CHANNELS, *self.map))
        self.prototype.train()

    def fresh(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return copy.deepcopy(self.prototype).to(dtype)

    def geometry(self) -> tuple[int, int, int] | None:
        m = self.prototype
        k, s, p = (getattr(m, a, None) for a in ("kernel_size", "stride", "padding"))
        return (k, s if s is not None else k, p or 0) if isinstance(k, int) else None

    def expected_shape(self, out: Tensor, x: Tensor) -> tuple[int, ...]:
        b, c, h, w = x.shape
        if self.kind == "global":
            width = getattr(self.prototype, "out_features", None)
            return (b, width(c) if callable(width) else out.shape[-1])
        geo = self.geometry()
        if geo is None:
            return (b, c, *out.shape[2:])
        k, s, p = geo
        return (b, c, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)

    # --------------------------------------------------------------------------------- the checks

    def shape(self) -> CheckResult:
        x = _randn(BATCH, CHANNELS, *self.map)
        out = _call(self.fresh().eval(), x)
        expected = self.expected_shape(out, x)
        detail = f"{tuple(x.shape)} -> {tuple(out.shape)}"
        if self.kind == "global" and callable(getattr(self.prototype, "out_features", None)):
            detail += f"; out_features({CHANNELS}) = {expected[1]}"
        ok = tuple(out.shape) == expected
        if not ok and self.kind == "local" and out.ndim == 4 and out.shape[:2] == x.shape[:2]:
            # A local pool may have its own size rule (fractional pooling): it must still downsample.
            ok = 1 <= out.shape[2] <= x.shape[2] and 1 <= out.shape[3] <= x.shape[3]
            return CheckResult(
                "output shape", "pass" if ok else "fail", f"{detail}; own size rule (MaxPool2d: {expected})"
            )
        return CheckResult("output shape", "pass" if ok else "fail", detail + ("" if ok else f"; expected {expected}"))

    def dtype(self, dtype: torch.dtype) -> CheckResult:
        name = f"dtype {str(dtype).removeprefix('torch.')}"
        out = _call(self.fresh(dtype).eval(), _randn(BATCH, CHANNELS, *self.map).to(dtype))
        ok = out.dtype == dtype
        return CheckResult(name, "pass" if ok else "fail", f"{dtype} in -> {out.dtype} out".replace("torch.", ""))

    def edge_inputs(self) -> list[tuple[str, Tensor]]:
        geo = self.geometry()
        one = (1, 1) if self.kind == "global" else (geo[0], geo[0]) if geo else (2, 2)
        base = _randn(BATCH, CHANNELS, *self.map)
        signs = torch.where(_randn(BATCH, CHANNELS, *self.map, seed=2) > 0, 1.0, -1.0)
        return [
            (
                "1x1 map" if self.kind == "global" else f"{one[0]}x{one[1]} map (one window)",
                _randn(BATCH, CHANNELS, *one),
            ),
            ("all-zero map", torch.zeros(BATCH, CHANNELS, *self.map)),
            ("negative map", -(base.abs() + 0.1)),
            ("±1e4 map", 1e4 * signs),
        ]

    def finite(self, label: str, x: Tensor) -> CheckResult:
        name = f"finite: {label}"
        module = self.fresh().train()
        x = x.clone().requires_grad_(True)
        try:
            out = _call(module, x)
        except ValueError as exc:
            if x.shape[2:] != self.map:  # refusing a map too small for it, with a reason, is within the contract
                return CheckResult(name, "pass", f"refused with {first_line(exc)}")
            raise
        problems = [] if torch.isfinite(out).all() else ["output"]
        if not out.requires_grad:
            return CheckResult(name, "fail", "output has no gradient (detached from the input)")
        (out * _randn(*out.shape, seed=3)).sum().backward()
        grads = [("input gradient", x.grad)] + [(f"grad of {n}", p.grad) for n, p in _learnable(module)]
        problems += [what for what, g in grads if g is not None and not torch.isfinite(g).all()]
        detail = "output and gradients finite" if not problems else "not finite: " + ", ".join(problems)
        return CheckResult(name, "fail" if problems else "pass", detail)

    def gradcheck(self) -> CheckResult:
        module = self.fresh(torch.float64).train()
        names = [n for n, _ in _learnable(module)]
        values = [p.detach().clone().requires_grad_(True) for _, p in _learnable(module)]
        x = _randn(2, CHANNELS, *GRADCHECK_MAP, dtype=torch.float64).requires_grad_(True)

        def fn(inp: Tensor, *params: Tensor) -> Tensor:
            with _seeded():
                return torch.func.functional_call(module, dict(zip(names, params, strict=True)), (inp,))

        count = x.numel() + sum(v.numel() for v in values)
        what = f"input{' + ' + ', '.join(names) if names else ''} ({count} values, float64)"
        with torch.no_grad():
            out_dtype = fn(x, *values).dtype
        if out_dtype != torch.float64:  # gradcheck's own message ("not of double precision") hides the cause
            return CheckResult(
                "gradcheck",
                "fail",
                f"{what}: the output is {str(out_dtype).removeprefix('torch.')} for a float64 input; the operator "
                "downcasts (a .float()/.half(), a tensor created without dtype=x.dtype), so no float64 gradient",
            )
        try:
            torch.autograd.gradcheck(fn, (x, *values), eps=1e-6, atol=1e-5, rtol=1e-3)
        except GradcheckError as exc:
            return CheckResult("gradcheck", "fail", f"{what}: {first_line(exc).removeprefix('GradcheckError: ')}")
        return CheckResult("gradcheck", "pass", what)

    def batch_independence(self) -> CheckResult:
        x = _randn(BATCH, CHANNELS, *self.map, dtype=torch.float64)  # NaNs compare equal: finiteness is checked above
        y = x.clone()
        y[1:] = _randn(BATCH - 1, CHANNELS, *self.map, dtype=torch.float64, seed=4)
        r = None
        for mode in ("train", "eval"):
            module = self.fresh(torch.float64).train(mode == "train")
            grads, outs = [], []
            for inp in (x, y):
                inp = inp.clone().requires_grad_(True)
                out = _call(module, inp)[0]
                r = _randn(*out.shape, dtype=torch.float64, seed=5) if r is None else r
                if out.requires_grad:
                    (out * r).sum().backward()
                    grads.append(inp.grad)
                outs.append(out.detach())
            if not torch.allclose(outs[0], outs[1], rtol=1e-9, atol=1e-12, equal_nan=True):
                return CheckResult("batch independence", "fail", f"{mode}: sample 0's output depends on samples 1..")
            if grads and grads[0][1:].abs().max() > 0:
                return CheckResult("batch independence", "fail", f"{mode}: sample 0's output has gradient on others")
            if grads and not torch.allclose(grads[0][0], grads[1][0], rtol=1e-9, atol=1e-12, equal_nan=True):
                return CheckResult("batch independence", "fail", f"{mode}: sample 0's gradient depends on samples 1..")
        return CheckResult("batch independence", "pass", "sample 0's output and gradient, train and eval")

    def eval_determinism(self) -> CheckResult:
        module = self.fresh().eval()
        x = _randn(BATCH, CHANNELS, *self.map)
        with torch.no_grad():
            first = module(x)
            torch.rand(1)  # move the global RNG: eval must not draw from it
            second = module(x)
        ok = torch.equal(first, second)
        return CheckResult(
            "eval determinism", "pass" if ok else "fail", "two eval forwards " + ("equal" if ok else "differ")
        )

    def parameters_learn(self) -> CheckResult:
        module = self.fresh().train()
        learnable = _learnable(module)
        if not learnable:
            return CheckResult("parameters get gradients", "pass", "no learnable parameters")
        out = _call(module, _randn(BATCH, CHANNELS, *self.map))
        if out.requires_grad:
            (out * _randn(*out.shape, seed=3)).sum().backward()
        dead = [n for n, p in learnable if p.grad is None or not p.grad.abs().max() > 0]
        detail = ", ".join(n for n, _ in learnable)
        if dead:
            return CheckResult("parameters get gradients", "fail", f"no gradient reaches: {', '.join(dead)}")
        return CheckResult("parameters get gradients", "pass", detail)

    def learned(self) -> CheckResult:
        values = pooling.learned_scalars(self.fresh())
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        detail = ", ".join(f"{k}={v:.4g}" for k, v in values.items()) or "none"
        return CheckResult("learned scalars", "fail" if bad else "pass", detail)

    def cuda(self) -> CheckResult:
        if not torch.cuda.is_available():
            return CheckResult("CUDA = CPU", "skip", "no CUDA device")
        cpu = self.fresh().eval()
        gpu = copy.deepcopy(cpu).cuda()
        x = _randn(BATCH, CHANNELS, *self.map)
        results = []
        for module, inp in ((cpu, x.clone()), (gpu, x.cuda())):
            inp.requires_grad_(True)
            out = module(inp)
            grads = []
            if out.requires_grad:
                (out * _randn(*out.shape, seed=3).to(out.device)).sum().backward()
                grads = [inp.grad] + [p.grad for _, p in _learnable(module) if p.grad is not None]
            results.append([out.detach().cpu(), *(g.cpu() for g in grads)])
        for a, b in zip(*results, strict=True):
            scale = max(1.0, float(a.abs().max()))
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4 * scale)
        return CheckResult("CUDA = CPU", "pass", f"output and {len(results[0]) - 1} gradients agree")

    def run(self) -> list[CheckResult]:
        steps: list[tuple[str, Callable[[], CheckResult]]] = [
            ("output shape", self.shape),
            ("dtype float16", lambda: self.dtype(torch.float16)),
            ("dtype bfloat16", lambda: self.dtype(torch.bfloat16)),
            *((f"finite: {label}", lambda label=label, x=x: self.finite(label, x)) for label, x in self.edge_inputs()),
            ("gradcheck", self.gradcheck),
            ("batch independence", self.batch_independence),
            ("eval determinism", self.eval_determinism),
            ("parameters get gradients", self.parameters_learn),
            ("learned scalars", self.learned),
            ("CUDA = CPU", self.cuda),
        ]
        results = []
        for name, step in steps:
            try:
                results.append(step())
            except Exception as exc:  # the operator raised: that check fails, the others still run
                results.append(CheckResult(name, "fail", first_line(exc)))
        return results


def check_module(factory: Callable[[], nn.Module], kind: Kind = "global") -> list[CheckResult]:
    """The contract checks of the modules ``factory`` builds (one row each; none raises)."""
    try:
        contract = _Contract(factory, kind)
    except Exception as exc:
        return [CheckResult("builds and runs", "fail", first_line(exc))]
    return contract.run()
