"""fd_classifier: a classifier trained on the data's own training split (accurate, cached, reused), whose features
give a Frechet distance that is small between real splits, large against noise and blur, and ranks a model's
samples in between; evaluate offers it."""

import json

import numpy as np
import pytest
import torch

from diffusion.data import TorchvisionDataModule
from diffusion.metrics import classifier as clf
from diffusion.metrics import fid_kid
from diffusion.plots.grids import to_uint8
from diffusion.sharing.checkpoints import read_checkpoint
from diffusion.training.module import DiffusionModule


@pytest.fixture(scope="module")
def data_cfg(ckpt):
    return read_checkpoint(ckpt)["hyper_parameters"]["data"]


@pytest.fixture(scope="module")
def splits(data_cfg):
    dm = clf.labelled_datamodule(data_cfg)
    return clf.split_images(dm, "val"), clf.split_images(dm, "train")


@pytest.fixture(scope="module")
def feature(data_cfg, classifier_cache):
    return clf.trained_classifier(data_cfg, classifier_cache)


def frechet_distance_float64(a: np.ndarray, b: np.ndarray) -> float:
    """Heusel et al. eq. 6 in float64 with scipy's matrix square root: a second implementation."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_the_classifier_is_accurate_cached_and_reused(data_cfg, classifier_cache, feature, monkeypatch, tmp_path):
    net, info = feature
    assert info["accuracy"] > 0.95, f"validation accuracy {info['accuracy']:.3f} on the digits default"
    assert info["num_val"] == 180 and info["num_train"] == 1617 and info["num_classes"] == 10
    entry = torch.load(info["path"], weights_only=True)
    assert entry["spec"]["data"]["image_size"] == 16 and entry["accuracy"] == info["accuracy"]
    assert "batch_size" not in entry["spec"]["data"], "loader settings do not change which classifier is trained"

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(clf, "train_classifier", no_training)
    again, info2 = clf.trained_classifier({**data_cfg, "batch_size": 7}, classifier_cache)
    assert not info2["trained"] and info2["path"] == info["path"] and info2["accuracy"] == info["accuracy"]
    x = torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again(x), net(x)), "the cached weights are the trained ones"
    with pytest.raises(AssertionError, match="trained again"):  # another data setting: another classifier
        clf.trained_classifier({**data_cfg, "seed": 43}, classifier_cache)
    with pytest.raises(AssertionError, match="trained again"):  # another training option: another classifier
        clf.trained_classifier(data_cfg, classifier_cache, epochs=3)


def test_a_damaged_or_foreign_cache_entry_is_never_used(data_cfg, feature, tmp_path, monkeypatch):
    from pathlib import Path

    _, info = feature
    path = tmp_path / "classifiers" / Path(info["path"]).name
    path.parent.mkdir()
    calls = []

    def quick(images, labels, num_classes, **kwargs):
        calls.append(len(images))
        return clf.LeNet(images.shape[1], num_classes, kwargs["width"], kwargs["num_features"]).eval()

    monkeypatch.setattr(clf, "train_classifier", quick)
    path.write_bytes(b"half a file")
    clf.trained_classifier(data_cfg, tmp_path)
    foreign = torch.load(path, weights_only=True)
    foreign["spec"] = {**foreign["spec"], "data": {**foreign["spec"]["data"], "image_size": 32}}
    torch.save(foreign, path)
    clf.trained_classifier(data_cfg, tmp_path)
    assert calls == [1617, 1617] and torch.load(path, weights_only=True)["spec"]["data"]["image_size"] == 16
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file is left behind"


def test_frechet_distance_is_small_between_real_splits_large_for_noise_and_blur(splits, feature):
    import torchvision.transforms.functional as TF

    val, train = splits
    net, _ = feature
    noise = torch.randint(0, 256, val.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    blurred = TF.gaussian_blur(val.float(), 5, 1.5).round().to(torch.uint8)
    fd = {name: fid_kid(val, other, net, ("fid",))["fid"] for name, other in
          (("train", train), ("blurred", blurred), ("noise", noise))}
    assert fd["train"] < 1.0 and fd["blurred"] > 5 * fd["train"] and fd["noise"] > 5 * fd["blurred"], fd
    # torchmetrics' value is the Frechet distance of these features (3 grey channels in, one seen), in float64
    with torch.inference_mode():
        a, b = net(val).double().numpy(), net(train).double().numpy()
    assert fd["train"] == pytest.approx(frechet_distance_float64(a, b), rel=1e-3)
    assert np.mean(a**2) == pytest.approx(1.0, rel=0.2), "features of mean square ~1 (the scale KID's kernel expects)"


def test_a_models_samples_rank_between_real_images_and_noise(ckpt, splits, feature):
    val, train = splits
    net, _ = feature
    module = DiffusionModule.from_checkpoint(ckpt)
    samples = to_uint8(module.sample(len(val), sampler=module.named_sampler("ddim", num_steps=5),
                                     generator=torch.Generator().manual_seed(0)).samples)
    noise = torch.randint(0, 256, val.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fd = [fid_kid(val, other, net, ("fid",))["fid"] for other in (train, samples, noise)]
    assert fd[0] < fd[1] < fd[2], fd


def test_labels_follow_the_images_through_classes_limit_and_split(tmp_path):
    from tests.data.test_data import make_mnist

    images = make_mnist(tmp_path, "MNIST")  # label of file image j: j % 10
    dm = TorchvisionDataModule(root=str(tmp_path), classes=[3, 7], limit=7, batch_size=2, val_fraction=0.3)
    dm.setup()
    for split in ("train", "val"):
        x, y = clf.split_images(dm, split), dm.split_labels(split)
        assert len(x) == len(y) > 0
        for image, label in zip(x, y):
            (j,) = [j for j in range(len(images)) if np.array_equal(images[j], image[0].numpy())]
            assert label == j % 10 and label in (3, 7)


def test_a_source_without_labels_is_refused_in_one_line():
    with pytest.raises(ValueError) as err:
        clf.check_labels({"_target_": "diffusion.data.ImageFolderDataModule", "root": "x"})
    assert "fd_classifier" in str(err.value) and "fid" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="classifier.epochs=0"):
        clf.trained_classifier({"_target_": "diffusion.data.DigitsDataModule"}, "unused", epochs=0)


def test_evaluate_offers_fd_classifier(ckpt, classifier_cache, tmp_path, caplog):
    """``python -m diffusion.evaluate ckpt=... metrics=[fd_classifier]``, composed as the CLI composes it: results.json
    holds the distance, the classifier's accuracy and the sampler; the cached classifier is read, not retrained."""
    from diffusion.evaluate import evaluate
    from tests.test_readme import compose_job

    cfg = compose_job("evaluate", [f"ckpt={ckpt}", "metrics=[fd_classifier]", "max_images=24", "fid.num_steps=3",
                                   "fid.kid_subsets=5", f"paths.cache_dir={classifier_cache}"])
    cfg.paths.output_dir = str(tmp_path / "o")
    with caplog.at_level("INFO"):
        evaluate(cfg)
    result = json.loads((tmp_path / "o" / "results.json").read_text())["fd_classifier"]
    assert result["value"] > 0 and result["kid_subset_size"] == 24 and result["num_fake"] == 24
    assert result["classifier_accuracy"] > 0.95 and result["sampler"].startswith("ddim, 3 steps") and result["nfe"] == 3
    # how sure the classifier is of the samples and of the real images, as class_confidence computes it
    net, _ = clf.trained_classifier(read_checkpoint(ckpt)["hyper_parameters"]["data"], classifier_cache)
    real = clf.class_confidence(net.classifier, clf.split_images(clf.labelled_datamodule(
        read_checkpoint(ckpt)["hyper_parameters"]["data"]), "val", 24))
    assert result["real_confident"] == pytest.approx(real["confident"]) and result["real_class_kl"] == pytest.approx(real["class_kl"])
    assert 0 <= result["confident"] <= 1 and len(result["class_histogram"]) == 10
    assert sum(result["class_histogram"]) == pytest.approx(1, abs=1e-3)
    assert "classifier read from" in caplog.text
    # sampler=<name> draws the sample metrics' images with another sampler of the registry
    cfg = compose_job("evaluate", [f"ckpt={ckpt}", "metrics=[fd_classifier]", "max_images=24", "sampler=heun",
                                   "sampler.num_steps=2", "fid.kid_subsets=5", f"paths.cache_dir={classifier_cache}"])
    cfg.paths.output_dir = str(tmp_path / "heun")
    evaluate(cfg)
    heun = json.loads((tmp_path / "heun" / "results.json").read_text())["fd_classifier"]
    assert heun["sampler"].startswith("heun, 2 steps (3 NFE)") and heun["nfe"] == 3 and heun["value"] != result["value"]


