"""``synthwriters``: a synthetic writer-identification set drawn with Hershey stroke fonts.

Mirrors ICDAR17 Historical-WI: ``train_writers`` x ``train_pages_per_writer`` training pages and a
disjoint set of ``test_writers`` x ``test_pages_per_writer`` test pages. Every writer has a fixed
style: a font from a small shared pool (writers share fonts, so the font alone does not identify
them), scale, aspect, slant, letter/word/line spacing, pen width, baseline curve and tilt, a smooth
warp field and ink intensity. Every page has its own random text, a small variation of its writer's
style, per-character jitter and pixel noise.

``difficulty`` in [0, 1] sets how far apart writers are (the width of the style range writers are
drawn from shrinks from 100 % to 20 %) and how much a writer's pages vary (page jitter grows from
2 % to 20 % of the style range). Lower = easier.

Rendering is vectorised: every page's strokes become points sampled every 0.4 px along the
segments, splatted bilinearly into the canvas (one ``np.bincount``), then blurred with each page's
Gaussian pen (grouped separable convolution over a chunk of pages) and mapped to ink intensity.

Pages are uint8 (ink bright on dark); items are float (1, S, S) in [0, 1], not mean-centred (see
``poolbench.data.pages``). The pages depend only on the generation options and the seed; they are
cached in ``<cache_dir>/<hash>.pt`` (written atomically) and reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from poolbench.data.base import DataBundle
from poolbench.data.common import (
    Augment,
    held_out_identities,
    val_count,
)
from poolbench.data.pages import RandomPatches, TiledPatches, check_test_pages, ink_mask
from poolbench.data.schemas import SynthWritersConfig
from poolbench.errors import ConfigError, unknown_choice
from poolbench.files import atomic_write

# Bump when the drawing code changes, so old caches are not reused for new pictures.
GENERATOR_VERSION = 1



# Style ranges: (low, high) per writer parameter. Units: px unless noted.
STYLE_RANGES: dict[str, tuple[float, float]] = {
    "scale": (0.40, 0.60),  # px per font unit (cap height is 21 units)
    "aspect": (0.75, 1.30),  # horizontal stretch
    "slant": (-0.45, 0.45),  # shear: x shift per px of height
    "letter_spacing": (-3.0, 4.0),  # font units added to each advance
    "word_spacing": (4.0, 14.0),  # font units
    "line_pitch": (30.0, 42.0),  # font units between baselines
    "pen_sigma": (0.45, 1.2),  # Gaussian pen radius
    "baseline_amplitude": (0.0, 3.0),
    "baseline_wavelength": (60.0, 250.0),
    "tilt": (-0.04, 0.04),  # baseline rise per px
    "warp_amplitude": (0.0, 4.0),
    "ink": (0.55, 1.0),
    "margin": (4.0, 20.0),
}
WARP_WAVES = 3
CHAR_JITTER = 0.04  # relative size jitter of single characters (times 0.5 + difficulty)
POINT_SPACING = 0.4  # px between points sampled along strokes
CHUNK = 32  # pages rasterised together
# English letter frequencies, so the random text has a natural mix of letter shapes.
LETTER_FREQ = np.array([8.2, 1.5, 2.8, 4.3, 12.7, 2.2, 2.0, 6.1, 7.0, 0.15, 0.77, 4.0, 2.4, 6.7, 7.5, 1.9,
                        0.095, 6.0, 6.3, 9.1, 2.8, 0.98, 2.4, 0.15, 2.0, 0.074])
LETTER_FREQ = LETTER_FREQ / LETTER_FREQ.sum()

Progress = Callable[[str, int, int], None]


def font_names() -> list[str]:
    from HersheyFonts import HersheyFonts

    return list(HersheyFonts().default_font_names)


@cache
def font_glyphs(font: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Glyph tables for printable ASCII (index = ord(c) - 32).

    Returns segments (M, 4) as x0, y0, x1, y1 in font units (x from the glyph's left edge, y
    relative to the baseline, down positive), first segment and segment count per glyph, and width.
    """
    from HersheyFonts import HersheyFonts

    hershey = HersheyFonts()
    hershey.load_default_font(font)
    segments: list[tuple[float, float, float, float]] = []
    starts, counts, widths = [], [], []
    for code in range(32, 127):
        glyph = hershey.all_glyphs.get(chr(code)) or hershey.all_glyphs[" "]
        starts.append(len(segments))
        lines = [(x0 - glyph.left_offset, y0 - glyph.base_line, x1 - glyph.left_offset, y1 - glyph.base_line)
                 for (x0, y0), (x1, y1) in glyph.lines]
        segments.extend(lines)
        counts.append(len(lines))
        widths.append(glyph.char_width)
    return (np.asarray(segments, dtype=np.float64).reshape(-1, 4), np.asarray(starts), np.asarray(counts),
            np.asarray(widths, dtype=np.float64))


