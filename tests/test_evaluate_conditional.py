"""diffusion.evaluate on a class-conditional checkpoint: class-balanced samples, the fd_classifier's class accuracy and
within-class diversity (checked against independent computations on the written results), on one and two ranks;
the guidance sweep and its report; the one-line errors."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from diffusion.evaluate import evaluate
from diffusion.metrics import classifier as clf
from diffusion.plots.grids import to_uint8
from diffusion.run.errors import UsageError
from diffusion.sharing.checkpoints import read_checkpoint
from diffusion.training.module import DiffusionModule
from tests.conftest import run_train
from tests.test_readme import compose_job

#: a tiny evaluation: 20 samples (2 of each digit) of 2 DDIM steps against the first 40 validation images
TINY = ["metrics=[fd_classifier]", "fid.num_samples=20", "max_images=40", "sampler.num_steps=2", "fid.kid_subsets=5"]


def run_evaluate(ckpt, cache, out, *overrides) -> dict:
    cfg = compose_job("evaluate", [f"ckpt={ckpt}", *TINY, f"paths.cache_dir={cache}", *overrides])
    cfg.paths.output_dir = str(out)
    evaluate(cfg)
    return json.loads((out / "results.json").read_text())


def rms_pairwise(features: torch.Tensor) -> float | None:
    """sqrt(mean over pairs i < j of |f_i - f_j|^2), from every pair's distance (torch.cdist)."""
    n = len(features)
    if n < 2:
        return None
    d = torch.cdist(features.double(), features.double())
    i, j = torch.triu_indices(n, n, offset=1)
    return float(d[i, j].pow(2).mean().sqrt())


def redrawn(ckpt, n, seed, labels, **sampler):
    """The samples evaluate draws, drawn again with module.sample: one batch, the generator seeded with ``seed``."""
    module = DiffusionModule.from_checkpoint(ckpt, ema=True)
    s = module.build_sampler(dict(module.hparams.sampler), **sampler)
    g = torch.Generator().manual_seed(seed)
    return to_uint8(module.sample(n, sampler=s, generator=g, labels=labels).samples)


def expected(ckpt, cache, fake, fake_labels, max_images=40):
    """class_accuracy and the diversities computed here: the cached classifier's argmax and cdist on its features, the
    real images read from the split's array (not through the dataset's items)."""
    data_cfg = read_checkpoint(ckpt)["hyper_parameters"]["data"]
    feature, _ = clf.trained_classifier(data_cfg, cache)
    dm = clf.labelled_datamodule(data_cfg)
    real = clf.split_images(dm, "val", max_images)
    real_labels = torch.from_numpy(dm.split_labels("val")[:max_images])
    with torch.no_grad():
        hits = feature.classifier(fake).argmax(1) == fake_labels
        f_fake, f_real = feature(fake), feature(real)
    per_class = {k: float(hits[fake_labels == k].double().mean()) for k in range(10)}
    fake_div = {k: rms_pairwise(f_fake[fake_labels == k]) for k in range(10)}
    real_div = {k: rms_pairwise(f_real[real_labels == k]) for k in range(10)}
    compared = [k for k in range(10) if fake_div[k] is not None and real_div[k] is not None]
    return {"class_accuracy": float(hits.double().mean()), "per_class": [per_class[k] for k in range(10)],
            "fake_div": [fake_div[k] for k in range(10)], "real_div": [real_div[k] for k in range(10)],
            "compared": compared, "within": float(np.mean([fake_div[k] for k in compared])),
            "real_within": float(np.mean([real_div[k] for k in compared]))}


def close(got: list, want: list, rel: float = 1e-5) -> bool:
    """Equal lengths, None in the same places, the numbers equal within ``rel``."""
    return len(got) == len(want) and all((g is None) == (w is None) and (g is None or g == pytest.approx(w, rel=rel, abs=1e-9))
                                          for g, w in zip(got, want))


