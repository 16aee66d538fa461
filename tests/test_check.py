"""The operator contract (`poolbench check`): every built-in passes it, broken operators are caught."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from poolbench import check, pooling


def _failed(results: list[check.CheckResult]) -> dict[str, str]:
    return {r.name: r.detail for r in results if r.status == "fail"}


@pytest.mark.parametrize(
    ("kind", "name"), [(kind, s.name) for kind in ("global", "local") for s in pooling.specs(kind)]
)
def test_every_builtin_passes_the_contract(kind: str, name: str) -> None:
    results = check.check(name, kind=kind)  # type: ignore[arg-type]
    assert not _failed(results), _failed(results)
    names = {r.name for r in results}
    assert {"output shape", "dtype float16", "dtype bfloat16", "gradcheck", "batch independence"} <= names
    assert {"eval determinism", "parameters get gradients", "CUDA = CPU"} <= names
    assert sum(r.name.startswith("finite: ") for r in results) == 4


class MixesBatch(pooling.GlobalPool):
    """Subtracts the batch mean: sample i's output depends on sample j (a BatchNorm-like bug)."""

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean((2, 3))
        return pooled - pooled.mean(0, keepdim=True)


class Float32Out(pooling.GlobalPool):
    """Computes in float32 and forgets to cast back."""

    def forward(self, x: Tensor) -> Tensor:
        return x.float().mean((2, 3))


class NanGradOnZeros(pooling.GlobalPool):
    """sqrt-pooling masked at zero: the output is finite, but the gradient is 0·∞ = NaN there."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x > 0, x.sqrt(), torch.zeros_like(x)).mean((2, 3))


class DeadParameter(pooling.GlobalPool):
    """Declares a learnable exponent and never uses it."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(3.0))

    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3))


class WrongWidth(pooling.GlobalPool):
    """Claims F = 2C but returns C."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3))

    def out_features(self, channels: int) -> int:
        return 2 * channels


class RandomInEval(pooling.GlobalPool):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3)) + 0.01 * torch.rand_like(x[:, :, 0, 0])


class WrongGradient(pooling.GlobalPool):
    """A custom autograd function whose backward is off by a factor of two."""

    class _Mean(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
            ctx.shape = x.shape
            return x.mean((2, 3))

        @staticmethod
        def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
            h, w = ctx.shape[2:]
            return 2 * grad[:, :, None, None].expand(ctx.shape) / (h * w)

    def forward(self, x: Tensor) -> Tensor:
        return self._Mean.apply(x)


@pytest.mark.parametrize(
    ("operator", "caught_by"),
    [
        (MixesBatch, "batch independence"),
        (Float32Out, "dtype float16"),
        (NanGradOnZeros, "finite: all-zero map"),
        (DeadParameter, "parameters get gradients"),
        (WrongWidth, "output shape"),
        (RandomInEval, "eval determinism"),
        (WrongGradient, "gradcheck"),
    ],
)
def test_broken_operators_are_caught(operator: Callable[[], nn.Module], caught_by: str) -> None:
    failed = _failed(check.check_module(operator, "global"))
    assert caught_by in failed, failed


def test_a_local_pool_mixing_channels_is_caught() -> None:
    class ChannelMix(pooling.LocalPool):
        def forward(self, x: Tensor) -> Tensor:
            return nn.functional.max_pool2d(x, self.kernel_size, self.stride)[:, :1]

    assert "output shape" in _failed(check.check_module(ChannelMix, "local"))


@pytest.fixture
def broken_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module holding a broken operator and a good one, for `_target_` paths."""
    (tmp_path / "brokenpools.py").write_text(
        textwrap.dedent(
            """
            import torch
            from poolbench.pooling import GlobalPool

            class MixesBatch(GlobalPool):
                def forward(self, x):
                    pooled = x.mean((2, 3))
                    return pooled - pooled.mean(0, keepdim=True)

            class Fine(GlobalPool):
                def __init__(self, scale: float = 1.0):
                    super().__init__()
                    self.scale = scale

                def forward(self, x):
                    return self.scale * x.amax((2, 3))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "brokenpools"
    sys.modules.pop("brokenpools", None)


def test_cli_exit_codes(run_cli: Callable[..., int], broken_module: str, capsys: pytest.CaptureFixture) -> None:
    assert run_cli("check", "gem", "p=4") == 0
    out = capsys.readouterr().out
    assert "gradcheck" in out and "0 failed" in out
    assert run_cli("check", f"{broken_module}.Fine", "scale=2") == 0
    assert run_cli("check", f"{broken_module}.MixesBatch") == 1
    assert "FAIL" in capsys.readouterr().out
    assert run_cli("check", "gemm") == 2
    assert "Did you mean 'gem'" in capsys.readouterr().err
    assert run_cli("check", "gem", "p=abc") == 2
    assert "p must be of type float" in capsys.readouterr().err


def test_kind_is_detected_or_chosen() -> None:
    assert check.operator_node("max")[1] == "global"  # a name of both kinds: global unless --local
    assert check.operator_node("max", kind="local")[1] == "local"
    assert check.operator_node("fractional")[1] == "local"
    assert check.operator_node("poolbench.pooling.local.MaxLocal")[1] == "local"


def test_gradcheck_names_a_downcast_as_its_cause() -> None:
    detail = _failed(check.check_module(Float32Out, "global"))["gradcheck"]
    assert "output is float32 for a float64 input" in detail and "downcasts" in detail
