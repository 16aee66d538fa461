"""The ``dataset`` config group without torch: every built-in dataset's schema (its ``dataset.*`` keys,
types, ranges and defaults), its registration, and the key types and checks they share. The builders
(poolbench.data.classification, .retrieval_folder, .synthwriters) read the validated dataclasses; an
option's ``meta["build"]`` imports its builder's module only when a dataset is built."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from poolbench import schema
from poolbench.errors import ConfigError, unknown_choice
from poolbench.schema import Range, Required, option

if TYPE_CHECKING:
    import torch

Progress = Callable[[str, int, int], None] | None
# A training-time transform of one uint8 (C, H, W) image (see poolbench.data.augment).
Transform = Callable[["torch.Tensor"], "torch.Tensor"]
# What a builder receives: the chosen augment recipe as ``size -> transform`` (None = no augmentation).
Augment = Callable[[int], Transform | None]
PositiveInt = Annotated[int, schema.Range(ge=1)]
# dataset.steps_per_epoch: the epoch trainer.steps_per_epoch follows by default; null = one pass.
StepsPerEpoch = Annotated[int | None, schema.Range(ge=1)]
# dataset.val_share: 0 = no validation split; a share in (0, 1) or a whole count >= 1 of the training
# identities (retrieval) or items (classification, stratified). A dataset's own val split wins.
ValShare = Annotated[float, schema.Range(ge=0)]
# dataset.min_per_identity / min_per_class: null = keep everything (and refuse what cannot work);
# k = drop, knowingly and named in one line, the identities / classes with fewer than k images.
MinImages = Annotated[int | None, schema.Range(ge=1)]
# Where a validation split without its own seed key is drawn from (never the run seed: every run of a
# comparison, and every trial of a tuning study, must see the same validation set).
VAL_SEED = 0


def settings(group: str, node: Mapping[str, Any]) -> tuple[schema.Option, Any]:
    """The registered option a ``group`` node names, and the node as that option's validated dataclass.

    Missing keys take the option's values (so API callers may pass a partial mapping); types, ranges,
    choices and unknown keys are checked by the schema (one-line ConfigError).
    """
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    name = plain.get("name")
    registered = schema.options(group)
    if name not in registered:
        raise ConfigError(unknown_choice(f"{group} option", name, registered))
    opt = registered[str(name)]
    merged = {**opt.node(), **plain}
    schema.check(merged, opt.schema, group, label=f"{group}={name}")
    return opt, opt.schema(**merged)


def check_val_share(values: Mapping[str, Any]) -> None:
    """``dataset.val_share`` is a share in [0, 1) or a whole count >= 1 (1.5 items means nothing)."""
    share = values.get("val_share", 0.0)
    if isinstance(share, int | float) and share >= 1 and float(share) != int(share):
        raise ConfigError(f"dataset.val_share must be a share in (0, 1) or a whole count >= 1, got {share!r}")


def _builder(module: str, function: str) -> Callable[..., Any]:
    """``meta["build"]`` of a built-in dataset: its builder, imported (with torch) when first called."""

    def build(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(f"poolbench.data.{module}"), function)(*args, **kwargs)

    build.__qualname__ = build.__name__ = function
    return build


# --- classification ------------------------------------------------------------------------------

ImageSize = Annotated[int | None, Range(ge=1)]
TestFraction = Annotated[float, Range(gt=0, lt=1)]
SplitSeed = Annotated[int, Range(ge=0, lt=2**32)]

# Where Debian's `dataset-fashion-mnist` package installs the four IDX files (dpkg -L shows them).
FASHION_MNIST_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"


@dataclass
class DigitsConfig:
    """``dataset=digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), offline."""

    name: str = "digits"
    task: Literal["classification"] = "classification"
    image_size: ImageSize = 32  # upsampled from 8x8 (bilinear); null keeps 8x8
    test_fraction: TestFraction = 0.25  # stratified split, fixed by split_seed (not the run seed)
    split_seed: SplitSeed = 0  # also draws the validation split
    steps_per_epoch: StepsPerEpoch = None  # null = one pass over the training set
    val_share: ValShare = 0.0  # validation: a stratified share (or count) of the training items

    check_values = staticmethod(check_val_share)


@dataclass
class FashionMnistConfig:
    """``dataset=fashion_mnist``: Fashion-MNIST (10 classes) from its four IDX files (optionally .gz)."""

    name: str = "fashion_mnist"
    task: Literal["classification"] = "classification"
    root: str = FASHION_MNIST_DEBIAN_ROOT  # where Debian's dataset-fashion-mnist installs them
    image_size: ImageSize = 32  # resized from 28x28; null keeps 28
    steps_per_epoch: StepsPerEpoch = None  # null = one pass over the training set
    val_share: ValShare = 0.0  # validation: a stratified share (or count) of the training items

    check_values = staticmethod(check_val_share)


@dataclass
class CifarConfig:
    """``dataset=cifar10`` / ``cifar100`` (fine labels): the python version, extracted under ``root``."""

    name: str = "cifar10"
    task: Literal["classification"] = "classification"
    root: Annotated[str | None, Required("the folder holding cifar-10-batches-py/ or cifar-100-python/ "
                                         "(the python version, extracted; nothing is downloaded)")] = None
    image_size: ImageSize = None  # null keeps 32x32
    steps_per_epoch: StepsPerEpoch = None  # null = one pass over the training set
    val_share: ValShare = 0.0  # validation: a stratified share (or count) of the training items

    check_values = staticmethod(check_val_share)


@dataclass
class Cifar100Config(CifarConfig):
    """``dataset=cifar100``: CIFAR-100 with its fine labels (100 classes)."""

    name: str = "cifar100"


@dataclass
class ImageFolderConfig:
    """``dataset=imagefolder``: any class-per-folder tree, ``<root>/train/<class>/*`` and
    ``<root>/test/<class>/*`` (plus ``<root>/val/<class>/*`` when present), or ``<root>/<class>/*`` split
    by ``test_fraction``."""

    name: str = "imagefolder"
    task: Literal["classification"] = "classification"
    root: Annotated[str | None, Required("the folder holding <class>/ (or train/<class>/ and test/<class>/) "
                                         "folders of images")] = None
    # null = follow the images (1 when every image is grey, else 3 = RGB); 1 or 3 converts them.
    channels: Literal[1, 3] | None = None
    image_size: PositiveInt = 64  # every image is resized to image_size x image_size
    test_fraction: TestFraction = 0.2  # only without train/ and test/ folders; stratified, fixed by split_seed
    split_seed: SplitSeed = 0  # also draws the validation split
    steps_per_epoch: StepsPerEpoch = None  # null = one pass over the training set
    val_share: ValShare = 0.0  # without a val/ folder: a stratified share (or count) of the training items
    # null = a class folder without images is an error; k = drop class folders with fewer than k images
    # (named in one line), so an empty folder never becomes a class the classifier must predict.
    min_per_class: MinImages = None

    check_values = staticmethod(check_val_share)


@dataclass
class ClammConfig:
    """``dataset=clamm``: CLaMM'16/'17 script classification (12 classes), the layout made by
    scripts/prepare_clamm.py: a folder of .tif pages plus a ';'-separated label file per split."""

    name: str = "clamm"
    task: Literal["classification"] = "classification"
    train_images: Annotated[str | None, Required("the folder of training pages")] = None
    train_csv: str | None = None  # null = the one .csv in train_images
    test_images: Annotated[str | None, Required("the folder of test pages")] = None
    test_csv: str | None = None  # null = the one .csv in test_images
    filename_column: Annotated[int, Range(ge=0)] = 0
    label_column: Annotated[int, Range(ge=0)] = 1  # SCRIPT_TYPE
    short_side: PositiveInt = 512  # pages are scaled so their short side is this
    input_size: PositiveInt = 224  # random crops (or the augment recipe) for training, centre crop for test
    steps_per_epoch: StepsPerEpoch = None  # null = one pass over the training pages
    val_share: ValShare = 0.0  # validation: a stratified share (or count) of the training pages

    @staticmethod
    def check_values(values: dict) -> None:
        check_val_share(values)
        if values["input_size"] > values["short_side"]:
            raise ConfigError(f"clamm: dataset.input_size {values['input_size']} is larger than dataset.short_side "
                              f"{values['short_side']}")



# --- retrieval -----------------------------------------------------------------------------------

# ICDAR17 names start with the writer id: 1001-IMG_MAX_116403.jpg (any id before the first '-').
ICDAR17_PATTERN = r"^([^-]+)-"


@dataclass
class RetrievalFolderConfig:
    """``dataset=retrieval_folder``: images grouped by identity, evaluated by leave-one-out retrieval."""

    name: str = "retrieval_folder"
    task: Literal["retrieval"] = "retrieval"
    root: Annotated[str | None, Required("the folder holding the images (one sub-folder per identity, "
                                         "train/ and test/ folders, or the files a csv lists)")] = None
    csv: str | None = None  # rows path,identity[,split], paths relative to root; null = read the folders
    identity_pattern: str | None = None  # regex, group 1 = identity, on names in flat folders; null = sub-folders
    train_dir: str = "train"  # split folders, used when both exist under root
    test_dir: str = "test"
    test_identities: Annotated[float, Range(gt=0, lt=1)] = 0.5  # without split folders/column: held-out fraction
    identity_split_seed: Annotated[int, Range(ge=0, lt=2**32)] = 0  # fixes that split (not the run seed)
    check_disjoint: bool = True  # error when an identity is in both given splits
    channels: Literal[1, 3] | None = None  # null = 3 (RGB) for whole images, 1 for tiled pages (always grey)
    input_size: PositiveInt = 128  # network input: whole images or patches are resized to this
    patch_size: Annotated[int | None, Range(ge=1)] = None  # tile pages into patches of this; null = whole images
    page_scale: Annotated[float, Range(gt=0, le=1)] = 1.0  # tiled pages are downscaled by this when read
    min_edges: Annotated[float, Range(ge=0, le=1)] = 0.03  # tiled: keep patches with this Sobel-edge fraction
    train_patches_per_page: PositiveInt = 100  # tiled: random training crops per page and epoch pass
    steps_per_epoch: StepsPerEpoch = None  # null = one pass over the training items
    # Validation identities: a share or count of the training ones (seeded), unless val_dir / csv val rows.
    val_share: ValShare = 0.0
    val_dir: str = "val"  # with split folders: used when it exists under root
    min_per_identity: MinImages = None  # drop identities with fewer images (named in one line); null = keep

    @staticmethod
    def check_values(values: dict) -> None:
        check_val_share(values)
        if values.get("patch_size") is not None and values.get("channels") == 3:
            raise ConfigError("dataset.channels=3 needs whole images (dataset.patch_size=null): tiled pages are "
                              "read grey")


@dataclass
class Icdar17Config(RetrievalFolderConfig):
    """``dataset=icdar17``: ICDAR 2017 Historical-WI writer retrieval in the layout
    scripts/prepare_icdar17.py makes: flat folders ``<root>/train/`` (394 writers x 3 pages) and
    ``<root>/test/`` (720 writers x 5), file names starting with the writer id. Pages are halved (200 px
    patches = the authors' 400 at full size); patches need >= 3 % Sobel-edge pixels (the authors: Canny,
    > 2000 edge pixels in 256^2)."""

    name: str = "icdar17"
    identity_pattern: str | None = ICDAR17_PATTERN
    patch_size: Annotated[int | None, Range(ge=1)] = 200
    page_scale: Annotated[float, Range(gt=0, le=1)] = 0.5
    steps_per_epoch: StepsPerEpoch = 60  # training crops are random: 60 P x K batches


@dataclass
class SynthWritersConfig:
    """``dataset=synthwriters``: the default, generated offline and cached; mirrors ICDAR17."""

    name: str = "synthwriters"
    task: Literal["retrieval"] = "retrieval"
    # Pages are page_size x page_size pixels; from 48 on every page holds two lines of text (the first
    # baseline lies at most 21 px down, lines at most 25 px apart), below that a page may hold no word.
    page_size: Annotated[int, Range(ge=48)] = 256
    patch_size: PositiveInt = 64  # training crops and test tiles, in page pixels
    input_size: Annotated[int | None, Range(ge=1)] = None  # resize patches to this; null = patch_size
    train_writers: PositiveInt = 40
    train_pages_per_writer: PositiveInt = 3
    test_writers: Annotated[int, Range(ge=2)] = 100  # disjoint from the training writers
    test_pages_per_writer: Annotated[int, Range(ge=2)] = 5  # leave-one-out retrieval needs 2
    # Hershey font names shared by the writers, or a count (the first N handwriting-like ones).
    fonts: list[str] | str | int = field(default_factory=lambda: ["scripts", "cursive"])
    # 0..1: higher = writers more alike, pages more varied (0.25/0.35/0.5 gave avg-pool mAP
    # 0.58/0.41/0.20 with a throwaway 4-block CNN, 300 triplet steps).
    difficulty: Annotated[float, Range(ge=0, le=1)] = 0.35
    train_patches_per_page: PositiveInt = 100  # training set length = train pages x this (random crop per item)
    min_ink: Annotated[float, Range(ge=0, le=1)] = 0.05  # test tiles / training crops need this ink fraction
    generation_seed: Annotated[int | None, Range(ge=0, lt=2**63)] = None  # fix the pages; null = the run's seed
    cache_dir: str | None = None  # null = $POOLBENCH_CACHE or ~/.cache/poolbench, then /synthwriters
    # Training crops are random, so an epoch is a fixed number of P x K batches.
    steps_per_epoch: StepsPerEpoch = 60
    # Validation writers: a share or count of the training writers (drawn with the generation seed),
    # evaluated leave-one-out on their tiled pages like the test writers; 0 = none.
    val_share: ValShare = 0.0

    @staticmethod
    def check_values(values: dict) -> None:
        check_val_share(values)
        if values["patch_size"] > values["page_size"]:
            raise ConfigError(f"synthwriters: dataset.patch_size {values['patch_size']} is larger than "
                              f"dataset.page_size {values['page_size']}")
        count = values.get("val_share", 0)
        if count >= 1 and values["train_writers"] - count < 2:
            raise ConfigError(f"synthwriters: dataset.val_share={count:g} leaves {values['train_writers'] - count:g} "
                              f"of dataset.train_writers={values['train_writers']} to train on; training needs 2")



option("dataset", "digits", DigitsConfig,
       meta={"augment": "cifar", "build": _builder("classification", "build_digits")})
option("dataset", "fashion_mnist", FashionMnistConfig,
       meta={"augment": "cifar", "build": _builder("classification", "build_fashion_mnist")})
option("dataset", "cifar10", CifarConfig,
       meta={"augment": "cifar", "build": _builder("classification", "build_cifar")})
option("dataset", "cifar100", Cifar100Config,
       meta={"augment": "cifar", "build": _builder("classification", "build_cifar")})
option("dataset", "imagefolder", ImageFolderConfig,
       meta={"augment": "imagenet", "build": _builder("classification", "build_imagefolder")})
option("dataset", "clamm", ClammConfig,
       meta={"augment": "document", "build": _builder("classification", "build_clamm")})
option("dataset", "retrieval_folder", RetrievalFolderConfig,
       meta={"augment": "none", "build": _builder("retrieval_folder", "build_retrieval_folder")})
option("dataset", "icdar17", Icdar17Config,
       meta={"augment": "none", "build": _builder("retrieval_folder", "build_retrieval_folder")})
option("dataset", "synthwriters", SynthWritersConfig,
       meta={"augment": "none", "build": _builder("synthwriters", "build")})
