"""Pages -> patches, shared by the writer-identification sets (synthwriters, retrieval_folder / icdar17).

A page is a uint8 grayscale tensor (H, W) with ink bright on a dark background (0 = no ink); items
are float (1, S, S) in [0, 1] with the same polarity, so zero padding in a CNN means "no ink".
A *content* function maps a page or crop to a boolean mask (ink pixels for clean synthetic pages,
Sobel edges for scans); it is used to skip near-empty patches, like the DGMP authors' Canny edge
filter. Masks are computed on demand (per crop, or per page while tiling) and never stored, so only
the uint8 pages stay in memory.

- Training (``RandomPatches``): random crops of ``crop_size`` page pixels, resized to
  ``input_size``; positions come from torch's global RNG, so the engine's seeding makes them
  reproducible. Up to ``max_tries`` crops are drawn and the first with enough content is used
  (else the one with the most content). An optional ``transform`` (``augment``) maps the uint8 crop
  (1, crop_size, crop_size) to one of the same size before it is resized.
- Test (``TiledPatches``): a non-overlapping grid of ``crop_size`` tiles centred on each page;
  tiles below ``min_content`` are dropped. A page where every tile is below it keeps its fullest
  tile, so every page still gets a descriptor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from poolbench.data.common import Transform
from poolbench.errors import DataError

ContentMask = Callable[[torch.Tensor], torch.Tensor]
SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def ink_mask(page: torch.Tensor, threshold: int = 128) -> torch.Tensor:
    return page >= threshold


def edge_mask(page: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """Edge pixels: Sobel gradient magnitude (|gx| + |gy| on the [0, 1] scale) above ``threshold``.

    A cheap stand-in for the authors' Canny filter: an ideal black/white step scores 4, so 1.0
    keeps clear strokes on binarised and grey scans alike while ignoring paper texture.
    """
    image = page.float().div(255.0)[None, None]
    kernels = torch.stack([SOBEL_X, SOBEL_X.t()])[:, None]
    gradients = F.conv2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), kernels)
    return gradients.abs().sum(dim=1)[0] > threshold


def check_page_sizes(pages: list[torch.Tensor], names: list[str], crop_size: int) -> None:
    for page, name in zip(pages, names, strict=True):
        if min(page.shape) < crop_size:
            h, w = page.shape
            raise DataError(f"page '{name}' is {w}x{h} pixels, smaller than the patch size {crop_size} "
                            f"(lower dataset.patch_size or raise dataset.page_scale)")


def to_input(crop: torch.Tensor, input_size: int) -> torch.Tensor:
    patch = crop.float().div_(255.0)[None]
    if patch.shape[-1] != input_size:
        patch = F.interpolate(patch[None], size=(input_size, input_size), mode="bilinear",
                              antialias=True, align_corners=False)[0]
    return patch


class RandomPatches(Dataset):
    """``patches_per_page`` random crops of every page; item i comes from page i // patches_per_page."""

    def __init__(self, pages: list[torch.Tensor], content: ContentMask, page_labels: torch.Tensor,
                 crop_size: int, input_size: int, patches_per_page: int, min_content: float,
                 max_tries: int = 10, transform: Transform | None = None):
        self.pages = pages
        self.content = content
        self.page_labels = page_labels
        self.crop_size = crop_size
        self.input_size = input_size
        self.patches_per_page = patches_per_page
        self.min_pixels = min_content * crop_size * crop_size
        self.max_tries = max_tries
        self.transform = transform

    @property
    def labels(self) -> torch.Tensor:
        return self.page_labels.repeat_interleave(self.patches_per_page)

    def __len__(self) -> int:
        return len(self.pages) * self.patches_per_page

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        page_index = index // self.patches_per_page
        page, size = self.pages[page_index], self.crop_size
        best, best_pixels = (0, 0), -1.0
        for _ in range(self.max_tries):
            y = int(torch.randint(0, page.shape[0] - size + 1, ()))
            x = int(torch.randint(0, page.shape[1] - size + 1, ()))
            pixels = float(self.content(page[y:y + size, x:x + size]).sum())
            if pixels > best_pixels:
                best, best_pixels = (y, x), pixels
            if pixels >= self.min_pixels:
                break
        y, x = best
        crop = page[y:y + size, x:x + size]
        if self.transform is not None:
            crop = self.transform(crop[None])[0]
        return to_input(crop, self.input_size), int(self.page_labels[page_index])


def tile_positions(content: torch.Tensor, crop_size: int, min_content: float) -> list[tuple[int, int]]:
    """Top-left corners of the kept tiles of one page (grid centred on the page)."""
    height, width = content.shape
    rows, cols = height // crop_size, width // crop_size
    top, left = (height - rows * crop_size) // 2, (width - cols * crop_size) // 2
    grid = content[top:top + rows * crop_size, left:left + cols * crop_size]
    fill = grid.reshape(rows, crop_size, cols, crop_size).float().mean(dim=(1, 3))
    keep = (fill >= min_content).nonzero().tolist()
    if not keep:
        keep = [divmod(int(fill.argmax()), cols)]
    return [(top + r * crop_size, left + c * crop_size) for r, c in keep]


class TiledPatches(Dataset):
    """Non-overlapping tiles of every test page; yields (patch, page_index)."""

    def __init__(self, pages: list[torch.Tensor], content: ContentMask, crop_size: int,
                 input_size: int, min_content: float):
        self.pages = pages
        self.crop_size = crop_size
        self.input_size = input_size
        self.items = [(page_index, y, x)
                      for page_index, page in enumerate(pages)
                      for y, x in tile_positions(content(page), crop_size, min_content)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        page_index, y, x = self.items[index]
        crop = self.pages[page_index][y:y + self.crop_size, x:x + self.crop_size]
        return to_input(crop, self.input_size), page_index


def check_test_pages(page_writers: torch.Tensor, describe: str, split: str = "test") -> None:
    """Leave-one-out retrieval needs at least two pages of every writer of the ``split`` (test or
    validation), and two writers (with one, every retrieved page is relevant and mAP is 1.0 whatever
    the model)."""
    writers, counts = page_writers.unique(return_counts=True)
    if len(writers) < 2:
        raise DataError(f"{describe}: the {split} set has {len(writers)} writer/identity; retrieval needs at least 2 "
                        f"(with one, mAP would be 1.0 whatever the model)")
    single = writers[counts < 2]
    if len(single):
        raise DataError(f"{describe}: {len(single)} {split} writer(s) have a single page (e.g. writer "
                        f"{int(single[0])}); retrieval needs at least 2 pages per test writer")
