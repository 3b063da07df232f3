"""Datasets: shapes, labels, disjoint seeded splits, and one clear error per kind of broken input."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mnv3_search import UserError
from mnv3_search.data import FASHION_MNIST_DIR, batches, load_dataset


def _idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def _fake_fashion(folder: Path, n_train: int = 50, n_test: int = 20, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        _idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)
    return folder


def _png_folder(folder: Path, classes: dict[str, int], size: int = 12) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            mode = "L" if i % 2 else "RGB"
            shape = (size, size + i) if mode == "L" else (size + i, size, 3)
            Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8), mode).save(folder / name / f"{i}.png")
    return folder


# --- digits ----------------------------------------------------------------------------------------------


def test_digits_shapes_labels_and_splits() -> None:
    data = load_dataset("digits", resolution=16, holdout=0.1, seed=3)
    assert data.num_classes == 10 and data.resolution == 16
    assert len(data.train) + len(data.holdout) + len(data.test) == 1797
    assert data.train.images.shape == (len(data.train), 1, 16, 16) and data.train.images.dtype == torch.uint8
    for split in (data.train, data.holdout, data.test):
        assert split.labels.min() >= 0 and split.labels.max() <= 9
    assert not set(data.train.index.tolist()) & set(data.holdout.index.tolist())
    assert len(data.holdout) == round(0.1 * (len(data.train) + len(data.holdout)))
    x, y = next(batches(data, data.train, 32))
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 2])  # grayscale becomes 3 equal channels


def test_seed_decides_the_holdout_but_never_the_test_split() -> None:
    a, b, c = (load_dataset("digits", resolution=8, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.holdout.index, b.holdout.index) and torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.holdout.index, c.holdout.index)
    assert torch.equal(a.test.images, c.test.images)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    first = [y for _, y in batches(a, a.train, 64, shuffle=True, generator=g1)]
    second = [y for _, y in batches(a, a.train, 64, shuffle=True, generator=g2)]
    assert all(torch.equal(p, q) for p, q in zip(first, second))


def test_limit_and_drop_last() -> None:
    data = load_dataset("digits", resolution=8, limit=100)
    assert len(data.train) == 100
    assert [len(y) for _, y in batches(data, data.train, 32, drop_last=True)] == [32, 32, 32]


# --- Fashion-MNIST (IDX) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path: Path, gz: bool) -> None:
    folder = _fake_fashion(tmp_path / "fm", gz=gz)
    data = load_dataset(f"fashion-mnist:{folder}", resolution=32, holdout=0.2, seed=0)
    assert data.classes[0] == "T-shirt/top" and data.num_classes == 10
    assert (len(data.train), len(data.holdout), len(data.test)) == (40, 10, 20)
    assert data.test.images.shape == (20, 1, 32, 32)
    assert not set(data.train.index.tolist()) & set(data.holdout.index.tolist())


def test_fashion_mnist_tops_keeps_four_classes_relabelled(tmp_path: Path) -> None:
    # labels 0..9 repeating: of 50 training and 20 test images, classes 0, 2, 4, 6 hold 5 and 2 each
    folder = _fake_fashion(tmp_path / "fm")
    tops = load_dataset(f"fashion-mnist-tops:{folder}", resolution=28, holdout=4, seed=0)
    full = load_dataset(f"fashion-mnist:{folder}", resolution=28, holdout=0.2, seed=0)
    assert tops.name == "fashion-mnist-tops"
    assert tops.classes == ("T-shirt/top", "Pullover", "Coat", "Shirt") and tops.num_classes == 4
    assert (len(tops.train), len(tops.holdout), len(tops.test)) == (16, 4, 8)
    assert tops.test.labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    # the test images are Fashion-MNIST's of those classes, in order: test images 0, 2, 4, 6, 10, 12, 14, 16
    assert torch.equal(tops.test.images, full.test.images[[0, 2, 4, 6, 10, 12, 14, 16]])
    assert sorted(torch.cat([tops.train.labels, tops.holdout.labels]).tolist()) == sorted([0, 1, 2, 3] * 5)
    assert not set(tops.train.index.tolist()) & set(tops.holdout.index.tolist())


def test_corrupt_idx_header_names_the_file(tmp_path: Path) -> None:
    folder = _fake_fashion(tmp_path / "fm", gz=False)
    bad = folder / "train-images-idx3-ubyte"
    raw = bytearray(bad.read_bytes())
    raw[0] = 7
    bad.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte: not an IDX file \(bad magic"):
        load_dataset(f"fashion-mnist:{folder}")


def test_truncated_idx_says_so(tmp_path: Path) -> None:
    folder = _fake_fashion(tmp_path / "fm", gz=False)
    bad = folder / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte: IDX header says 20x28x28"):
        load_dataset(f"fashion-mnist:{folder}")


def test_missing_idx_file_and_missing_dir(tmp_path: Path) -> None:
    folder = _fake_fashion(tmp_path / "fm")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="missing t10k-labels-idx1-ubyte"):
        load_dataset(f"fashion-mnist:{folder}")
    with pytest.raises(UserError, match="nowhere: no such folder for --data fashion-mnist"):
        load_dataset(f"fashion-mnist:{tmp_path / 'nowhere'}")


@pytest.mark.slow
@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="apt package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_default_folder() -> None:
    data = load_dataset("fashion-mnist", resolution=8, holdout=0.1)
    assert (len(data.train), len(data.holdout), len(data.test)) == (54000, 6000, 10000)
    tops = load_dataset("fashion-mnist-tops", resolution=8, holdout=1000)
    assert tops.classes == ("T-shirt/top", "Pullover", "Coat", "Shirt")
    assert (len(tops.train), len(tops.holdout), len(tops.test)) == (23000, 1000, 4000)
    assert torch.bincount(torch.cat([tops.train.labels, tops.holdout.labels])).tolist() == [6000] * 4
    assert torch.bincount(tops.test.labels).tolist() == [1000] * 4


# --- CIFAR-10 and image folders -------------------------------------------------------------------------


def test_cifar10_python_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 6) for i in range(1, 6)] + [("test_batch", 4)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": list(range(n))}
        (tmp_path / name).write_bytes(pickle.dumps(batch, protocol=2))
    data = load_dataset(f"cifar10:{tmp_path}", resolution=16, holdout=0.1)
    assert len(data.train) + len(data.holdout) == 30 and len(data.test) == 4
    assert data.train.images.shape[1:] == (3, 16, 16)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(UserError, match="test_batch: expected data of shape N x 3072"):
        load_dataset(f"cifar10:{tmp_path}")


def test_cifar10_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / name).write_bytes(pickle.dumps({b"data": print}))
    with pytest.raises(UserError, match="data_batch_1: not a CIFAR-10 python batch"):
        load_dataset(f"cifar10:{tmp_path}")


def test_imagefolder(tmp_path: Path) -> None:
    folder = _png_folder(tmp_path / "imgs", {"cat": 6, "dog": 4, "eel": 5})
    data = load_dataset(f"imagefolder:{folder}", resolution=8, holdout=0.25)
    assert data.classes == ("cat", "dog", "eel")
    assert len(data.train) + len(data.holdout) + len(data.test) == 15
    assert data.train.images.shape[1:] == (3, 8, 8)
    assert set(torch.cat([data.train.labels, data.holdout.labels, data.test.labels]).tolist()) == {0, 1, 2}


def test_imagefolder_with_train_and_test_folders(tmp_path: Path) -> None:
    _png_folder(tmp_path / "train", {"a": 4, "b": 4})
    _png_folder(tmp_path / "val", {"a": 2, "b": 1})
    data = load_dataset(f"imagefolder:{tmp_path}", resolution=8, holdout=0.25)
    assert (len(data.train), len(data.holdout), len(data.test)) == (6, 2, 3)


def test_imagefolder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: empty imagefolder, no class sub-folders"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")
    (tmp_path / "empty" / "cat").mkdir()
    with pytest.raises(UserError, match="cat: class folder has no images"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")
    (tmp_path / "empty" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png: cannot read the image"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")


@pytest.mark.parametrize("source, message", [
    ("mnist", "unknown dataset 'mnist'; use digits"),
    ("cifar10", "needs a folder: --data cifar10:DIR"),
    ("imagefolder:/no/such/dir", "/no/such/dir: no such folder"),
])
def test_bad_sources(source: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_dataset(source)


def test_bad_options() -> None:
    with pytest.raises(UserError, match="holdout fraction"):
        load_dataset("digits", holdout=1.0)
    with pytest.raises(UserError, match="training resolution"):
        load_dataset("digits", resolution=2)
