"""Data modules on files the tests generate: image folders (mixed formats, a corrupt file) and MNIST IDX files."""

import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion.data.folder as folder_mod
from diffusion.data import DigitsDataModule, ImageFolderDataModule, TorchvisionDataModule, cache


def make_image_folder(root: Path) -> Path:
    """9 readable images of mixed sizes/modes/formats, 1 corrupt JPEG, 1 text file; dogs and cats by name."""
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)

    def rgb(h, w):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    Image.fromarray(rgb(40, 30)).save(root / "dog.1.png")
    Image.fromarray(rgb(50, 50)).convert("RGBA").save(root / "dog.2.png")
    Image.fromarray(rgb(100, 80)).save(root / "dog.3.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (60, 20), dtype=np.uint8), mode="L").save(root / "cat.1.png")
    Image.fromarray(rgb(64, 64)).convert("P").save(root / "cat.2.png")
    Image.fromarray(rgb(33, 77)).convert("CMYK").save(root / "cat.3.jpg")
    Image.fromarray(rgb(128, 96)).save(root / "sub" / "dog.4.jpeg")
    Image.fromarray(rgb(20, 20)).save(root / "sub" / "cat.4.bmp")
    Image.fromarray(np.full((70, 70, 3), 200, dtype=np.uint8)).save(root / "sub" / "white.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def image_root(tmp_path):
    return make_image_folder(tmp_path / "images")


def folder(root, tmp_path, **kw):
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    kw.setdefault("batch_size", 2)
    kw.setdefault("val_fraction", 0.25)
    kw.setdefault("decode_workers", 0)
    return ImageFolderDataModule(root=str(root), **kw)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("channels", [3, 1])
def test_folder_loads_through_the_real_path(image_root, tmp_path, size, channels):
    dm = folder(image_root, tmp_path, image_size=size, channels=channels)
    assert len(dm.files) == 10  # the text file is not an image; the corrupt one is found, then skipped
    with pytest.warns(UserWarning, match="1 of 10 image files could not be read"):
        dm.prepare_data()
    dm.setup()
    assert dm.num_skipped == 1
    assert len(dm.train_set) + len(dm.val_set) == 9
    assert (len(dm.train_set), len(dm.val_set)) == (7, 2)  # round(9 * 0.25) = 2
    batch = next(iter(dm.train_dataloader()))
    assert batch.dtype == torch.uint8 and batch.shape == (2, channels, size, size)
    everything = torch.stack([dm.train_set[i] for i in range(len(dm.train_set))] + [dm.val_set[i] for i in range(len(dm.val_set))])
    assert everything.float().std() > 10  # real content, not zeros
    # the uniform grey image keeps its value through resize and crop: 200 everywhere
    arr, _ = cache.load(dm.cache_dir, dm.name, dm.cache_spec)
    assert (np.asarray(arr) == 200).all(axis=(1, 2, 3)).sum() == 1


def test_class_filter_limit_and_split(image_root, tmp_path):
    dogs = folder(image_root, tmp_path, image_size=16, include=["dog.*"])
    assert dogs.files == ["dog.1.png", "dog.2.png", "dog.3.jpg", "sub/dog.4.jpeg"]
    cats_top = folder(image_root, tmp_path, image_size=16, include=["cat.*"], exclude=["sub/*"])
    assert cats_top.files == ["cat.1.png", "cat.2.png", "cat.3.jpg"]
    limited = folder(image_root, tmp_path, image_size=16, include=["dog.*"], limit=2, val_fraction=0.5, batch_size=1)
    limited.setup()
    assert limited.files == ["dog.1.png", "dog.2.png"] and (len(limited.train_set), len(limited.val_set)) == (1, 1)


def test_split_is_fixed_by_the_seed(image_root, tmp_path):
    a, b = folder(image_root, tmp_path, image_size=16, seed=1), folder(image_root, tmp_path, image_size=16, seed=1)
    c = folder(image_root, tmp_path, image_size=16, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dm in (a, b, c):
            dm.setup()
    assert list(a.val_set.indices) == list(b.val_set.indices)
    assert list(a.val_set.indices) != list(c.val_set.indices) or list(a.train_set.indices) != list(c.train_set.indices)


def test_cache_is_reused_and_invalidated(image_root, tmp_path, monkeypatch):
    calls = []
    real = folder_mod.decode_image
    monkeypatch.setattr(folder_mod, "decode_image", lambda *a: calls.append(a[0]) or real(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder(image_root, tmp_path, image_size=16).prepare_data()
        assert len(calls) == 10
        second = folder(image_root, tmp_path, image_size=16)
        second.prepare_data()
        second.setup()
        assert len(calls) == 10, "the second run must read the cache, not decode"
        folder(image_root, tmp_path, image_size=24).prepare_data()
        assert len(calls) == 20, "a new image size needs a new cache"
        folder(image_root, tmp_path, image_size=16, limit=5).prepare_data()
        assert len(calls) == 25, "a new limit needs a new cache"


def test_interrupted_cache_write_leaves_nothing_trusted(image_root, tmp_path, monkeypatch):
    dm = folder(image_root, tmp_path, image_size=16)

    def crash_midway(f, array):  # half the bytes reach the disk, then the process "dies"
        f.write(b"\x93NUMPY" + b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.np, "save", crash_midway)
    with warnings.catch_warnings(), pytest.raises(KeyboardInterrupt):
        warnings.simplefilter("ignore")
        dm.prepare_data()
    monkeypatch.undo()
    assert cache.load(dm.cache_dir, dm.name, dm.cache_spec) is None
    assert not list((tmp_path / "cache").glob("*.npy")) and not list((tmp_path / "cache").glob(".*tmp"))
    # a stale or truncated array under the final name is not trusted either
    array_path, meta_path = cache.entry_paths(dm.cache_dir, dm.name, dm.cache_spec)
    array_path.write_bytes(b"garbage")
    meta_path.write_text('{"spec": {}, "shape": [9, 3, 16, 16]}')
    assert cache.load(dm.cache_dir, dm.name, dm.cache_spec) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.prepare_data()
    images, meta = cache.load(dm.cache_dir, dm.name, dm.cache_spec)
    assert images.shape == (9, 3, 16, 16) and meta["skipped"] == 1


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(root="MISSING"), "does not exist"),
        (dict(root="EMPTY"), "holds no image files"),
        (dict(include=["horse.*"]), "match none of the 10 images"),
        (dict(image_size=0), "image_size=0"),
        (dict(channels=2), "channels=2"),
    ],
)
def test_folder_bad_input(image_root, tmp_path, kwargs, text):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    root = {"MISSING": tmp_path / "nope", "EMPTY": tmp_path / "empty"}.get(kwargs.pop("root", None), image_root)
    with pytest.raises(ValueError) as err:
        folder(root, tmp_path, **kwargs)
    assert text in str(err.value)
    if "root" in str(err.value):
        assert str(root.resolve()) in str(err.value)


# ----------------------------------------------------------------------------------------------- MNIST
def write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 + array.ndim))  # 0x08: unsigned byte; last byte: dimensions
        for dim in array.shape:
            f.write(struct.pack(">I", dim))
        f.write(array.astype(np.uint8).tobytes())


