"""data.conditional: batches of (images, labels) whose labels are the source's own (sklearn's digits targets, the IDX
label file, the folder or file name an image came from), kept by the folder cache, and one-line errors for data
without usable classes."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion.data.folder as folder_mod
from diffusion.data import DigitsDataModule, ImageFolderDataModule, TorchvisionDataModule, cache
from tests.data.test_data import write_idx


def _items(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (image, label) of a split, stacked."""
    pairs = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])


def _epoch(loader, epoch: int) -> list:
    it = iter(loader)  # as Lightning: the iterator first, set_epoch after
    loader.batch_sampler.sampler.set_epoch(epoch)
    return list(it)


def _check_batches(loader, label_of_image) -> int:
    """Every batch of an epoch is (uint8 (B, C, H, W), int64 (B,)) and each label is ``label_of_image(image)``."""
    n = 0
    for images, labels in _epoch(loader, 0):
        assert images.dtype == torch.uint8 and images.ndim == 4
        assert labels.dtype == torch.int64 and labels.shape == (len(images),)
        assert [int(y) for y in labels] == [label_of_image(x) for x in images]
        n += len(labels)
    return n


# ----------------------------------------------------------------------------------------------- digits
def test_digits_batches_carry_sklearns_targets():
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images.astype(np.float32) / 16 * 255).round().astype(np.uint8)  # image_size 8: no resize
    targets: dict[bytes, set[int]] = {}
    for image, target in zip(pixels, digits.target):
        targets.setdefault(image.tobytes(), set()).add(int(target))
    assert sum(len(t) > 1 for t in targets.values()) == 0  # no two digits share an image: the pixels name the target

    dm = DigitsDataModule(image_size=8, batch_size=64, conditional=True)
    assert dm.num_classes == 10 and dm.class_names == [str(k) for k in range(10)]  # before any image is loaded
    dm.setup()
    assert _check_batches(dm.train_dataloader(), lambda x: next(iter(targets[x[0].numpy().tobytes()]))) == 1600
    images, labels = _items(dm.val_set)
    assert torch.equal(labels, torch.from_numpy(digits.target[dm.val_set.indices]))
    assert torch.equal(images[:, 0], torch.from_numpy(pixels[dm.val_set.indices]))


def test_unconditional_digits_are_plain_image_batches_as_before(caplog):
    plain, cond = DigitsDataModule(image_size=16, batch_size=32), DigitsDataModule(image_size=16, batch_size=32, conditional=True)
    assert plain.num_classes is None and plain.class_names is None
    with caplog.at_level(logging.INFO, logger="diffusion.data"):
        plain.setup()
        cond.setup()
    batch, (images, _) = next(iter(plain.train_dataloader())), next(iter(cond.train_dataloader()))
    assert type(batch) is torch.Tensor and torch.equal(batch, images)  # the same images, in the same order
    assert type(plain.train_set[0]) is torch.Tensor
    messages = [r.getMessage() for r in caplog.records]
    assert "data digits: 1617 train / 180 val images of 1x16x16" in messages
    line = next(m for m in messages if "classes" in m)
    assert line.startswith("data digits: 10 classes, 1,617 train / 180 val images of 1x16x16") and "\n" not in line
    assert f"3 {np.bincount(cond.split_labels('train'))[3]}," in line


def test_mid_epoch_resume_gives_the_same_image_and_label_batches():
    def loader():
        dm = DigitsDataModule(batch_size=128, conditional=True, seed=5)
        dm.setup()
        return dm.train_dataloader()

    reference = _epoch(loader(), 1)
    first = loader()
    it = iter(first)
    first.batch_sampler.sampler.set_epoch(1)
    done = [next(it) for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 3}
    resumed = loader()
    resumed.load_state_dict(state)
    rest = _epoch(resumed, 1)
    assert len(reference) == 12 and len(rest) == 9
    for (x, y), (x_ref, y_ref) in zip(done + rest, reference):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


# ----------------------------------------------------------------------------------------------- MNIST IDX files
def _idx_files(root: Path, name: str, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    raw = root / name / "raw"
    write_idx(raw / "train-images-idx3-ubyte", images)
    write_idx(raw / "train-labels-idx1-ubyte", labels)
    write_idx(raw / "t10k-images-idx3-ubyte", images[:10])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[:10])
    return images, labels