def assert_matches(got: dict, want: dict):
    assert got["class_accuracy"] == pytest.approx(want["class_accuracy"], abs=1e-12)
    assert got["class_accuracy_per_class"] == pytest.approx(want["per_class"], abs=1e-12)
    assert got["diversity_classes"] == want["compared"] and len(want["compared"]) >= 5
    assert close(got["within_class_diversity_per_class"], want["fake_div"])
    assert close(got["real_within_class_diversity_per_class"], want["real_div"])
    assert got["within_class_diversity"] == pytest.approx(want["within"], rel=1e-5)
    assert got["real_within_class_diversity"] == pytest.approx(want["real_within"], rel=1e-5)
    assert got["diversity_ratio"] == pytest.approx(want["within"] / want["real_within"], rel=1e-5)


def test_class_accuracy_and_diversity_of_class_balanced_samples(cond_ckpt, classifier_cache, tmp_path):
    """20 guided samples, the digits cycled (sample i of class i % 10), judged as recomputed here from samples redrawn
    with module.sample and the same seed."""
    got = run_evaluate(cond_ckpt, classifier_cache, tmp_path / "o", "sampler.guidance_scale=2", "sampler.guidance_rescale=0.5",
                       "seed=3")["fd_classifier"]
    assert got["guidance_scale"] == 2.0 and got["guidance_rescale"] == 0.5 and "guidance 2 (rescale 0.5)" in got["sampler"]
    assert got["classes"] == list(range(10)) and got["samples_per_class"] == [2] * 10 and got["chance"] == 0.1
    assert got["class_names"] == [str(k) for k in range(10)] and got["num_fake"] == 20
    labels = torch.arange(20) % 10
    fake = redrawn(cond_ckpt, 20, 3, labels, num_steps=2, guidance_scale=2.0, guidance_rescale=0.5)
    assert_matches(got, expected(cond_ckpt, classifier_cache, fake, labels))
    # an untrained model: its samples are no digits, the classifier labels them as their class at about chance
    assert got["class_accuracy"] <= 0.3 and got["value"] > 0 and 0 <= got["confident"] <= 1


class _AlwaysThree(torch.nn.Module):
    """A stand-in classifier: the cached LeNet's features, but every image classified as a 3."""

    def __init__(self, net):
        super().__init__()
        self.net, self.num_classes, self.num_features = net, net.num_classes, net.num_features

    def penultimate(self, x):
        return self.net.penultimate(x)

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.full((len(x),), 3), self.num_classes).float()


def test_the_samples_are_drawn_for_the_classes_asked(cond_ckpt, classifier_cache, tmp_path, monkeypatch):
    """classes=[3,7,9], 7 samples: 3, 7, 9, 3, 7, 9, 3 (balanced: 3, 2, 2); a classifier that calls everything a 3 is
    right on exactly the 3s: class_accuracy 3/7, per class [1, 0, 0]."""

    def stand_in(*args, **kwargs):
        feature, info = real(*args, **kwargs)
        return clf.PenultimateFeatures(_AlwaysThree(feature.classifier), feature.scale), info

    real = clf.trained_classifier
    monkeypatch.setattr("diffusion.metrics.classifier.trained_classifier", stand_in)  # evaluate imports it when it runs
    got = run_evaluate(cond_ckpt, classifier_cache, tmp_path / "o", "classes=[3,7,9]", "fid.num_samples=7")["fd_classifier"]
    assert got["classes"] == [3, 7, 9] and got["samples_per_class"] == [3, 2, 2] and got["class_names"] == ["3", "7", "9"]
    assert got["class_accuracy"] == 3 / 7 and got["class_accuracy_per_class"] == [1.0, 0.0, 0.0]
    assert got["guidance_scale"] == 1.0 and got["class_histogram"][3] == 1.0
    assert len(got["within_class_diversity_per_class"]) == 3 and set(got["diversity_classes"]) <= {3, 7, 9}