def resolve_fonts(value: Any) -> list[str]:
    available = font_names()
    if isinstance(value, int) and not isinstance(value, bool):
        preferred = ["scripts", "cursive", "scriptc", "timesi", "futural", "rowmans", "timesr", "futuram",
                     "rowmand", "timesib", "timesrb", "gothiceng", "gothicger", "gothicita"]
        if not 1 <= value <= len(preferred):
            raise ConfigError(f"dataset option 'fonts' as a count must be in 1..{len(preferred)}, got {value}")
        return preferred[:value]
    if isinstance(value, str):
        value = [value]
    fonts = list(value)
    if not fonts:
        raise ConfigError("dataset option 'fonts' is empty; give font names or a count")
    for font in fonts:
        if font not in available:
            raise ConfigError(unknown_choice("Hershey font", font, available))
    return fonts


def default_cache_dir() -> Path:
    root = os.environ.get("POOLBENCH_CACHE") or Path.home() / ".cache" / "poolbench"
    return Path(root) / "synthwriters"


class StyleSampler:
    """Draws writer styles and per-page variations according to ``difficulty``."""

    def __init__(self, difficulty: float):
        self.spread = 1.0 - 0.8 * difficulty
        self.jitter = 0.02 + 0.18 * difficulty
        self.difficulty = difficulty

    def writer(self, rng: np.random.Generator, num_fonts: int) -> dict[str, Any]:
        style: dict[str, Any] = {}
        for key, (low, high) in STYLE_RANGES.items():
            centre, width = (low + high) / 2, (high - low) * self.spread
            style[key] = centre + width * (rng.random() - 0.5)
        style["font"] = int(rng.integers(num_fonts))
        style["warp_freq"] = rng.normal(size=(2, WARP_WAVES, 2)) * (2 * math.pi / 150.0)
        style["warp_phase"] = rng.uniform(0, 2 * math.pi, size=(2, WARP_WAVES))
        return style

    def page(self, style: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        page = dict(style)
        for key, (low, high) in STYLE_RANGES.items():
            page[key] = float(np.clip(style[key] + rng.normal() * self.jitter * (high - low), low, high))
        page["warp_phase"] = style["warp_phase"] + rng.normal(size=style["warp_phase"].shape) * self.jitter * 2
        page["noise"] = 0.02 + 0.06 * self.difficulty
        return page


def random_text(rng: np.random.Generator, num_words: int) -> tuple[np.ndarray, np.ndarray]:
    """Glyph indices (ord - 32) of random words and the word each character belongs to.

    Letters follow English frequencies; some words are capitalised or followed by , or .
    """
    lengths = np.clip(rng.poisson(3.5, size=num_words) + 1, 1, 12)
    ends = np.cumsum(lengths)
    codes = rng.choice(26, size=int(ends[-1]), p=LETTER_FREQ) + (ord("a") - 32)
    codes[(ends - lengths)[rng.random(num_words) < 0.08]] -= 32  # capital first letter
    punctuation = rng.random(num_words)
    marked = punctuation < 0.10
    marks = np.where(punctuation[marked] < 0.06, ord(",") - 32, ord(".") - 32)
    codes = np.insert(codes, ends[marked], marks)
    word_of_char = np.repeat(np.arange(num_words), lengths + marked)
    return codes, word_of_char


def page_points(style: dict[str, Any], font: str, size: int, rng: np.random.Generator,
                char_jitter: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points (x, y) along every stroke of one page, with the stroke length each point stands for."""
    segments, starts, counts, widths = font_glyphs(font)
    scale, aspect = style["scale"], style["aspect"]
    x_scale = scale * aspect
    margin = style["margin"]
    pitch = style["line_pitch"] * scale
    # Lay out words greedily into lines, starting a little below the top edge.
    codes, word_of_char = random_text(rng, num_words=max(8, int(size * size / (pitch * 30 * x_scale))))
    advances = (widths[codes] + style["letter_spacing"]) * x_scale
    word_starts = np.flatnonzero(np.r_[True, word_of_char[1:] != word_of_char[:-1]])
    word_widths = np.add.reduceat(advances, word_starts)
    space = (style["word_spacing"] + style["letter_spacing"]) * x_scale
    first_baseline = 21 * scale + rng.uniform(2, 8)
    max_lines = int((size - first_baseline) // pitch) + 1
    indents = rng.uniform(0, 6, size=max_lines + 1)
    word_x, word_line = [], []
    x, line = margin + indents[0], 0
    for width in word_widths.tolist():
        if x + width > size - 2 and x > margin + 1:
            line += 1
            x = margin + indents[line]
        if line >= max_lines:
            break
        word_x.append(x)
        word_line.append(line)
        x += width + space
    n_chars = int(np.searchsorted(word_of_char, len(word_x)))
    codes, word_of_char, advances = codes[:n_chars], word_of_char[:n_chars], advances[:n_chars]
    within_word = np.cumsum(advances) - advances
    within_word -= within_word[word_starts[word_of_char]]
    origins = np.asarray(word_x)[word_of_char] + within_word
    lines = np.asarray(word_line)[word_of_char]
    char_scale = 1 + rng.normal(size=n_chars) * char_jitter
    char_dy = rng.normal(size=n_chars) * char_jitter * 10 * scale

    # Gather every character's segments (ragged ranges -> one flat index).
    seg_counts = counts[codes]
    owner = np.repeat(np.arange(n_chars), seg_counts)
    offsets = np.arange(int(seg_counts.sum())) - np.repeat(np.cumsum(seg_counts) - seg_counts, seg_counts)
    segs = segments[starts[codes][owner] + offsets]
    s = (scale * char_scale)[owner]
    gx = segs[:, [0, 2]] * (aspect * s)[:, None]
    gy = segs[:, [1, 3]] * s[:, None]
    px = origins[owner][:, None] + gx - style["slant"] * gy
    line_phase = rng.uniform(0, 2 * math.pi, size=max_lines)[lines[owner]][:, None]
    baseline = (first_baseline + lines[owner] * pitch)[:, None] + char_dy[owner][:, None]
    curve = style["baseline_amplitude"] * np.sin(2 * math.pi * px / style["baseline_wavelength"] + line_phase)
    py = baseline + gy + curve + style["tilt"] * px

    # Smooth warp field (a sum of a few plane waves per coordinate), applied to segment end points,
    # which are at most a few pixels apart.
    amplitude = style["warp_amplitude"] / math.sqrt(WARP_WAVES)
    shifts = []
    for axis in (0, 1):
        (fx, fy), phase = style["warp_freq"][axis].T, style["warp_phase"][axis]
        shifts.append(amplitude * np.sin(px[..., None] * fx + py[..., None] * fy + phase).sum(axis=-1))
    px, py = px + shifts[0], py + shifts[1]

    # Sample points along the segments.
    dx, dy = px[:, 1] - px[:, 0], py[:, 1] - py[:, 0]
    length = np.hypot(dx, dy)
    n_points = np.maximum(1, np.ceil(length / POINT_SPACING).astype(np.int64))
    seg_of_point = np.repeat(np.arange(len(length)), n_points)
    t = (np.arange(int(n_points.sum())) - np.repeat(np.cumsum(n_points) - n_points, n_points) + 0.5)
    t = t / n_points[seg_of_point]
    x_pts = px[seg_of_point, 0] + t * dx[seg_of_point]
    y_pts = py[seg_of_point, 0] + t * dy[seg_of_point]
    weight = np.maximum(length, 0.5)[seg_of_point] / n_points[seg_of_point]

    return x_pts, y_pts, weight


def splat(x: np.ndarray, y: np.ndarray, weight: np.ndarray, size: int) -> np.ndarray:
    """Bilinear splat of weighted points into a (size, size) density image."""
    x0, y0 = np.floor(x - 0.5), np.floor(y - 0.5)
    fx, fy = x - 0.5 - x0, y - 0.5 - y0
    density = np.zeros(size * size)
    for ox, oy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = (x0 + ox).astype(np.int64), (y0 + oy).astype(np.int64)
        inside = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
        density += np.bincount(yi[inside] * size + xi[inside], weights=(w * weight)[inside], minlength=size * size)
    return density.reshape(size, size)


def blur(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable blur of (N, H, W) with one 1-D kernel per image (grouped convolution)."""
    n, radius = len(images), kernels.shape[1] // 2
    rows = F.conv2d(images[None], kernels.view(n, 1, -1, 1), padding=(radius, 0), groups=n)
    return F.conv2d(rows, kernels.view(n, 1, 1, -1), padding=(0, radius), groups=n)[0]


def render(densities: torch.Tensor, styles: list[dict[str, Any]], noise_seeds: list[int]) -> torch.Tensor:
    """Pen-blur (N, H, W) stroke densities with each page's Gaussian pen, map to uint8 ink, add noise."""
    sigmas = torch.tensor([s["pen_sigma"] for s in styles], dtype=torch.float32)
    radius = math.ceil(3 * STYLE_RANGES["pen_sigma"][1])
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernels = torch.exp(-0.5 * (taps[None] / sigmas[:, None]) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    blurred = blur(densities.float(), kernels)
    # A straight line of unit density peaks at 1 / (sqrt(2 pi) sigma) after the blur; rescale so that
    # every pen reaches about the same darkness in the stroke centre, and saturate where strokes cross.
    n = len(styles)
    gain = 2.5 * math.sqrt(2 * math.pi) * sigmas.view(n, 1, 1)
    ink = torch.tensor([s["ink"] for s in styles]).view(n, 1, 1)
    pages = ink * (1 - torch.exp(-gain * blurred))
    for page, style, seed in zip(pages, styles, noise_seeds, strict=True):
        generator = torch.Generator().manual_seed(seed)
        page += torch.randn(page.shape, generator=generator) * style["noise"]
    return (pages.clamp(0, 1) * 255).round().to(torch.uint8)


def generation_params(s: SynthWritersConfig, seed: int) -> dict[str, Any]:
    """Everything that determines the pictures (and so the cache key)."""
    return {
        "version": GENERATOR_VERSION,
        "page_size": s.page_size,
        "train_writers": s.train_writers,
        "train_pages_per_writer": s.train_pages_per_writer,
        "test_writers": s.test_writers,
        "test_pages_per_writer": s.test_pages_per_writer,
        "fonts": resolve_fonts(s.fonts),
        "difficulty": float(s.difficulty),
        "seed": int(seed),
    }


def generate(params: Mapping[str, Any], progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Draw every page. Returns uint8 pages (N, S, S), writer id and is-test flag per page.

    Writers 0..train_writers-1 are training writers, the following ones test writers. Each writer's
    style and each page's randomness come from their own seeded generators, so a page does not
    depend on how many other pages are drawn or in which chunk.
    """
    jobs: list[tuple[int, int, bool]] = []  # (writer, page, is_test)
    for writer in range(params["train_writers"]):
        jobs += [(writer, page, False) for page in range(params["train_pages_per_writer"])]
    for writer in range(params["train_writers"], params["train_writers"] + params["test_writers"]):
        jobs += [(writer, page, True) for page in range(params["test_pages_per_writer"])]
    # The per-chunk convolutions are small: on a shared CPU, intra-op threads only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pages = draw_pages(jobs, params, progress)
    finally:
        torch.set_num_threads(threads)
    return {
        "pages": pages,
        "writers": torch.tensor([w for w, _, _ in jobs], dtype=torch.int64),
        "is_test": torch.tensor([t for _, _, t in jobs], dtype=torch.bool),
    }


def draw_pages(jobs: list[tuple[int, int, bool]], params: Mapping[str, Any], progress: Progress | None
               ) -> torch.Tensor:
    size, fonts, seed = params["page_size"], params["fonts"], params["seed"]
    sampler = StyleSampler(params["difficulty"])
    char_jitter = CHAR_JITTER * (0.5 + params["difficulty"])
    writer_styles: dict[int, dict[str, Any]] = {}
    pages = torch.empty(len(jobs), size, size, dtype=torch.uint8)
    for start in range(0, len(jobs), CHUNK):
        chunk = jobs[start:start + CHUNK]
        styles, noise_seeds, densities = [], [], []
        for writer, page, _ in chunk:
            if writer not in writer_styles:
                writer_rng = np.random.default_rng([seed, GENERATOR_VERSION, writer])
                writer_styles[writer] = sampler.writer(writer_rng, len(fonts))
            rng = np.random.default_rng([seed, GENERATOR_VERSION, writer, page + 1])
            style = sampler.page(writer_styles[writer], rng)
            x, y, w = page_points(style, fonts[style["font"]], size, rng, char_jitter)
            densities.append(splat(x, y, w, size).astype(np.float32))
            styles.append(style)
            noise_seeds.append(int(rng.integers(2**62)))
        pages[start:start + len(chunk)] = render(torch.from_numpy(np.stack(densities)), styles, noise_seeds)
        if progress is not None:
            progress("generating synthwriters pages", start + len(chunk), len(jobs))
    return pages


def load_or_generate(params: Mapping[str, Any], cache_dir: Path, progress: Progress | None
                     ) -> tuple[dict[str, torch.Tensor], Path, bool]:
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"{key}.pt"
    if path.exists():
        try:
            data = torch.load(path, weights_only=True)
            if data.get("params") == json.dumps(params, sort_keys=True):
                return data, path, True
        except Exception:  # noqa: BLE001 - a damaged cache is simply drawn again
            pass
    data = generate(params, progress)
    data["params"] = json.dumps(params, sort_keys=True)  # type: ignore[assignment]
    try:
        atomic_write(path, partial(torch.save, data))
    except OSError as err:
        import warnings

        warnings.warn(f"synthwriters: could not cache pages in '{cache_dir}': {err}", stacklevel=2)
    return data, path, False


def build(s: SynthWritersConfig, *, seed: int, transform: Augment,
          progress: Progress | None = None) -> DataBundle:
    input_size = s.patch_size if s.input_size is None else s.input_size
    generation_seed = seed if s.generation_seed is None else s.generation_seed
    params = generation_params(s, generation_seed)
    cache_dir = Path(s.cache_dir).expanduser() if s.cache_dir else default_cache_dir()
    data, cache_path, cached = load_or_generate(params, cache_dir, progress)

    pages, writers, is_test = data["pages"], data["writers"], data["is_test"]
    # Validation writers are training writers held out whole (all their pages), so they stay unseen.
    count = val_count(s.val_share, s.train_writers, "synthwriters training writers", minimum=2)
    held = held_out_identities(list(range(s.train_writers)), count, generation_seed)
    is_val = torch.isin(writers, torch.tensor(sorted(held), dtype=torch.int64)) & ~is_test
    is_train = ~is_test & ~is_val
    kept = writers[is_train].unique()  # training writers renumbered 0..n-1: they are the classes
    train_pages = list(pages[is_train])
    test_pages = list(pages[is_test])
    train = RandomPatches(train_pages, ink_mask, torch.searchsorted(kept, writers[is_train]), s.patch_size,
                          input_size, s.train_patches_per_page, s.min_ink, transform=transform(s.patch_size))
    test = TiledPatches(test_pages, ink_mask, s.patch_size, input_size, s.min_ink)
    page_writers = writers[is_test].clone()
    check_test_pages(page_writers, "synthwriters")
    val = TiledPatches(list(pages[is_val]), ink_mask, s.patch_size, input_size, s.min_ink) if count else None
    val_page_writers = writers[is_val].clone() if count else None
    if val_page_writers is not None:
        check_test_pages(val_page_writers, "synthwriters", "validation")
    return DataBundle(
        name="synthwriters",
        task="retrieval",
        train=train,
        test=test,
        train_labels=train.labels,
        num_classes=len(kept),
        in_channels=1,
        input_size=input_size,
        page_writers=page_writers,
        val=val,
        val_page_writers=val_page_writers,
        info={
            **({"val_writers": count, "val_pages": int(is_val.sum())} if count else {}),
            "train_pages": len(train_pages),
            "test_pages": len(test_pages),
            "test_patches": len(test),
            "fonts": ",".join(params["fonts"]),
            "difficulty": s.difficulty,
            "generation_seed": generation_seed,
            "cache_path": str(cache_path),
            "cache_hit": cached,
            "normalisation": "ink bright on dark, [0, 1]",
        },
    )