@pytest.mark.parametrize("dataset, dirname", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_labels_are_the_label_files(tmp_path, dataset, dirname):
    import torchvision

    images, labels = _idx_files(tmp_path, dirname)
    label_of = {image.tobytes(): int(label) for image, label in zip(images, labels)}
    dm = TorchvisionDataModule(dataset=dataset, root=str(tmp_path), batch_size=8, val_fraction=0.2, conditional=True)
    names = torchvision.datasets.FashionMNIST.classes if dataset == "fashion_mnist" else [str(k) for k in range(10)]
    assert dm.num_classes == 10 and dm.class_names == names
    dm.setup()
    assert _check_batches(dm.train_dataloader(), lambda x: label_of[x[0].numpy().tobytes()]) == 48

    some = TorchvisionDataModule(dataset=dataset, root=str(tmp_path), batch_size=2, val_fraction=0.0, classes=[3, 7],
                                 conditional=True)
    some.setup()
    assert some.num_classes == 10 and some.class_names[3] == names[3]  # labels keep their values
    x, y = _items(some.train_set)
    assert sorted(y.tolist()) == sorted(labels[np.isin(labels, [3, 7])].tolist())
    assert [int(label) for label in y] == [label_of[image[0].numpy().tobytes()] for image in x]


# ----------------------------------------------------------------------------------------------- image folders
GREY = {"apple": 40, "banana": 120, "cherry": 200}  # each class's images: one constant grey level


def _png(path: Path, grey: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), grey, dtype=np.uint8), mode="L").save(path)


def _by_subfolder(root: Path) -> Path:
    """apple/ banana/ cherry/ with 4, 5, 3 images; banana/2.png, in the middle, is not an image."""
    for name, n in zip(GREY, (4, 5, 3)):
        for i in range(n):
            _png(root / name / f"{i}.png", GREY[name], size=8 + i)
    (root / "banana" / "2.png").write_bytes(b"\x89PNG not really")
    return root


def _by_name(root: Path) -> Path:
    """Kaggle's dogs-vs-cats naming (cat.1.png), some in a subfolder; cat.3.png, in the middle, is not an image."""
    for i in range(1, 6):
        _png(root / f"cat.{i}.png", 40)
        _png(root / ("dogs" if i > 3 else "") / f"dog.{i}.png", 200)
    (root / "cat.3.png").write_bytes(b"\x89PNG not really")
    return root


def _folder(root: Path, tmp_path: Path, **kw) -> ImageFolderDataModule:
    kw = {"cache_dir": str(tmp_path / "cache"), "batch_size": 2, "val_fraction": 0.25, "decode_workers": 0,
          "image_size": 8, "channels": 1, "conditional": True, **kw}
    return ImageFolderDataModule(root=str(root), **kw)


def _set_up(dm: ImageFolderDataModule) -> ImageFolderDataModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unreadable file
        dm.prepare_data()
        dm.setup()
    return dm


def _check_folder(dm: ImageFolderDataModule, label_of_grey: dict[int, int], counts: list[int]) -> np.ndarray:
    """Each image's label is the class of its grey level, in both splits and in the batches; the counts per class."""
    labels = []
    for split in (dm.train_set, dm.val_set):
        x, y = _items(split)
        assert (x == x[:, :1, :1, :1]).all()  # constant images
        assert y.tolist() == [label_of_grey[int(v)] for v in x[:, 0, 0, 0]]
        labels.append(y.numpy())
    _check_batches(dm.train_dataloader(), lambda x: label_of_grey[int(x[0, 0, 0])])
    labels = np.concatenate(labels)
    assert np.bincount(labels, minlength=len(counts)).tolist() == counts
    return labels


@pytest.mark.parametrize("how", ["subfolder", "class_from with a group", "class_from without a group"])
def test_folder_labels_follow_the_files_and_survive_the_cache(tmp_path, monkeypatch, how):
    if how == "subfolder":
        root, options, names, counts = _by_subfolder(tmp_path / "fruit"), {}, list(GREY), [4, 4, 3]
    else:
        pattern = r"^(cat|dog)\." if how == "class_from with a group" else r"cat|dog"
        root, options, names, counts = _by_name(tmp_path / "pets"), {"class_from": pattern}, ["cat", "dog"], [4, 5]
    grey_label = {GREY[n] if n in GREY else {"cat": 40, "dog": 200}[n]: k for k, n in enumerate(names)}

    dm = _folder(root, tmp_path, **options)
    assert dm.num_classes == len(names) and dm.class_names == names  # before decoding
    _set_up(dm)
    assert dm.num_skipped == 1
    labels = _check_folder(dm, grey_label, counts)
    _, meta = cache.load(dm.cache_dir, dm.name, dm.cache_spec)
    assert meta["class_names"] == names and len(meta["labels"]) == sum(counts)
    assert np.array_equal(dm.split_labels("train"), _items(dm.train_set)[1].numpy())

    def no_decoding(*args):
        raise AssertionError("decoded although the cache holds the images")

    monkeypatch.setattr(folder_mod, "decode_image", no_decoding)
    again = _folder(root, tmp_path, **options)
    again.class_names = None  # recovered from the cache
    assert np.array_equal(_check_folder(_set_up(again), grey_label, counts), labels)
    assert again.class_names == names and again.num_skipped == 1


