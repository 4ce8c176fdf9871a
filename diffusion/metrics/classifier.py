"""``fd_classifier``: the Frechet distance and KID on the penultimate features of a small classifier trained on the
dataset's own training split. MNIST-scale papers measure samples this way, with a LeNet's features where ImageNet
papers use Inception's: nothing is downloaded, and the network sees the data at its own size and channels.

    feature, info = trained_classifier(data_cfg, cache_dir)     # trained once per data setting, read from the cache after
    fid_kid(real, fake, feature)                                 # diffusion.metrics.fid: FD ("fid") and KID on its features

FD = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) between Gaussians fitted to the two feature sets (Heusel et
al. 2017, eq. 6); KID is the unbiased MMD^2 with the kernel (x.y / d + 1)^3 (Binkowski et al. 2018), both computed
by torchmetrics.

The classifier (:class:`LeNet`: two 5x5 convolutions with max-pooling, as LeCun et al. 1998, then a 64-unit layer
whose ReLU output, scaled to mean square 1, is the feature vector) is trained with Adam on the training split's class
labels for ``epochs`` epochs or ``max_steps`` steps, whichever comes first, from the seed ``seed`` (initial weights
and batch order): the same settings give the same classifier on the same device. Its accuracy on the validation
split is reported with every value: features that cannot tell the classes apart cannot tell good samples from bad.

Cache: ``<cache_dir>/classifiers/<data name>-<key>.pt``; the key hashes the data settings that fix the images and the
split (all but loader settings) and the training options. The file holds the state_dict, those settings and the
accuracies; it is written under a temporary name and renamed into place, and a file whose settings differ from the
ones asked for is never used.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("diffusion.metrics")

#: bump when the architecture or the training recipe changes: older cache entries are then not used
VERSION = 1
#: the training options and their defaults (conf/classifier/lenet.yaml sets them from the command line)
DEFAULTS = {"epochs": 20, "max_steps": 3000, "batch_size": 64, "lr": 1e-3, "seed": 0, "width": 16, "num_features": 64}
#: what a cache entry holds
ENTRY_KEYS = ("state_dict", "spec", "in_channels", "num_classes", "accuracy", "train_accuracy", "feature_scale",
              "num_train", "num_val", "train_seconds")
#: data settings that change how batches are served, not which images the training split holds nor their labels
#: (``conditional`` only makes the loaders yield the labels too: the classifier of a class-conditional run is the
#: one of the same data unconditioned)
LOADER_KEYS = ("batch_size", "num_workers", "download", "decode_workers", "hflip", "cache_dir", "conditional")
#: the accuracy below which the metric's value is flagged as unreliable (a warning)
LOW_ACCURACY = 0.9

__all__ = ["CONFIDENT", "DEFAULTS", "LeNet", "PenultimateFeatures", "accuracy", "check_labels", "check_options", "class_confidence",
           "class_sums", "classifier_spec", "labelled_datamodule", "merge_confidence", "set_up_datamodule", "split_images",
           "train_classifier", "trained_classifier", "within_class_diversity"]


class LeNet(nn.Module):
    """A LeNet-like CNN on uint8 (or [-1, 1] float) images of any size: conv5-ReLU-pool, conv5-ReLU-pool, average
    pooling to 4 x 4, ``num_features`` ReLU units (the features), a linear layer to the classes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, num_features: int = 64):
        super().__init__()
        self.in_channels, self.num_classes, self.num_features = in_channels, num_classes, num_features
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * width * 16, num_features), nn.ReLU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] -> float [-1, 1]; grey images given as 3 equal channels (FID's input) back to one."""
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        if x.shape[1] != self.in_channels:
            x = x.mean(1, keepdim=True) if self.in_channels == 1 else x.expand(-1, self.in_channels, -1, -1)
        return x

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.prepare(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.penultimate(x))


class PenultimateFeatures(nn.Module):
    """The feature extractor torchmetrics' FID/KID take: images -> the classifier's ``num_features`` features,
    divided by ``scale``, their root-mean-square over the training images: features of mean square 1, as KID's
    kernel (x.y / d + 1)^3 assumes (with raw ReLU activations of size ~10 the cubic kernel is dominated by the
    norms), and FD in units of that mean square on every dataset. One scale for all features: distances keep
    their geometry."""

    def __init__(self, classifier: LeNet, scale: float = 1.0):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.num_features
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.penultimate(x) / self.scale

    def train(self, mode: bool = True):  # always in eval mode (torchmetrics may call .train())
        return super().train(False)


# ----------------------------------------------------------------------------------------------- data
def _plain(config) -> dict:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)