class _Rule(torch.nn.Module):
    """Features: pixels (0, 0) and (0, 1) of the first channel; class: pixel (1, 0)."""

    num_classes, num_features = 3, 2

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def penultimate(self, x):
        return x[:, 0, 0, :2].float()

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0, 1, 0].long(), self.num_classes).float()


def test_within_class_diversity_by_hand_and_of_identical_images(classifier_cache, ckpt):
    """Class 0: features (0, 0), (3, 0), (0, 4): squared distances 9, 16, 25, RMS sqrt(50 / 3); class 1: three identical
    images, 0; class 2: one image, None. The sums of two shards (two ranks) give the same. Identical digits through the
    real classifier: 0."""
    points = {0: [(0, 0), (3, 0), (0, 4)], 1: [(5, 6)] * 3, 2: [(1, 1)]}
    images, labels = [], []
    for k, pts in points.items():
        for i, (a, b) in enumerate(pts):
            x = torch.zeros(1, 2, 2, dtype=torch.uint8)
            x[0, 0, 0], x[0, 0, 1], x[0, 1, 0] = a, b, k if i else (k + 1) % 3  # the first of each class misclassified
            images.append(x)
            labels.append(k)
    images, labels = torch.stack(images), torch.tensor(labels)
    feature = clf.PenultimateFeatures(_Rule())
    sums = clf.class_sums(feature, images, labels, 3, batch_size=2)
    assert sums["count"].tolist() == [3, 3, 1] and sums["correct"].tolist() == [2, 2, 0]
    div = clf.within_class_diversity(sums)
    assert div[0] == pytest.approx(math.sqrt(50 / 3), rel=1e-12) and div[1] == 0.0 and div[2] is None
    shards = [clf.class_sums(feature, images[r::2], labels[r::2], 3) for r in (0, 1)]
    merged = {key: shards[0][key] + shards[1][key] for key in sums}
    assert close(clf.within_class_diversity(merged), div, rel=1e-12)
    # five copies of a real digit, through the trained LeNet: no diversity
    data_cfg = read_checkpoint(ckpt)["hyper_parameters"]["data"]
    net, _ = clf.trained_classifier(data_cfg, classifier_cache)
    digit = clf.split_images(clf.labelled_datamodule(data_cfg), "val", 1)
    same = clf.class_sums(net, digit.repeat(5, 1, 1, 1), torch.zeros(5, dtype=torch.long), 10)
    assert clf.within_class_diversity(same)[0] == pytest.approx(0.0, abs=1e-5) and float(same["feature_sum"].abs().sum()) > 0


def test_the_classifier_of_conditional_data_is_the_one_of_the_same_data():
    """data.conditional=true only makes the loaders yield labels: the same cached classifier; it also gives labels to
    sources without them otherwise (image folders with class subfolders)."""
    digits = {"_target_": "diffusion.data.DigitsDataModule", "image_size": 16, "seed": 42}
    options = clf.check_options({})
    assert clf.classifier_spec({**digits, "conditional": True}, options) == clf.classifier_spec(digits, options)
    folder = {"_target_": "diffusion.data.ImageFolderDataModule", "root": "x"}
    clf.check_labels({**folder, "conditional": True})
    with pytest.raises(ValueError, match="folders with data.conditional=true"):
        clf.check_labels(folder)


#: what fd_classifier holds for an unconditional checkpoint (unchanged by class-conditional evaluation)
UNCONDITIONAL_KEYS = {"value", "kid", "kid_std", "kid_subset_size", "confident", "class_kl", "class_histogram", "real_confident",
                      "real_class_kl", "classifier_accuracy", "classifier_train_accuracy", "classifier", "features", "num_real",
                      "num_fake", "sampler", "num_steps", "nfe"}


