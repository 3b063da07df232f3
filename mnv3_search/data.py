"""Datasets as in-memory tensors with train / holdout / test splits, and a fast batch iterator.

Sources (the `--data` option):
  digits                  scikit-learn's load_digits (1,797 8x8 images, ships with the package)
  fashion-mnist[:DIR]     the IDX files (.gz or raw); default DIR: the Debian package's folder
  fashion-mnist-tops[:DIR]  its four upper-body classes (T-shirt/top, Pullover, Coat, Shirt), where its errors
                          are: a harder task on which wider networks are clearly better (benchmarks' steep setting)
  cifar10:DIR             the standard python batches (data_batch_1..5, test_batch)
  imagefolder:DIR         one sub-folder per class (or DIR/train + DIR/test|val laid out that way); needs Pillow

Why tensors in memory: on a 2-core box a DataLoader's per-item Python work costs as much as the model.
Images are resized once, at load, to the training resolution (independent of the spec's deployment
resolution) and kept as uint8 (grayscale as 1 channel, widened to 3 only per batch, as a view).
The holdout, used to compare proposals, is carved from the training images by the seed; the test split
is never touched by that (sources without an official test split get a fixed, seed-independent one).
"""

from __future__ import annotations

import gzip
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
FIXED_TEST_SEED = 20240601  # test split of sources without one: the same for every --seed
FASHION_TOPS = (0, 2, 4, 6)  # T-shirt/top, Pullover, Coat, Shirt: the classes Fashion-MNIST's errors are among
SOURCES_HELP = "digits, fashion-mnist[:DIR], fashion-mnist-tops[:DIR], cifar10:DIR or imagefolder:DIR"
HOLDOUT_IMAGES = 1000  # one image = 0.1 point: fine enough to tell NetAdapt's proposals apart