def make_mnist(root: Path, name: str = "MNIST", n: int = 40) -> np.ndarray:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 10
    raw = root / name / "raw"
    write_idx(raw / "train-images-idx3-ubyte", images)
    write_idx(raw / "train-labels-idx1-ubyte", labels)
    write_idx(raw / "t10k-images-idx3-ubyte", images[:10])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[:10])
    return images


@pytest.mark.parametrize("dataset, dirname", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
@pytest.mark.parametrize("size", [28, 32])
def test_torchvision_idx_files(tmp_path, dataset, dirname, size):
    images = make_mnist(tmp_path, dirname)
    dm = TorchvisionDataModule(dataset=dataset, root=str(tmp_path), image_size=size, batch_size=4, val_fraction=0.25)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (30, 10)
    batch = next(iter(dm.train_dataloader()))
    assert batch.dtype == torch.uint8 and batch.shape == (4, 1, size, size)
    if size == 28:  # no resize: the pixels are the file's
        i = dm.train_set.indices[0]
        assert torch.equal(dm.train_set[0][0], torch.from_numpy(images[i]))


def test_torchvision_class_filter_and_limit(tmp_path):
    make_mnist(tmp_path)
    threes = TorchvisionDataModule(root=str(tmp_path), classes=[3], batch_size=1, val_fraction=0.0)
    threes.setup()
    assert len(threes.train_set) == 4  # labels 3, 13, 23, 33
    limited = TorchvisionDataModule(root=str(tmp_path), limit=12, batch_size=1, val_fraction=0.25)
    limited.setup()
    assert len(limited.train_set) + len(limited.val_set) == 12


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(root="EMPTY"), "has no MNIST files"),
        (dict(dataset="cifar"), "dataset='cifar'"),
        (dict(classes=[11]), "classes=[11]"),
        (dict(image_size=-3), "image_size=-3"),
    ],
)
def test_torchvision_bad_input(tmp_path, kwargs, text):
    make_mnist(tmp_path / "ok")
    root = str(tmp_path / "empty") if kwargs.pop("root", None) else str(tmp_path / "ok")
    with pytest.raises(ValueError) as err:
        TorchvisionDataModule(root=root, **kwargs)
    assert text in str(err.value)


def test_digits_default():
    dm = DigitsDataModule(image_size=16, batch_size=32)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (1617, 180)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (32, 1, 16, 16) and batch.dtype == torch.uint8 and batch.max() > 200


@pytest.mark.parametrize("case", ["missing root", "no match", "no root given"])
def test_bad_data_on_the_command_line_exits_with_one_line(image_root, tmp_path, train_cli, case):
    overrides = {
        "missing root": ["data=folder", f"data.root={tmp_path / 'nope'}"],
        "no match": ["data=dog", f"data.root={image_root}", "data.include=[horse.*]"],
        "no root given": ["data=ffhq"],
    }[case]
    proc = train_cli(*overrides, "logger=none", f"hydra.run.dir={tmp_path / 'o'}")
    assert proc.returncode != 0 and "Traceback" not in proc.output
    expected = {"missing root": str(tmp_path / "nope"), "no match": "horse.*", "no root given": "data.root"}[case]
    assert expected in proc.stderr, proc.output[-2000:]
    assert not (tmp_path / "o" / "checkpoints").exists()