@pytest.mark.parametrize("which, overrides, text", [
    ("cond", ["classes=[10]"], "classes=[10] is invalid: class 10 is not in 0..9"),
    ("cond", ["classes=seven"], "classes='seven' is invalid"),
    ("cond", ["fid.num_samples=5"], "fid.num_samples=5 is too few for the 10 classes"),
    ("uncond", ["sampler.guidance_scale=2"], "sampler.guidance_scale=2 is invalid for ckpt="),
    ("uncond", ["classes=[3]"], "classes=[3] is invalid for ckpt="),
])
def test_bad_input_is_refused_before_any_work(cond_ckpt, ckpt, classifier_cache, tmp_path, which, overrides, text):
    out = tmp_path / "o"
    with pytest.raises(UsageError) as err:
        run_evaluate(cond_ckpt if which == "cond" else ckpt, classifier_cache, out, *overrides)
    assert text in str(err.value) and "\n" not in str(err.value)
    assert not out.exists(), "refused before the run's config was saved or any image loaded"


def test_an_unconditional_checkpoint_reports_as_before(ckpt, classifier_cache, tmp_path):
    got = run_evaluate(ckpt, classifier_cache, tmp_path / "o")["fd_classifier"]
    assert set(got) == UNCONDITIONAL_KEYS


def ranks_agree_with_the_whole_sets(got: dict, cond_ckpt, classifier_cache):
    """Rank r of 2 drew samples r, r + 2, ... (their classes) from seed 0 + r: the accuracy and diversities are those
    of all 20 samples and 40 real images together, recomputed here from both ranks' redrawn shares."""
    labels = torch.arange(20) % 10
    shares = [redrawn(cond_ckpt, 10, r, labels[r::2], num_steps=2) for r in (0, 1)]
    fake, fake_labels = torch.cat(shares), torch.cat([labels[0::2], labels[1::2]])
    assert got["samples_per_class"] == [2] * 10 and got["num_fake"] == 20 and got["num_real"] == 40
    assert_matches(got, expected(cond_ckpt, classifier_cache, fake, fake_labels))