def default_holdout_images(pool: int) -> int:
    """The holdout NetAdapt compares proposals on: 1,000 images (one image = 0.1 point) where the training
    images allow, else a quarter of them (digits: 360 of 1,438; there the holdout loss is the finer signal).
    Evaluation is batched, so 1,000 images cost about as much as a few training steps."""
    return min(HOLDOUT_IMAGES, pool // 4)


def holdout_size(pool: int, holdout: Optional[float | int]) -> int:
    """Images set aside from `pool` training images: None = default_holdout_images, a float a fraction, an
    int a count; at least 1 and at most pool - 1 (0 for a zero fraction)."""
    if holdout is not None and holdout <= 0:
        return 0
    if holdout is None:
        wanted = default_holdout_images(pool)
    elif isinstance(holdout, int):
        wanted = holdout
    else:
        wanted = round(pool * holdout)
    return min(pool - 1, max(1, wanted))


@dataclass(frozen=True)
class Split:
    """Images (uint8, N x C x H x W, C = 1 or 3), labels (int64) and each image's position in the
    source's train or test set (so disjointness can be checked)."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Dataset:
    name: str
    classes: tuple[str, ...]
    resolution: int
    train: Split
    holdout: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> normalised float32 N x 3 x H x W (grayscale repeated as a view)."""
        x = images.float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        x = (x - mean) / std
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def batches(dataset: Dataset, split: Split, batch_size: int, shuffle: bool = False,
            generator: Optional[torch.Generator] = None, drop_last: bool = False
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) batches of `split`; shuffled with `generator` for repeatable order."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield dataset.inputs(split.images[idx]), split.labels[idx]


# --- building splits -------------------------------------------------------------------------------------


def _resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 N x C x h x w -> uint8 N x C x r x r (bilinear, antialiased), in chunks to bound memory."""
    if images.shape[-2:] == (resolution, resolution):
        return images.contiguous()
    out = []
    for chunk in images.split(4096):
        x = F.interpolate(chunk.float(), size=(resolution, resolution), mode="bilinear", antialias=True,
                          align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def _subset(images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> Split:
    return Split(images[index], labels[index], index)


def _fixed_test(n: int, fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(FIXED_TEST_SEED))
    n_test = max(1, round(n * fraction))
    return torch.sort(perm[n_test:]).values, torch.sort(perm[:n_test]).values


def _make(name: str, classes: Sequence[str], resolution: int, train_x: torch.Tensor, train_y: torch.Tensor,
          test_x: torch.Tensor, test_y: torch.Tensor, holdout: Optional[float], seed: int,
          limit: Optional[int]) -> Dataset:
    if len(train_y) < 2:
        raise UserError(f"{name}: only {len(train_y)} training image(s); need at least 2 to carve a holdout")
    train_x, test_x = _resize(train_x, resolution), _resize(test_x, resolution)
    perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    n_hold = holdout_size(len(train_y), holdout)
    hold_idx, train_idx = torch.sort(perm[:n_hold]).values, perm[n_hold:]
    if limit is not None:
        train_idx = train_idx[:limit]
    train_idx = torch.sort(train_idx).values
    train = _subset(train_x, train_y, train_idx)
    stats = train.images[: 20000].float().div(255.0)
    mean = tuple(stats.mean(dim=(0, 2, 3)).tolist())
    std = tuple(max(s, 1e-3) for s in stats.std(dim=(0, 2, 3)).tolist())
    return Dataset(name=name, classes=tuple(classes), resolution=resolution, train=train,
                   holdout=_subset(train_x, train_y, hold_idx),
                   test=Split(test_x, test_y, torch.arange(len(test_y))), mean=mean, std=std)


# --- sources ---------------------------------------------------------------------------------------------


def _digits() -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("--data digits needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    x = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = _fixed_test(len(y))
    return [str(i) for i in range(10)], x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file (MNIST format: 0, 0, dtype 0x08 = ubyte, ndim, big-endian uint32 sizes, data)."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise UserError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'}); "
                        f"expected the Fashion-MNIST/MNIST IDX format")
    if raw[2] != 0x08:
        raise UserError(f"{path}: IDX data type 0x{raw[2]:02x} is not unsigned bytes (0x08)")
    if raw[3] != ndim:
        raise UserError(f"{path}: IDX file has {raw[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: IDX header is truncated")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise UserError(f"{path}: IDX header says {'x'.join(map(str, shape))} = {size} bytes of data, "
                        f"the file has {len(raw) - header}; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise UserError(f"{folder}: missing {stem}(.gz); a Fashion-MNIST folder holds train-images-idx3-ubyte, "
                    f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (apt-get install "
                    f"dataset-fashion-mnist puts them in {FASHION_MNIST_DIR})")


def _idx_pair(folder: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    images_path, labels_path = (_find(folder, f"{prefix}-images-idx3-ubyte"),
                                _find(folder, f"{prefix}-labels-idx1-ubyte"))
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise UserError(f"{images_path}: {len(images)} images but {labels_path.name} has {len(labels)} labels")
    if labels.size and labels.max() >= 10:
        raise UserError(f"{labels_path}: label {labels.max()} out of range 0-9")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _fashion(folder: Path):
    _require_dir(folder, "fashion-mnist")
    train_x, train_y = _idx_pair(folder, "train")
    test_x, test_y = _idx_pair(folder, "t10k")
    return list(FASHION_CLASSES), train_x, train_y, test_x, test_y


def _only(keep: Sequence[int], classes: Sequence[str], train_x: torch.Tensor, train_y: torch.Tensor,
          test_x: torch.Tensor, test_y: torch.Tensor
          ) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The images of classes `keep` alone, relabelled 0..len(keep)-1 in that order (their positions, `Split.index`,
    are then within the subset)."""
    relabel = torch.full((len(classes),), -1, dtype=torch.long)
    relabel[list(keep)] = torch.arange(len(keep))
    train, test = relabel[train_y] >= 0, relabel[test_y] >= 0
    return ([classes[k] for k in keep], train_x[train], relabel[train_y[train]], test_x[test],
            relabel[test_y[test]])


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles; allow only what numpy arrays need, never arbitrary code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise UserError(f"{path}: missing; a CIFAR-10 folder holds data_batch_1..5 and test_batch "
                        f"(the 'python version' archive, extracted)")
    try:
        data = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        x = np.asarray(data[b"data"], dtype=np.uint8)
        y = np.asarray(data[b"labels"], dtype=np.int64)
    except Exception as exc:  # malformed pickles raise many types
        raise UserError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {str(exc)[:120]})") from None
    if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
        raise UserError(f"{path}: expected data of shape N x 3072 with N labels, got {x.shape} and {len(y)} labels")
    if y.size and (y.min() < 0 or y.max() >= 10):
        raise UserError(f"{path}: labels out of range 0-9")
    return x.reshape(-1, 3, 32, 32), y