def test_the_cache_key_follows_the_labels(tmp_path):
    """Moving a file to another class keeps the count and the first and last file names: a new entry all the same,
    whose labels are the new ones; and conditional / not, subfolders / class_from never share an entry."""
    root = _by_subfolder(tmp_path / "fruit")
    (root / "banana" / "2.png").unlink()
    before = _set_up(_folder(root, tmp_path))
    shutil.move(root / "apple" / "1.png", root / "cherry" / "1b.png")  # grey 40 in class cherry now
    after = _set_up(_folder(root, tmp_path))
    assert before.files[0] == after.files[0] and before.files[-1] == after.files[-1] and len(after.files) == 11
    assert before.cache_spec != after.cache_spec
    assert np.bincount(_items(after.train_set)[1].tolist() + _items(after.val_set)[1].tolist()).tolist() == [3, 4, 4]
    keys = {cache.cache_key(dm.cache_spec) for dm in (after, _folder(root, tmp_path, conditional=False),
                                                       _folder(root, tmp_path, class_from=r"^(\d)"))}
    assert len(keys) == 3


def test_a_write_killed_between_the_images_and_the_labels_leaves_nothing_trusted(tmp_path, monkeypatch):
    root = _by_subfolder(tmp_path / "fruit")
    dm = _folder(root, tmp_path)
    _set_up(dm)  # a complete entry first: the killed rewrite must not leave it trusted either
    real_save, calls = cache.np.save, []

    def dies_at_the_labels(f, array):
        calls.append(array.dtype)
        if array.dtype == np.int64:
            f.write(b"\x93NUMPY")
            raise KeyboardInterrupt
        real_save(f, array)

    monkeypatch.setattr(cache.np, "save", dies_at_the_labels)
    with pytest.raises(KeyboardInterrupt):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dm.build_cache()
    monkeypatch.undo()
    assert calls == [np.uint8, np.int64]  # the images were written, then the labels failed
    assert cache.load(dm.cache_dir, dm.name, dm.cache_spec) is None
    assert not list((tmp_path / "cache").glob("*.json")) and not list((tmp_path / "cache").glob(".*tmp"))
    rebuilt = _set_up(_folder(root, tmp_path))  # a later run decodes again and gets the right labels
    _check_folder(rebuilt, {40: 0, 120: 1, 200: 2}, [4, 4, 3])
    # labels of the right length but not the ones written are not trusted either
    labels_path = cache.labels_path(dm.cache_dir, dm.name, dm.cache_spec)
    np.save(labels_path, np.zeros(11, dtype=np.int64))
    assert cache.load(dm.cache_dir, dm.name, dm.cache_spec) is None


def _flat(root: Path) -> Path:
    for i in range(3):
        _png(root / f"cat.{i}.png", 40)
        _png(root / f"dog.{i}.png", 200)
    _png(root / "bird.0.png", 120)
    _png(root / "notes" / "bird.1.png", 120)
    return root


@pytest.mark.parametrize(
    "layout, options, text",
    [
        ("flat", {}, "and 7 of its 8 images lie directly in it (e.g. bird.0.png): put each class in its own subfolder, or pass data.class_from=<regex"),
        ("one class", {}, "data conditional=true needs at least 2 classes, and the 3 images under root="),
        ("one class", {"limit": 2}, "the 2 images (the first limit=2) under root="),
        ("flat", {"class_from": "(cat|dog"}, "data class_from='(cat|dog' is not a valid regular expression (missing ), unterminated subpattern"),
        ("flat", {"class_from": r"^(cat|dog)\."}, r"data class_from='^(cat|dog)\.' gives no class for 2 of the 8 images under root="),
        ("flat", {"class_from": "horse"}, "gives no class for 8 of the 8 images"),
        ("flat", {"class_from": r"^(cat|dog)\.", "conditional": False}, r"data class_from='^(cat|dog)\.' is only used with data.conditional=true"),
        ("flat", {"conditional": "yes"}, "data conditional='yes' is invalid: allowed values are true, false"),
    ],
    ids=["no class subfolders", "one class", "one class after limit", "invalid regex", "regex misses some",
         "regex misses all", "class_from without conditional", "conditional not a bool"],
)
def test_folder_classes_bad_input(tmp_path, monkeypatch, layout, options, text):
    root = _flat(tmp_path / "flat") if layout == "flat" else tmp_path / "one"
    if layout == "one class":
        for i in range(3):
            _png(root / "cat" / f"{i}.png", 40)
    monkeypatch.setattr(folder_mod, "decode_image", lambda *a: pytest.fail("decoded before refusing"))
    with pytest.raises(ValueError) as err:
        _folder(root, tmp_path, batch_size=1, **options)
    message = str(err.value)
    assert text in message and "\n" not in message
    if "gives no class" in message and "horse" not in message:
        assert "(e.g. bird.0.png)" in message
    assert not (tmp_path / "cache").exists()