class _ThreadRanks:
    """A stand-in for Lightning Fabric's ``world_size`` ranks, one thread each: ``all_reduce`` sums the ranks'
    tensors (every rank calls it in the same order, as under DDP); FD/KID stay per rank (no process group)."""

    def __init__(self, world_size: int):
        import threading

        self.world_size, self.device = world_size, torch.device("cpu")
        self.sync, self.slots, self.local = threading.Barrier(world_size), [None] * world_size, threading.local()

    @property
    def global_rank(self) -> int:
        return self.local.rank

    def all_reduce(self, tensor, reduce_op="sum"):
        assert reduce_op == "sum"
        self.slots[self.local.rank] = tensor.clone()
        self.sync.wait()
        total = sum(self.slots)
        self.sync.wait()  # every rank has read the slots before any writes the next
        return total

    def barrier(self):
        self.sync.wait()

    def launch(self, fn, *args):
        import threading

        results, errors = [None] * self.world_size, []

        def rank(r):
            self.local.rank = r
            try:
                results[r] = fn(self, *args)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                self.sync.abort()

        threads = [threading.Thread(target=rank, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results[0]


def test_two_ranks_reduce_the_class_sums(cond_ckpt, classifier_cache, tmp_path, monkeypatch):
    """evaluate's rank code on 2 ranks (threads standing in for Fabric's processes): each draws its share of the
    labels, judges its share of the real images, and the reduced sums give the whole sets' numbers on every rank."""

    ranks = _ThreadRanks(2)
    monkeypatch.setattr("lightning.fabric.Fabric", lambda **kwargs: ranks)  # evaluate imports it when it runs
    # (KID without a process group sees one rank's 10 samples: subsets of 10)
    cfg = compose_job("evaluate", [f"ckpt={cond_ckpt}", *TINY, "fid.kid_subset_size=10", f"paths.cache_dir={classifier_cache}"])
    cfg.paths.output_dir = str(tmp_path / "o")
    cfg.devices = 1  # the machine's check of devices; the stand-in is the 2 ranks
    got = evaluate(cfg)
    assert got["world_size"] == 2 and json.loads((tmp_path / "o" / "results.json").read_text()) == json.loads(json.dumps(got))
    ranks_agree_with_the_whole_sets(got["fd_classifier"], cond_ckpt, classifier_cache)


@pytest.mark.slow
def test_two_ranks_report_the_whole_sets(cond_ckpt, classifier_cache, tmp_path):
    """devices=2 through the CLI: two DDP processes (gloo) launched by Fabric (~30-50 s on 2 shared CPU cores)."""
    out = tmp_path / "o"
    proc = run_train(f"ckpt={cond_ckpt}", *TINY, "devices=2", "device=cpu", f"paths.cache_dir={classifier_cache}",
                     f"hydra.run.dir={out}", tmp_path=tmp_path, module="diffusion.evaluate")
    assert proc.returncode == 0, proc.output[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and "rank 1 of 2 evaluates 20 of 40 images" in proc.output
    ranks_agree_with_the_whole_sets(results["fd_classifier"], cond_ckpt, classifier_cache)


def test_a_guidance_sweep_and_its_report(cond_ckpt, classifier_cache, tmp_path, monkeypatch):
    """python -m diffusion.evaluate -m ... sampler.guidance_scale=0,1,2,4 (no sampler=<name>), then diffusion.report on
    its directory: 4 rows with the jobs' own results, and a plot of each metric with one point per job."""
    sweep = tmp_path / "sweep"
    proc = run_train("-m", f"ckpt={cond_ckpt}", "metrics=[fd_classifier]", "fid.num_samples=20", "max_images=20",
                     "sampler.num_steps=2", "fid.kid_subsets=5", "sampler.guidance_scale=0,1,2,4",
                     f"paths.cache_dir={classifier_cache}", f"hydra.sweep.dir={sweep}", tmp_path=tmp_path,
                     module="diffusion.evaluate")
    assert proc.returncode == 0, proc.output[-3000:]
    results = {int(json.loads((sweep / str(i) / "results.json").read_text())["fd_classifier"]["guidance_scale"]):
               json.loads((sweep / str(i) / "results.json").read_text())["fd_classifier"] for i in range(4)}
    assert sorted(results) == [0, 1, 2, 4] and len({r["value"] for r in results.values()}) == 4, "each w drew other samples"

    import matplotlib.axes

    from diffusion.report import make_report
    from tests.run.test_errors import compose_cfg

    plotted = []
    original = matplotlib.axes.Axes.plot

    def spy(ax, x, y, *args, **kwargs):
        plotted.append((ax.get_ylabel() or None, list(x), list(y)))
        return original(ax, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    make_report(compose_cfg(f"sweep={sweep}", config_name="report"))  # python -m diffusion.report sweep=<the sweep>
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert [float(r["sampler.guidance_scale"]) for r in rows] == [0, 1, 2, 4]
    columns = {"fd_classifier": "value", "class_accuracy": "class_accuracy", "confident": "confident",
               "diversity_ratio": "diversity_ratio"}
    assert list(rows[0]) == ["job", "sampler.guidance_scale", *columns]
    for r in rows:
        for column, key in columns.items():
            assert float(r[column]) == pytest.approx(results[int(float(r["sampler.guidance_scale"]))][key], rel=1e-4)
    assert len(plotted) == 4  # one line per metric, one point per job, in the order of w
    for _, x, y in plotted:
        assert x == [0, 1, 2, 3] and len(y) == 4
    assert [p[2] for p in plotted][1] == [results[w]["class_accuracy"] for w in (0, 1, 2, 4)]
    md = (sweep / "report.md").read_text().splitlines()
    assert md[0] == "| job | sampler.guidance_scale | fd_classifier | class_accuracy | confident | diversity_ratio |"
    assert len(md) == 2 + 4 and "failed" not in "".join(md)
    from PIL import Image

    with Image.open(sweep / "report.png") as im:
        pixels = np.asarray(im.convert("L"))
    assert pixels.shape[0] > 600 and (pixels < 128).mean() > 0.01, "the plot has lines and text on its white"