def check_labels(data_cfg) -> None:
    """ValueError (one line) unless the data source of ``data_cfg`` gives class labels (a source that always has
    them, or any data with ``conditional: true``, e.g. image folders with class subfolders); nothing is loaded."""
    from hydra.utils import get_class

    config = _plain(data_cfg)
    target = config.get("_target_")
    if target is None or not (getattr(get_class(target), "has_labels", False) or config.get("conditional") is True):
        raise ValueError(f"metric fd_classifier needs class labels to train its classifier, and data {target} has none "
                         "(digits, mnist and fashion_mnist have them, folders with data.conditional=true): use metric "
                         "fid with the Inception weights (fid.weights=PATH)")


def set_up_datamodule(data_cfg):
    """The data module of ``data_cfg`` with its images loaded and split (``prepare_data`` and ``setup``)."""
    from hydra.utils import instantiate

    datamodule = instantiate(_plain(data_cfg))
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def labelled_datamodule(data_cfg):
    """:func:`set_up_datamodule`, after checking that the source has class labels (ValueError otherwise)."""
    check_labels(data_cfg)
    return set_up_datamodule(data_cfg)


def split_images(datamodule, split: str, max_images: int | None = None) -> torch.Tensor:
    """The first ``max_images`` (None: all) uint8 images of the ``train`` or ``val`` split, unflipped."""
    dataset = datamodule.val_set if split == "val" else datamodule.train_set
    indices = dataset.indices if max_images is None else dataset.indices[:max_images]
    return torch.from_numpy(np.ascontiguousarray(dataset.images[np.asarray(indices)]))