class _Logits(torch.nn.Module):
    """A 'classifier' whose logits are given: image i (its first pixel holds i) gets row i of ``logits``."""

    num_classes = 4

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].long()]


def test_class_confidence_counts_sure_images_and_the_histograms_kl_to_uniform():
    """4 images, 4 classes, logits chosen so that the answer is known by hand: top softmax probabilities
    e^4 / (e^4 + 3) = 0.948 twice, 0.25 (a tie, argmax the first class) and 2 / 5 = 0.4; predicted classes 0, 0, 0, 1."""
    import math

    logits = [[4.0, 0.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, math.log(2), 0.0, 0.0]]
    images = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1)
    out = clf.class_confidence(_Logits(logits), images, threshold=0.8)
    p_top = math.exp(4) / (math.exp(4) + 3)  # 0.948
    assert p_top > 0.8 and 2 / 5 < 0.8
    assert out["confident"] == 0.5 and out["n"] == 4
    assert out["histogram"] == [0.75, 0.25, 0.0, 0.0]
    assert out["class_kl"] == pytest.approx(0.75 * math.log(4 * 0.75) + 0.25 * math.log(4 * 0.25))
    one_class = clf.class_confidence(_Logits([[9.0, 0, 0, 0]] * 4), torch.zeros(4, 1, 1, 1, dtype=torch.uint8))
    assert one_class["confident"] == 1.0 and one_class["class_kl"] == pytest.approx(math.log(4)), "one class: log K"
    # the union of two disjoint sets, from their parts (what evaluate's DDP ranks combine)
    merged = clf.merge_confidence([clf.class_confidence(_Logits(logits), images[:1]),
                                   clf.class_confidence(_Logits(logits), images[1:])])
    assert merged["confident"] == pytest.approx(out["confident"]) and merged["histogram"] == pytest.approx(out["histogram"])
    assert merged["class_kl"] == pytest.approx(out["class_kl"])


def test_real_digits_are_classified_confidently_and_evenly(splits, feature):
    """The judge of the first run: on the held-out real digits the classifier is sure of nearly every image and
    predicts the ten classes about equally often; on noise it is sure of few."""
    val, _ = splits
    net, _ = feature
    real = clf.class_confidence(net.classifier, val)
    noise = clf.class_confidence(net.classifier, torch.randint(0, 256, val.shape, dtype=torch.uint8,
                                                               generator=torch.Generator().manual_seed(0)))
    assert real["confident"] > 0.93 and real["class_kl"] < 0.05, real
    assert noise["class_kl"] > 5 * real["class_kl"], noise