def _cifar10(folder: Path):
    _require_dir(folder, "cifar10")
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    parts = [_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = _cifar_batch(folder / "test_batch")
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train_x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    train_y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return classes, train_x, train_y, torch.from_numpy(test_x.copy()), torch.from_numpy(test_y)


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_images(folder: Path, classes: list[str], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UserError("--data imagefolder needs Pillow: pip install pillow") from None
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
            if (folder / name).is_dir() else []
        if not files:
            raise UserError(f"{folder / name}: class folder has no images ({', '.join(IMAGE_SUFFIXES[:4])}, ...)")
        for path in files:
            try:
                with Image.open(path) as img:
                    rgb = img.convert("RGB").resize((resolution, resolution), Image.Resampling.BILINEAR)
                    images.append(np.asarray(rgb, dtype=np.uint8))
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                raise UserError(f"{path}: cannot read the image ({exc})") from None
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64)


def _imagefolder(folder: Path, resolution: int):
    _require_dir(folder, "imagefolder")
    for train_name, test_name in (("train", "test"), ("train", "val")):
        if (folder / train_name).is_dir() and (folder / test_name).is_dir():
            classes = [p.name for p in _class_folders(folder / train_name)]
            if not classes:
                raise UserError(f"{folder / train_name}: no class sub-folders; put each class's images in "
                                f"{folder / train_name}/<class>/")
            train_x, train_y = _read_images(folder / train_name, classes, resolution)
            test_x, test_y = _read_images(folder / test_name, classes, resolution)
            return classes, train_x, train_y, test_x, test_y
    classes = [p.name for p in _class_folders(folder)]
    if not classes:
        raise UserError(f"{folder}: empty imagefolder, no class sub-folders; put each class's images in "
                        f"{folder}/<class>/")
    x, y = _read_images(folder, classes, resolution)
    train_idx, test_idx = _fixed_test(len(y))
    return classes, x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def _require_dir(folder: Path, kind: str) -> None:
    if not folder.exists():
        raise UserError(f"{folder}: no such folder for --data {kind}:DIR; check the path")
    if not folder.is_dir():
        raise UserError(f"{folder}: is a file, --data {kind}:DIR needs a folder")


def load_dataset(source: str, resolution: int = 32, holdout: Optional[float | int] = 0.1, seed: int = 0,
                 limit: Optional[int] = None) -> Dataset:
    """Load `source` (see the module doc) with images resized to `resolution`; `holdout` is the fraction
    (a float) or number (an int) of the training images set aside by `seed`, None for
    `default_holdout_images`; `limit` caps the training images left after that (for quick runs)."""
    if not isinstance(resolution, int) or not 4 <= resolution <= 1024:
        raise UserError(f"training resolution must be an integer between 4 and 1024, got {resolution!r}")
    if isinstance(holdout, int) and not isinstance(holdout, bool):
        if holdout < 0:
            raise UserError(f"holdout must be a fraction in [0, 1) or a number of images >= 0, got {holdout}")
    elif holdout is not None and not 0.0 <= holdout < 1.0:
        raise UserError(f"holdout fraction must be in [0, 1), got {holdout}; or give a whole number of images")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1 training image, got {limit}")
    kind, _, arg = source.partition(":")
    kind = kind.strip().lower()
    if kind == "digits" and not arg:
        classes, *arrays = _digits()
    elif kind in ("fashion-mnist", "fashion-mnist-tops"):
        classes, *arrays = _fashion(Path(arg or FASHION_MNIST_DIR).expanduser())
        if kind == "fashion-mnist-tops":
            classes, *arrays = _only(FASHION_TOPS, classes, *arrays)
    elif kind in ("cifar10", "imagefolder"):
        if not arg:
            raise UserError(f"--data {kind} needs a folder: --data {kind}:DIR")
        folder = Path(arg).expanduser()
        classes, *arrays = _cifar10(folder) if kind == "cifar10" else _imagefolder(folder, resolution)
    else:
        raise UserError(f"unknown dataset {source!r}; use {SOURCES_HELP}")
    train_x, train_y, test_x, test_y = arrays
    return _make(kind, classes, resolution, train_x, train_y, test_x, test_y, holdout, seed, limit)