# ----------------------------------------------------------------------------------------------- training
def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int, max_steps: int,
                     batch_size: int, lr: float, seed: int, width: int, num_features: int,
                     device: torch.device | str = "cpu") -> LeNet:
    """Cross-entropy training with Adam on uint8 ``images``; initial weights and batch order from ``seed``."""
    from tqdm.auto import tqdm

    with torch.random.fork_rng(devices=[]):  # the caller's global generator is left as it was
        torch.manual_seed(seed)
        net = LeNet(images.shape[1], num_classes, width, num_features)
    net.to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    n = len(images)
    total = min(epochs * math.ceil(n / batch_size), max_steps)
    images, labels = images.to(device), labels.to(device)
    step = 0
    with tqdm(total=total, desc=f"training the fd_classifier LeNet on {n} images", unit="step") as bar:
        while step < total:
            for idx in torch.randperm(n, generator=order).split(batch_size):
                idx = idx.to(device)
                loss = F.cross_entropy(net(images[idx]), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                if step == total:
                    break
    return net.eval()


@torch.inference_mode()
def feature_scale(net: LeNet, images: torch.Tensor, batch_size: int = 256) -> float:
    """The root-mean-square of the penultimate features over ``images``."""
    device = next(net.parameters()).device
    total = sum(float(net.penultimate(images[i : i + batch_size].to(device)).double().pow(2).sum())
                for i in range(0, len(images), batch_size))
    return max(math.sqrt(total / (len(images) * net.num_features)), 1e-12)


#: the probability above which a classification counts as confident (``class_confidence``)
CONFIDENT = 0.8


@torch.inference_mode()
def class_confidence(net: LeNet, images: torch.Tensor, threshold: float = CONFIDENT, batch_size: int = 256) -> dict:
    """How sure the classifier is of ``images`` (uint8 or [-1, 1]): ``confident``, the fraction whose most likely class
    has softmax probability > ``threshold`` (a sample a person reads as some digit at a glance); ``histogram``, the
    fraction of images predicted as each class; ``class_kl``, KL(histogram || uniform) = sum_k h_k log(K h_k) in nats
    (0: every class equally often; log K: one class only), the mode coverage of a generator."""
    device = next(net.parameters()).device
    top, predicted = [], []
    for start in range(0, len(images), batch_size):
        probs = net(images[start : start + batch_size].to(device)).softmax(1).cpu()
        p, k = probs.max(1)
        top.append(p)
        predicted.append(k)
    top, predicted = torch.cat(top), torch.cat(predicted)
    histogram = torch.bincount(predicted, minlength=net.num_classes).double() / len(images)
    return {"confident": float((top > threshold).double().mean()), "class_kl": kl_to_uniform(histogram),
            "histogram": histogram.tolist(), "threshold": threshold, "n": len(images)}


def kl_to_uniform(histogram: torch.Tensor) -> float:
    """KL(h || uniform) = sum_k h_k log(K h_k) in nats, empty classes contributing 0."""
    nonzero = histogram[histogram > 0]
    return float((nonzero * (nonzero * len(histogram)).log()).sum())


def merge_confidence(parts: list[dict]) -> dict:
    """:func:`class_confidence` of the union of disjoint image sets, from each set's result (e.g. the DDP ranks')."""
    n = sum(p["n"] for p in parts)
    confident = sum(p["confident"] * p["n"] for p in parts) / n
    histogram = (sum(torch.tensor(p["histogram"], dtype=torch.float64) * p["n"] for p in parts) / n)
    return {"confident": confident, "class_kl": kl_to_uniform(histogram), "histogram": histogram.tolist(),
            "threshold": parts[0]["threshold"], "n": n}


@torch.inference_mode()
def class_sums(feature: PenultimateFeatures, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
               batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per-class sums over ``images`` grouped by ``labels`` (the class each was drawn for, or its true class), float64
    on the CPU, that add up over disjoint image sets (DDP ranks): ``count`` (K,), ``correct`` (K,), the images the
    classifier (``feature.classifier``, argmax of its logits) labels as their class, ``feature_sum`` (K, D), the sum
    of the features ``feature(x)`` (the scaled penultimate features of the FD), and ``square_sum`` (K,), the sum of
    their squared norms: what :func:`within_class_diversity` needs."""
    device = next(feature.parameters()).device
    count = torch.zeros(num_classes, dtype=torch.float64)
    correct = torch.zeros(num_classes, dtype=torch.float64)
    square_sum = torch.zeros(num_classes, dtype=torch.float64)
    feature_sum = None
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].long().cpu()
        f = feature(x).double().cpu()
        hit = (feature.classifier(x).argmax(1).cpu() == y).double()
        if feature_sum is None:
            feature_sum = torch.zeros(num_classes, f.shape[1], dtype=torch.float64)
        count.index_add_(0, y, torch.ones(len(y), dtype=torch.float64))
        correct.index_add_(0, y, hit)
        feature_sum.index_add_(0, y, f)
        square_sum.index_add_(0, y, f.pow(2).sum(1))
    if feature_sum is None:  # no images (a rank without any): the width from one blank image
        width = feature(torch.zeros(1, *images.shape[1:], dtype=images.dtype, device=device)).shape[1]
        feature_sum = torch.zeros(num_classes, width, dtype=torch.float64)
    return {"count": count, "correct": correct, "feature_sum": feature_sum, "square_sum": square_sum}


def within_class_diversity(sums: dict[str, torch.Tensor]) -> list[float | None]:
    """For each class of :func:`class_sums`, the root-mean-square Euclidean distance between the features of two
    distinct images of the class: sqrt(mean over the n (n - 1) / 2 pairs i < j of |f_i - f_j|^2), from the sums as
    sqrt(2 (n sum |f|^2 - |sum f|^2) / (n (n - 1))) (= sqrt(2 tr Cov), Cov the unbiased covariance of the class's
    features); None for a class with fewer than 2 images. 0: all the class's images look the same to the classifier."""
    n, s1, s2 = sums["count"], sums["feature_sum"], sums["square_sum"]
    out = []
    for k in range(len(n)):
        nk = float(n[k])
        if nk < 2:
            out.append(None)
            continue
        total = nk * float(s2[k]) - float(s1[k].pow(2).sum())  # sum over pairs i < j of |f_i - f_j|^2
        out.append(math.sqrt(max(2.0 * total / (nk * (nk - 1)), 0.0)))
    return out


@torch.inference_mode()
def accuracy(net: LeNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float | None:
    """The fraction of ``images`` classified as their label (None for no images)."""
    if len(images) == 0:
        return None
    device = next(net.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = net(images[start : start + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == labels[start : start + batch_size]).sum())
    return correct / len(images)


def classifier_spec(data_cfg, options: dict) -> dict:
    """What a cached classifier depends on: the data settings (all but :data:`LOADER_KEYS`) and the training options."""
    data = {k: v for k, v in sorted(_plain(data_cfg).items()) if k not in LOADER_KEYS}
    return {"version": VERSION, "data": data, "training": dict(sorted(options.items()))}


def check_options(options: dict) -> dict:
    """The training options with their defaults filled in; ValueError (one line) for an unknown or bad one."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"classifier.{unknown[0]} is not an option: the classifier takes {', '.join(DEFAULTS)}")
    merged = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    for key, value in merged.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key == "lr":
            if not number or not math.isfinite(value) or value <= 0:
                raise ValueError(f"classifier.lr={value!r} is invalid: it must be a number > 0")
            merged[key] = float(value)
        elif key == "seed":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"classifier.seed={value!r} is invalid: it must be an integer")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"classifier.{key}={value!r} is invalid: it must be a positive integer")
    return merged


def _read_entry(path: Path, spec: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable entry is rebuilt, never trusted
        log.warning("fd_classifier: cache entry %s is unreadable: training a new classifier", path)
        return None
    if not isinstance(entry, dict) or entry.get("spec") != spec or not set(ENTRY_KEYS) <= set(entry):
        log.warning("fd_classifier: cache entry %s was trained for other settings: training a new classifier", path)
        return None
    return entry


def _write_entry(path: Path, entry: dict) -> None:
    """torch.save to a temporary name in the same folder, then an atomic rename: never a half-written entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(entry, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def trained_classifier(data_cfg, cache_dir: str | Path, device: torch.device | str = "cpu", datamodule=None,
                       **options) -> tuple[PenultimateFeatures, dict]:
    """The feature extractor of the classifier for ``data_cfg`` (a data config: ``_target_`` and its settings) and
    what it is: ``{"accuracy": validation accuracy, "train_accuracy", "path": its cache file, "trained": whether this
    call trained it, ...}``. Read from ``cache_dir`` when an entry for these settings exists; otherwise trained on
    ``device`` and cached. ``datamodule``: the set-up data module of ``data_cfg``, if the caller has one.
    ValueError (one line) for a data source without labels or a bad option."""
    options = check_options(options)
    spec = classifier_spec(data_cfg, options)
    from diffusion.data.cache import cache_key

    name = str(spec["data"].get("dataset") or str(spec["data"].get("_target_", "data")).rsplit(".", 1)[-1])
    path = Path(cache_dir).expanduser() / "classifiers" / f"{name}-{cache_key(spec)}.pt"
    entry = _read_entry(path, spec)
    trained = entry is None
    if trained:
        if datamodule is None:
            datamodule = labelled_datamodule(data_cfg)
        else:
            check_labels(data_cfg)
        x_train, y_train = split_images(datamodule, "train"), torch.from_numpy(datamodule.split_labels("train"))
        x_val, y_val = split_images(datamodule, "val"), torch.from_numpy(datamodule.split_labels("val"))
        num_classes = int(max(y_train.max(), y_val.max() if len(y_val) else 0)) + 1
        start = time.perf_counter()
        training = {k: options[k] for k in ("epochs", "max_steps", "batch_size", "lr", "seed", "width", "num_features")}
        net = train_classifier(x_train, y_train, num_classes, device=device, **training)
        entry = {
            "state_dict": {k: v.cpu() for k, v in net.state_dict().items()},
            "spec": spec,
            "in_channels": int(x_train.shape[1]),
            "num_classes": num_classes,
            "accuracy": accuracy(net, x_val, y_val),
            "train_accuracy": accuracy(net, x_train, y_train),
            "feature_scale": feature_scale(net, x_train),
            "num_train": len(x_train),
            "num_val": len(x_val),
            "train_seconds": time.perf_counter() - start,
        }
        _write_entry(path, entry)
        log.info("fd_classifier: trained on %d %s images in %.1f s, validation accuracy %s; cached in %s", len(x_train),
                 name, entry["train_seconds"], _percent(entry["accuracy"]), path)
    else:
        log.info("fd_classifier: classifier read from %s (validation accuracy %s)", path, _percent(entry["accuracy"]))
    net = LeNet(entry["in_channels"], entry["num_classes"], options["width"], options["num_features"])
    net.load_state_dict(entry["state_dict"])
    if entry["accuracy"] is not None and entry["accuracy"] < LOW_ACCURACY:
        log.warning("fd_classifier: the classifier's validation accuracy is only %s: its features may not separate "
                    "good samples from bad (train longer: classifier.epochs, classifier.max_steps)", _percent(entry["accuracy"]))
    info = {k: entry[k] for k in ("accuracy", "train_accuracy", "num_train", "num_val", "num_classes")}
    info.update(path=str(path), trained=trained, features=options["num_features"])
    return PenultimateFeatures(net.to(device), entry["feature_scale"]), info


def _percent(value: float | None) -> str:
    return "n/a (no validation images)" if value is None else f"{100 * value:.2f}%"
