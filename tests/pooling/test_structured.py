"""SPP, bilinear and NetVLAD global pools against loop references, plus gradients and edge inputs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from poolbench.pooling import create, spec, specs, structured
from poolbench.pooling.structured import signed_sqrt

NAMES = [s.name for s in specs("global") if s.cls.__module__ == structured.__name__]  # a new one is tested
CASES = [
    ("spp", {}),
    ("spp", {"levels": [1, 3], "mode": "avg"}),
    ("spp", {"levels": [2], "mode": "max"}),
    ("bilinear", {}),
    ("netvlad", {}),
    ("netvlad", {"clusters": 3, "normalize_input": False}),
]
CASE_IDS = [f"{name}{params or ''}" for name, params in CASES]


def make(name: str, x: torch.Tensor | None = None, **params: Any) -> nn.Module:
    """The operator, with lazy parameters materialised by one forward on ``x`` when given."""
    module = create(name, **params)
    if x is not None:
        module(x)
    return module


# ---------------------------------------------------------------------------- references (numpy, loops)


def spp_reference(x: np.ndarray, levels: list[int], mode: str) -> np.ndarray:
    batch, channels, height, width = x.shape
    pool = np.max if mode == "max" else np.mean
    out = []
    for b in range(batch):
        row = []
        for level in levels:
            for c in range(channels):
                for i in range(level):
                    for j in range(level):
                        r0, r1 = (i * height) // level, -((-(i + 1) * height) // level)  # floor, ceil
                        c0, c1 = (j * width) // level, -((-(j + 1) * width) // level)
                        row.append(pool(x[b, c, r0:r1, c0:c1]))
        out.append(row)
    return np.array(out)


def bilinear_reference(x: np.ndarray) -> np.ndarray:
    batch, channels = x.shape[:2]
    phi = x.reshape(batch, channels, -1)
    n = phi.shape[2]
    out = []
    for b in range(batch):
        values = []
        for i in range(channels):
            for j in range(i, channels):
                g = sum(phi[b, i, t] * phi[b, j, t] for t in range(n)) / n
                values.append(math.copysign(math.sqrt(abs(g)), g))
        values = np.array(values)
        out.append(values / np.linalg.norm(values))
    return np.array(out)


def netvlad_reference(x: np.ndarray, m: nn.Module) -> np.ndarray:
    centroids = m.centroids.detach().double().numpy()
    weight = m.assign_weight.detach().double().numpy()
    bias = m.assign_bias.detach().double().numpy()
    clusters, channels = centroids.shape
    out = []
    for sample in x.reshape(x.shape[0], channels, -1):
        descriptors = [sample[:, i] for i in range(sample.shape[1])]
        if m.normalize_input:
            descriptors = [d / np.linalg.norm(d) for d in descriptors]
        vlad = np.zeros((clusters, channels))
        for d in descriptors:
            logits = weight @ d + bias
            assign = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            for k in range(clusters):
                vlad[k] += assign[k] * (d - centroids[k])
        vlad = np.concatenate([v / np.linalg.norm(v) for v in vlad])
        out.append(vlad / np.linalg.norm(vlad))
    return np.array(out)


def reference(name: str, m: nn.Module, x: torch.Tensor) -> np.ndarray:
    values = x.detach().double().numpy()
    if name == "spp":
        return spp_reference(values, list(m.levels), m.mode)
    if name == "bilinear":
        return bilinear_reference(values)
    return netvlad_reference(values, m)


# ---------------------------------------------------------------------------- registry and configs


def test_operators_are_registered_with_their_widths() -> None:
    widths = {"spp": "C·Σl²", "bilinear": "C(C+1)/2", "netvlad": "K·C"}
    for name in NAMES:
        s = spec(name)
        assert s.kind == "global" and s.formula and s.reference and (s.cls.__doc__ or "").strip()
        assert s.width == widths[name]
        assert s.learnable == any(p.requires_grad for p in create(name).parameters())
    assert spec("netvlad").params == {"clusters": 16, "in_channels": None, "normalize_input": True}


@pytest.mark.parametrize("name", NAMES)
def test_config_file_creates_the_operator(name: str, load_pooling_config: Callable) -> None:
    config = load_pooling_config(name)
    assert config.pop("name") == name
    assert config.pop("lr_mult") == 1
    assert isinstance(create(name, **config), spec(name).cls)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("spp", {"levels": []}, "levels must be a non-empty list"),
        ("spp", {"levels": 4}, "levels must be a non-empty list"),
        ("spp", {"levels": [1, 0]}, "levels must be integers >= 1"),
        ("spp", {"levels": [1.5]}, "levels must be integers >= 1"),
        ("spp", {"mode": "median"}, "unknown spp mode 'median'. Valid choices: max, avg"),
        ("netvlad", {"clusters": 0}, "clusters must be an integer >= 1"),
        ("netvlad", {"in_channels": 0}, "in_channels must be an integer >= 1"),
        ("netvlad", {"clusters": None}, "clusters must be an integer >= 1"),
    ],
)
def test_invalid_parameter_values_raise_one_line_value_error(name: str, params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=rf"^{match}[^\n]*$"):
        create(name, **params)


def test_unknown_name_and_parameter_name_the_valid_choices() -> None:
    with pytest.raises(ValueError, match=r"'netvald'. Did you mean 'netvlad'\?.*bilinear.*spp"):
        create("netvald")
    with pytest.raises(ValueError, match=r"unknown parameter 'k' for global pooling 'netvlad'. Valid: clusters"):
        create("netvlad", k=8)


# ---------------------------------------------------------------------------- values


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 4, 4)])
def test_matches_loop_reference(name: str, params: dict, shape: tuple, random_map: Callable) -> None:
    x = random_map(*shape)
    m = make(name, x, **params)
    out = m(x)
    assert out.shape == (shape[0], m.out_features(shape[1]))
    # bilinear's signed sqrt differs from the exact one by at most sqrt(1e-8) = 1e-4 before normalising
    tol = 1e-4 if name == "bilinear" else 1e-10
    np.testing.assert_allclose(out.detach().numpy(), reference(name, m, x), rtol=tol, atol=tol)


def test_output_widths() -> None:
    assert create("spp").out_features(5) == 5 * (1 + 4 + 16)
    assert create("spp", levels=[1, 3]).out_features(2) == 2 * 10
    assert create("bilinear").out_features(2048) == 2048 * 2049 // 2
    assert create("netvlad").out_features(64) == 16 * 64
    assert create("netvlad", clusters=4)(torch.randn(2, 5, 3, 3)).shape == (2, 20)


def test_spp_rejects_a_map_smaller_than_its_largest_level() -> None:
    with pytest.raises(ValueError, match=r"spp level 4 needs a feature map of at least 4×4, got 3×5"):
        create("spp")(torch.zeros(1, 2, 3, 5))


def test_spp_level_one_is_global_max_and_avg(random_map: Callable) -> None:
    x = random_map(2, 3, 4, 6)
    torch.testing.assert_close(create("spp", levels=[1])(x), create("max")(x))
    torch.testing.assert_close(create("spp", levels=[1], mode="avg")(x), create("avg")(x))


def test_spp_accepts_hydra_list_config() -> None:
    from omegaconf import OmegaConf

    levels = OmegaConf.create({"levels": [1, 2]}).levels
    assert create("spp", levels=levels).levels == (1, 2)


def test_signed_sqrt_is_odd_continuous_and_has_finite_slope_at_zero() -> None:
    g = torch.tensor([-4.0, -1e-12, 0.0, 1e-12, 4.0], dtype=torch.float64, requires_grad=True)
    out = signed_sqrt(g)
    torch.testing.assert_close(out, torch.tensor([-2.0, 0, 0, 0, 2.0], dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(out, -signed_sqrt(-g))
    out.sum().backward()
    assert torch.isfinite(g.grad).all() and g.grad.max() <= 0.5 / math.sqrt(1e-8)


@pytest.mark.parametrize(("name", "params"), [("bilinear", {}), ("netvlad", {})])
def test_outputs_are_unit_norm(name: str, params: dict, random_map: Callable) -> None:
    x = random_map(3, 4, 3, 3)
    out = make(name, x, **params)(x)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3, dtype=out.dtype))


def test_netvlad_blocks_are_intra_normalised(random_map: Callable) -> None:
    x = random_map(2, 5, 3, 4)
    blocks = make("netvlad", x, clusters=6)(x).reshape(2, 6, 5)
    torch.testing.assert_close(blocks.norm(dim=2), torch.full((2, 6), 6**-0.5, dtype=x.dtype))


# ---------------------------------------------------------------------------- NetVLAD's lazy parameters


def test_netvlad_materialises_its_parameters_on_the_first_forward() -> None:
    m = create("netvlad")
    assert isinstance(m.centroids, UninitializedParameter) and m.in_channels is None
    m(torch.randn(2, 7, 3, 3))
    assert m.in_channels == 7 and not m.has_uninitialized_params()
    assert m.centroids.shape == m.assign_weight.shape == (16, 7) and m.assign_bias.shape == (16,)
    torch.testing.assert_close(m.centroids.norm(dim=1), torch.ones(16))
    torch.testing.assert_close(m.assign_weight, 2 * m.centroids)


def test_netvlad_rejects_a_channel_count_it_was_not_built_for() -> None:
    m = create("netvlad", in_channels=8)
    assert m.centroids.shape == (16, 8) and not m.has_uninitialized_params()
    with pytest.raises(ValueError, match="netvlad was built for 8 input channels, got 5"):
        m(torch.randn(1, 5, 2, 2))


def test_netvlad_lazy_module_loads_a_trained_state_dict(random_map: Callable) -> None:
    x = random_map(2, 6, 3, 3, dtype=torch.float32)
    trained = make("netvlad", x, clusters=4)
    fresh = create("netvlad", clusters=4)
    fresh.load_state_dict(trained.state_dict())
    torch.testing.assert_close(fresh(x), trained(x))


def test_netvlad_initialisation_follows_the_global_seed() -> None:
    torch.manual_seed(0)
    first = create("netvlad", in_channels=3).centroids.detach().clone()
    torch.manual_seed(0)
    torch.testing.assert_close(create("netvlad", in_channels=3).centroids.detach(), first)


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_gradcheck_float64_input_and_parameters(
    name: str, params: dict, random_map: Callable, gradcheck_pool: Callable
) -> None:
    x = random_map(2, 3, 4, 4, seed=3)
    if name == "netvlad":  # gradcheck's cost grows with the parameter count; 4 clusters test the same maths
        params = {"clusters": 4, **params}
    assert gradcheck_pool(make(name, x, **params), x)


def test_netvlad_parameters_receive_gradients(random_map: Callable) -> None:
    x = random_map(2, 4, 3, 3, dtype=torch.float32)
    m = make("netvlad", x, clusters=3)
    (m(x) * random_map(2, 12, seed=1, dtype=torch.float32)).sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


# ---------------------------------------------------------------------------- edge inputs


def _edge_module(name: str, x: torch.Tensor) -> nn.Module:
    """Levels that fit a small map for spp; materialised parameters for netvlad."""
    return make(name, x, **({"levels": [1, 2]} if name == "spp" else {}))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_output_keeps_the_input_dtype(name: str, dtype: torch.dtype, random_map: Callable) -> None:
    x = random_map(2, 3, 4, 4, dtype=dtype)
    assert _edge_module(name, x)(x).dtype == dtype


@pytest.mark.parametrize("name", NAMES)
def test_one_by_one_map(name: str, random_map: Callable, assert_finite_output_and_gradients: Callable) -> None:
    x = random_map(2, 3, 1, 1)
    m = make(name, x, **({"levels": [1]} if name == "spp" else {}))
    out = assert_finite_output_and_gradients(m, x)
    assert out.shape == (2, m.out_features(3))
    if name == "spp":
        torch.testing.assert_close(out, x.flatten(1))


@pytest.mark.parametrize("name", NAMES)
def test_all_zero_map_gives_finite_output_and_gradients(
    name: str, assert_finite_output_and_gradients: Callable
) -> None:
    x = torch.zeros(2, 3, 4, 4)
    out = assert_finite_output_and_gradients(_edge_module(name, x), x)
    if name != "netvlad":  # netvlad still measures the residuals to its centroids
        assert (out == 0).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_large_activations_stay_finite(name: str, sign: float, assert_finite_output_and_gradients: Callable) -> None:
    x = sign * (1e4 + 1e3 * torch.rand(2, 3, 4, 4))
    assert_finite_output_and_gradients(_edge_module(name, x), x)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu_is_finite_and_close_to_float32(
    name: str, dtype: torch.dtype, random_map: Callable, assert_low_precision_close: Callable
) -> None:
    x = random_map(2, 3, 5, 5, dtype=torch.float32)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    assert_low_precision_close(_edge_module(name, x), x, dtype, tol)
    if name == "bilinear":  # ΦΦᵀ of activations ~300 overflows float16 unless computed in float32
        assert torch.isfinite(create("bilinear")((300 * x).to(dtype))).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(name: str, random_map: Callable) -> None:
    x = random_map(2, 3, 5, 5, dtype=torch.float32)
    m = _edge_module(name, x)
    torch.testing.assert_close(m.cuda()(x.cuda()).cpu(), m.cpu()(x), atol=1e-5, rtol=1e-5)
    lazy = create("netvlad").cuda()  # parameters created at the first forward land on the module's device
    assert lazy(x.cuda()).device.type == "cuda" and lazy.centroids.device.type == "cuda"
