"""Evaluate a checkpoint: ``python -m diffusion.evaluate ckpt=PATH metrics=[nll,fid,kid]``.

``nll``: the negative log-likelihood bound of Ho et al. in bits/dim over the run's validation images, with its
terms (L_T prior, the sum of L_{t-1}, the L_0 decoder) and the loss per timestep quarter. All T terms by default
(T network evaluations per image); ``nll.num_timesteps=K`` computes L_T and L_0 exactly and estimates the sum of
the T - 1 KL terms between them from K stratified timesteps drawn independently for each image (K + 1 network
evaluations per image): unbiased, with a ``bpd_stderr`` that includes the timestep sampling
(:meth:`GaussianDiffusion.calc_bpd_loop`). ``fid``/``kid``:
generated samples against the same images (:mod:`diffusion.metrics`). ``fd_classifier``: the Frechet distance and KID
on the features of a small classifier trained on the data's training split, offline
(:mod:`diffusion.metrics.classifier`; trained once, cached in ``paths.cache_dir``). Results are printed and written to
``results.json`` in the output directory.

A class-conditional checkpoint (trained with ``data.conditional=true``) draws the samples of every sample metric
class-balanced: the ``classes`` given (null or ``all``: every class; a list such as ``[3,7]``) cycled over the
``fid.num_samples`` samples (sample i is of class ``classes[i % len(classes)]``, so each class gets n/K or one more),
guided at ``sampler.guidance_scale`` (and ``sampler.guidance_rescale``), which the results record. ``fd_classifier``
then also judges them by class (:func:`class_metrics`): ``class_accuracy``, the fraction of samples the classifier
labels as the class they were drawn for (``chance``: 1 / the number of classes), and the within-class diversity of the
samples and of the real images, whose ratio ``diversity_ratio`` shows whether guidance collapsed the classes (a ratio
well below 1). ``nll`` of a conditional checkpoint is the bound of its unconditional (null-class) model. Sweep the
guidance with ``python -m diffusion.evaluate -m ckpt=PATH metrics=[fd_classifier] sampler.guidance_scale=0,1,2,4``
and tabulate the sweep with ``python -m diffusion.report sweep=<its multirun directory>``.

``devices=N`` evaluates on N ranks (DDP, launched by Lightning Fabric): every rank takes every N-th image, generates
its share of the samples (seed ``seed + rank``) and updates its metric states; every rank then computes, the states
being summed / gathered across ranks by torchmetrics, and rank 0 writes the results.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from diffusion.run.config import CONFIG_DIR, save_run_config
from diffusion.run.errors import UsageError, build_or_usage_error, exits_on_usage_error
from diffusion.run.outputs import require_ckpt
from diffusion.run.sampling import check_guidance, chosen_classes, chosen_sampler, draw, resolve_device
from diffusion.run.wandb_runs import log_to_training_run

if TYPE_CHECKING:  # torch, Lightning and the metrics load once the settings that need no checkpoint have passed
    import torch
    from lightning.fabric import Fabric

    from diffusion.training.module import DiffusionModule

log = logging.getLogger("diffusion.evaluate")

METRICS = ("nll", "fid", "kid", "fd_classifier")
#: the metrics computed on generated samples
SAMPLE_METRICS = ("fid", "kid", "fd_classifier")


def data_config(cfg: DictConfig, module: DiffusionModule):
    """``data=`` when given, else the data config the checkpoint was trained on."""
    data_cfg = cfg.get("data") or module.hparams.get("data")
    if not data_cfg:
        raise UsageError(f"ckpt={cfg.ckpt} stores no data config: pass data=<option> (and its data.root)")
    return data_cfg


def evaluation_images(cfg: DictConfig, module: DiffusionModule, with_datamodule: bool = False):
    """The first ``max_images`` uint8 images of the chosen split of the data the model was trained on (and the
    set-up data module, ``with_datamodule``). Their labels, if the data yields them, are
    ``datamodule.split_labels(cfg.split)[:len(images)]`` (:func:`evaluation_labels`)."""
    import torch

    data_cfg = data_config(cfg, module)
    datamodule = build_or_usage_error("data", lambda: instantiate(data_cfg))
    build_or_usage_error("data", lambda: (datamodule.prepare_data(), datamodule.setup("fit")))
    dataset = datamodule.val_set if cfg.split == "val" else datamodule.train_set
    n = len(dataset) if cfg.max_images is None else min(cfg.max_images, len(dataset))
    if n == 0:
        raise UsageError(f"split={cfg.split} holds no images (data val_fraction is 0?): use split=train")
    items = [dataset[i] for i in range(n)]  # data.conditional=true: (image, label)
    images = torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items])
    return (images, datamodule) if with_datamodule else images


def evaluation_labels(cfg: DictConfig, datamodule, num_images: int) -> torch.Tensor:
    """The true classes of :func:`evaluation_images`' images (the split's labels, in the split's order)."""
    import torch

    labels = build_or_usage_error("data", lambda: datamodule.split_labels(cfg.split))
    return torch.as_tensor(labels[:num_images], dtype=torch.long)


def balanced_labels(classes: torch.Tensor, n: int) -> torch.Tensor:
    """The classes of ``n`` class-balanced samples: ``classes`` cycled, sample i of class ``classes[i % K]``."""
    return classes.repeat(math.ceil(n / len(classes)))[:n]


def nll(module: DiffusionModule, images: torch.Tensor, cfg: DictConfig, fabric: Fabric) -> dict:
    """The bound over this rank's images; sums are reduced across ranks, so every rank returns the full result.

    ``bpd`` is the mean over the images of each image's bound (exact) or unbiased estimate of it (K terms:
    :meth:`GaussianDiffusion.calc_bpd_loop` draws every image's timesteps and noise independently, and every rank
    uses its own seed), and ``bpd_stderr`` the standard error of that mean, sd / sqrt(n) of the per-image values:
    with the estimate it includes the timestep sampling as well as the spread of the images.
    """
    import torch

    from diffusion.training.module import to_model_range

    generator = torch.Generator(device=module.device).manual_seed(cfg.seed + fabric.global_rank)
    T = module.process.num_timesteps
    k = cfg.nll.num_timesteps
    full = k is None or k >= T - 1  # calc_bpd_loop evaluates every term
    sums: dict[str, torch.Tensor] = {}

    def add(key, value):
        sums[key] = sums.get(key, 0) + value.double().sum(0).cpu()

    for start in tqdm(range(0, len(images), cfg.batch_size), desc=f"NLL (bits/dim), rank {fabric.global_rank}", unit="batch"):
        x0 = to_model_range(images[start : start + cfg.batch_size].to(module.device))
        out = module.process.calc_bpd_loop(module.model, x0, k, generator, cfg.nll.clip_denoised)
        add("count", torch.ones(len(x0)))
        add("total", out["total_bpd"])
        add("total_sq", out["total_bpd"].double() ** 2)
        add("prior", out["prior_bpd"])
        add("vb", out["vb_bpd"])
        add("decoder", out["decoder_bpd"])
        if full:
            add("terms", out["terms"].flip(1))  # columns in timestep order 0..T-1
    sums = {key: fabric.all_reduce(v.to(fabric.device), reduce_op="sum").cpu() for key, v in sums.items()}
    n = int(sums["count"])
    mean = (sums["total"] / n).item()
    var = ((sums["total_sq"] - n * mean**2) / (n - 1)).clamp(min=0).item() if n > 1 else 0.0
    result = {
        "bpd": mean,
        "bpd_stderr": (var / n) ** 0.5,  # per-image spread (and, estimated, the timestep draw) / sqrt(n)
        "prior_bpd": (sums["prior"] / n).item(),
        "vb_bpd": (sums["vb"] / n).item(),
        "decoder_bpd": (sums["decoder"] / n).item(),
        "num_images": n,
        "num_timesteps": T if full else k,
        "estimator": "exact" if full else "stratified",  # exact: all T terms; stratified: L_T, L_0 exact + K middle
        "num_middle_terms": T - 1 if full else k,  # KL terms L_1..L_{T-1} evaluated per image
        "model_calls_per_image": T if full else k + 1,  # the middle terms and the decoder L_0
    }
    if full:  # the bound per quarter of the timestep range, as improved-diffusion reports it
        for q, chunk in enumerate((sums["terms"] / n).chunk(4)):
            result[f"vb_bpd_q{q}"] = chunk.sum().item()
    return result


def feature_extractor(cfg: DictConfig):
    from diffusion.metrics import inception, inception_weights

    if cfg.fid.feature_extractor is not None:
        return instantiate(cfg.fid.feature_extractor)
    return inception(inception_weights(cfg.fid.weights))


def generation_sampler(module: DiffusionModule, cfg: DictConfig):
    """The sampler the sample metrics draw with: ``sampler=<name>`` or the checkpoint's own, ``fid.num_steps`` steps
    if set."""
    config = OmegaConf.to_container(cfg.sampler, resolve=True) if cfg.get("sampler") is not None else {}
    if cfg.fid.num_steps is not None:
        config["num_steps"] = cfg.fid.num_steps
    return chosen_sampler(module, OmegaConf.create(config))


def generated(module: DiffusionModule, num_real: int, cfg: DictConfig, fabric: Fabric,
              classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """This rank's share of ``fid.num_samples`` generated uint8 images (one draw for every sample metric), their
    classes (a class-conditional model: :func:`balanced_labels` of ``classes``, every ``world_size``-th; else None)
    and the sampler that drew them (with its guidance and the classes, for a class-conditional model)."""
    from diffusion.plots.grids import to_uint8

    n_total = cfg.fid.num_samples or num_real
    n = len(range(fabric.global_rank, n_total, fabric.world_size))
    sampler = generation_sampler(module, cfg)
    labels = None if classes is None else balanced_labels(classes, n_total)[fabric.global_rank :: fabric.world_size]
    fake = to_uint8(draw(module, sampler, n, cfg.batch_size, cfg.seed + fabric.global_rank, labels))
    info = {"num_real": num_real, "num_fake": n_total, "sampler": sampler.describe(), "num_steps": sampler.num_steps,
            "nfe": sampler.nfe}
    if classes is not None:
        info.update(guidance_scale=sampler.guidance_scale, guidance_rescale=sampler.guidance_rescale, classes=classes.tolist())
    return fake, labels, info


def fd_classifier(module: DiffusionModule, images: torch.Tensor, fake: torch.Tensor, info: dict, classifier, cfg: DictConfig,
                  fabric: Fabric | None = None, fake_labels: torch.Tensor | None = None,
                  real_labels: torch.Tensor | None = None) -> dict:
    """The Frechet distance and KID on the classifier's features (this rank's shards; the states sync across ranks),
    and how sure the classifier is of the samples and of the real images: ``confident`` (the fraction with a class
    probability > 0.8), ``class_kl`` (the predicted classes' histogram, KL to uniform, nats) and ``real_confident``.
    Class-conditional samples (``fake_labels``, the class each was drawn for; ``real_labels``, the true classes of
    ``images``): also :func:`class_metrics`."""
    from diffusion.metrics import fid_kid
    from diffusion.metrics.classifier import class_confidence

    feature, about = classifier
    out = fid_kid(images, fake, feature.to(module.device), ("fid", "kid"), cfg.fid.kid_subset_size, cfg.fid.kid_subsets,
                  cfg.batch_size, module.device, num_real=info["num_real"], num_fake=info["num_fake"])
    sure = {name: _all_ranks(class_confidence(feature.classifier, x), fabric) for name, x in (("fake", fake), ("real", images))}
    return {"value": out["fid"], "kid": out["kid"], "kid_std": out["kid_std"], "kid_subset_size": out["kid_subset_size"],
            "confident": sure["fake"]["confident"], "class_kl": sure["fake"]["class_kl"],
            "class_histogram": [round(h, 4) for h in sure["fake"]["histogram"]],
            "real_confident": sure["real"]["confident"], "real_class_kl": sure["real"]["class_kl"],
            "classifier_accuracy": about["accuracy"], "classifier_train_accuracy": about["train_accuracy"],
            "classifier": about["path"], "features": about["features"], **info,
            **({} if fake_labels is None else class_metrics(feature, fake, fake_labels, images, real_labels, info["classes"],
                                                            module.class_names, cfg.batch_size, fabric))}


def class_metrics(feature, fake: torch.Tensor, fake_labels: torch.Tensor, images: torch.Tensor, real_labels: torch.Tensor,
                  classes: list[int], class_names: list[str], batch_size: int, fabric: Fabric | None = None) -> dict:
    """How the classifier judges class-conditional samples by class (this rank's shards; the sums are reduced across
    ranks, so every rank returns the full result). With K the classifier's classes and C the ``classes`` drawn:

    - ``class_accuracy``: the fraction of all samples that the classifier (argmax of its logits) labels as the class
      they were drawn for; ``class_accuracy_per_class``: that fraction among the samples of each of C (in the order of
      ``classes``); ``chance``: 1 / K, the accuracy of a classifier guessing at random, and of samples that ignore
      their class when every class is drawn (the classes balanced: whatever the classes they look like);
      ``samples_per_class``: the samples drawn of each of C.
    - ``within_class_diversity``: for each class of C, the root-mean-square Euclidean distance between the
      classifier features (the fd_classifier features: its penultimate layer, scaled to mean square 1 over the
      training images) of two distinct samples drawn for the class, sqrt(mean over pairs |f_i - f_j|^2) =
      sqrt(2 tr Cov) (:func:`~diffusion.metrics.classifier.within_class_diversity`), averaged over the compared
      classes: those of C with >= 2 samples and >= 2 real images; ``real_within_class_diversity``: the same for the
      evaluated real images of the split grouped by their true labels; ``diversity_ratio``: samples / real (1: as
      varied as the data within a class; near 0: each class collapsed to one image). The ``*_per_class`` lists hold
      each class of C (None where it has < 2 images); ``diversity_classes``: the compared classes.
    """
    from diffusion.metrics.classifier import class_sums, within_class_diversity

    num_classes = feature.classifier.num_classes
    sums = {"fake": class_sums(feature, fake, fake_labels, num_classes, batch_size),
            "real": class_sums(feature, images, real_labels, num_classes, batch_size)}
    if fabric is not None and fabric.world_size > 1:
        sums = {kind: {key: fabric.all_reduce(value.to(fabric.device), reduce_op="sum").cpu() for key, value in part.items()}
                for kind, part in sums.items()}
    fake_sums, real_sums = sums["fake"], sums["real"]
    count, correct = fake_sums["count"], fake_sums["correct"]
    fake_div, real_div = within_class_diversity(fake_sums), within_class_diversity(real_sums)
    compared = [k for k in classes if fake_div[k] is not None and real_div[k] is not None]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    fake_mean, real_mean = mean([fake_div[k] for k in compared]), mean([real_div[k] for k in compared])
    if not compared:
        log.warning("fd_classifier: no class has 2 samples and 2 real images: no within-class diversity (raise "
                    "fid.num_samples, max_images)")
    return {
        "class_accuracy": float(correct.sum() / count.sum()),
        "class_accuracy_per_class": [float(correct[k] / count[k]) if count[k] else None for k in classes],
        "chance": 1.0 / num_classes,
        "samples_per_class": [int(count[k]) for k in classes],
        "class_names": [class_names[k] for k in classes],
        "within_class_diversity": fake_mean,
        "real_within_class_diversity": real_mean,
        "diversity_ratio": fake_mean / real_mean if fake_mean is not None and real_mean else None,
        "within_class_diversity_per_class": [fake_div[k] for k in classes],
        "real_within_class_diversity_per_class": [real_div[k] for k in classes],
        "diversity_classes": compared,
    }


def _all_ranks(part: dict, fabric: Fabric | None) -> dict:
    """A rank's :func:`class_confidence` combined with every other rank's (their image shards are disjoint)."""
    import torch

    from diffusion.metrics.classifier import merge_confidence

    if fabric is None or fabric.world_size == 1:
        return part
    counts = torch.tensor([part["n"], part["confident"] * part["n"], *(h * part["n"] for h in part["histogram"])],
                          dtype=torch.float64, device=fabric.device)
    counts = fabric.all_reduce(counts, reduce_op="sum").cpu()
    n = int(round(float(counts[0])))
    return merge_confidence([{"n": n, "confident": float(counts[1]) / n, "histogram": (counts[2:] / n).tolist(),
                              "threshold": part["threshold"]}])


def fid_and_kid(module: DiffusionModule, images: torch.Tensor, fake: torch.Tensor, info: dict, feature, cfg: DictConfig) -> dict:
    """This rank's real images and its share of the generated ones; the metrics sync across ranks."""
    from diffusion.metrics import fid_kid

    wanted = [m for m in ("fid", "kid") if m in cfg.metrics]
    out = fid_kid(images, fake, feature.to(module.device), wanted, cfg.fid.kid_subset_size, cfg.fid.kid_subsets, cfg.batch_size,
                  module.device, num_real=info["num_real"], num_fake=info["num_fake"])
    result = {}
    if "fid" in out:
        result["fid"] = {"value": out["fid"], **info}
    if "kid" in out:
        result["kid"] = {"value": out["kid"], "std": out["kid_std"], "subset_size": out["kid_subset_size"], **info}
    return result


def evaluate(cfg: DictConfig) -> dict:
    """Check every input, then run :func:`evaluate_rank` on ``devices`` ranks; returns rank 0's results."""
    require_ckpt(cfg)
    unknown = [m for m in cfg.metrics if m not in METRICS]
    if unknown or not cfg.metrics:
        raise UsageError(f"metrics={list(cfg.metrics)} is invalid: allowed metrics are {', '.join(METRICS)}")
    if cfg.get("wandb_run") and not Path(cfg.wandb_run).is_dir():
        raise UsageError(f"wandb_run={cfg.wandb_run} is not a training run directory")
    if cfg.split not in ("val", "train"):
        raise UsageError(f"split={cfg.split!r} is invalid: allowed values are val, train")
    if not isinstance(cfg.devices, int) or isinstance(cfg.devices, bool) or cfg.devices < 1:
        raise UsageError(f"devices={cfg.devices!r} is invalid: it must be a positive integer (ranks to evaluate on)")
    out_dir = Path(cfg.paths.output_dir)
    if (out_dir / "results.json").exists():
        raise UsageError(f"output directory {out_dir} already holds results.json: choose another hydra.run.dir")
    import torch  # every check above needs no torch: a typo answers before these imports
    from lightning.fabric import Fabric

    from diffusion.metrics.classifier import check_labels, check_options, trained_classifier
    from diffusion.training.module import DiffusionModule

    feature = build_or_usage_error("fid", lambda: feature_extractor(cfg)) if {"fid", "kid"} & set(cfg.metrics) else None
    device = resolve_device(cfg.device)
    if device.type == "cuda" and cfg.devices > torch.cuda.device_count():
        raise UsageError(f"devices={cfg.devices} is invalid: this machine has {torch.cuda.device_count()} GPU(s)")
    module = build_or_usage_error("ckpt", lambda: DiffusionModule.from_checkpoint(cfg.ckpt, ema=cfg.ema,
                                                                                 trust=cfg.get("trust_checkpoint", False)))
    if "nll" in cfg.metrics and not hasattr(module.process, "calc_bpd_loop"):
        why = {"edm": "has no discrete variational bound (its likelihood is the probability-flow ODE's, Song et al. "
                      "2021, which this framework does not compute)",
               "flow": "has no discrete variational bound (its likelihood is the ODE's change of variables, which this "
                       "framework does not compute)"}.get(module.process.kind, "is deterministic and has no likelihood bound")
        raise UsageError(f"metrics=[nll] is invalid for {cfg.ckpt}: its {module.process.kind} process {why}; use "
                         "metrics=[fd_classifier] or metrics=[fid,kid]")
    k = cfg.nll.num_timesteps
    if "nll" in cfg.metrics and k is not None and (not isinstance(k, int) or not 1 <= k <= module.process.num_timesteps):
        raise UsageError(f"nll.num_timesteps={k} is invalid: it must be in [1, {module.process.num_timesteps}] (or null for all T)")
    classes = chosen_classes(cfg, module)  # None: an unconditional model (classes= refused for it)
    sample_metrics = bool(set(SAMPLE_METRICS) & set(cfg.metrics))
    if sample_metrics:
        sampler = build_or_usage_error("sampler", lambda: generation_sampler(module, cfg))
        check_guidance(module, sampler, cfg)
        n_samples = cfg.fid.num_samples
        if classes is not None and n_samples is not None and n_samples < len(classes):
            raise UsageError(f"fid.num_samples={n_samples} is too few for the {len(classes)} classes drawn: it must be "
                             f">= {len(classes)} (one sample per class; >= {2 * len(classes)} for the within-class diversity)")
    if "fd_classifier" in cfg.metrics:
        build_or_usage_error("fd_classifier", lambda: (check_labels(data_config(cfg, module)),
                                                       check_options(OmegaConf.to_container(cfg.classifier, resolve=True))))
    save_run_config(cfg)  # every check passed: record the config (a refused run leaves the directory as it was)
    # prepared once, here: ranks never race to build a data cache or to train the classifier
    images, datamodule = evaluation_images(cfg, module, with_datamodule=True)
    if classes is not None and sample_metrics and (cfg.fid.num_samples or len(images)) < len(classes):
        raise UsageError(f"max_images={cfg.max_images} gives {len(images)} samples (fid.num_samples=null: as many as the "
                         f"real images), too few for the {len(classes)} classes drawn: raise max_images or set fid.num_samples")
    classifier, real_labels = None, None
    if "fd_classifier" in cfg.metrics:
        options = OmegaConf.to_container(cfg.classifier, resolve=True)
        classifier = build_or_usage_error("classifier", lambda: trained_classifier(
            data_config(cfg, module), cfg.paths.cache_dir, device, datamodule=datamodule, **options))
        if classes is not None:
            if classifier[1]["num_classes"] != module.num_classes:
                raise UsageError(f"the fd_classifier classifier of data {data_config(cfg, module).get('_target_')} tells "
                                 f"{classifier[1]['num_classes']} classes apart, ckpt={cfg.ckpt} draws "
                                 f"{module.num_classes}: evaluate it on the data it was trained on")
            real_labels = evaluation_labels(cfg, datamodule, len(images))
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # spawned ranks have no Hydra context
    strategy = "ddp_spawn" if cfg.devices > 1 else "auto"
    fabric = Fabric(accelerator=device.type, devices=cfg.devices, strategy=strategy)
    results = fabric.launch(evaluate_rank, resolved, module, images, feature, classifier, classes, real_labels)
    if cfg.get("wandb_run"):
        flat = {}
        for metric, values in results.items():
            if isinstance(values, dict):
                flat.update({f"eval/{metric}_{k}" if k != "value" else f"eval/{metric}": v for k, v in values.items() if isinstance(v, (int, float))})
        run_id = log_to_training_run(cfg.wandb_run, metrics=flat)
        log.info("results logged to W&B run %s", run_id)
    return results


def evaluate_rank(fabric: Fabric, cfg: DictConfig, module: DiffusionModule, all_images: torch.Tensor, feature, classifier=None,
                  classes: torch.Tensor | None = None, all_labels: torch.Tensor | None = None) -> dict:
    """One rank's share: every ``world_size``-th image (and its label, ``all_labels``: the true classes, for a
    class-conditional model's fd_classifier); metric states are reduced so that every rank computes. ``classes``:
    those a class-conditional model draws (None: unconditional)."""
    if not logging.getLogger().handlers:  # a spawned rank: Hydra's logging setup stayed in the parent
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    module = module.to(fabric.device)
    images = all_images[fabric.global_rank :: fabric.world_size]
    real_labels = None if all_labels is None else all_labels[fabric.global_rank :: fabric.world_size]
    log.info("rank %d of %d evaluates %d of %d images", fabric.global_rank, fabric.world_size, len(images), len(all_images))
    results = {"ckpt": str(cfg.ckpt), "ema": bool(cfg.ema and module.has_ema), "split": cfg.split, "world_size": fabric.world_size}
    try:
        if "nll" in cfg.metrics:
            results["nll"] = nll(module, images, cfg, fabric)
        if set(SAMPLE_METRICS) & set(cfg.metrics):
            fake, fake_labels, info = generated(module, len(all_images), cfg, fabric, classes)
            if feature is not None:
                results.update(fid_and_kid(module, images, fake, info, feature, cfg))
            if classifier is not None:
                results["fd_classifier"] = fd_classifier(module, images, fake, info, classifier, cfg, fabric, fake_labels,
                                                         real_labels)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if fabric.global_rank == 0:
        out_dir = Path(cfg.paths.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
        for metric, values in results.items():
            if isinstance(values, dict):
                log.info("%s: %s", metric, ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
        log.info("results written to %s", out_dir / "results.json")
    if fabric.world_size > 1:  # leave together and close the process group: a rank exiting with gloo's threads still
        import torch.distributed as dist  # running aborts (SIGABRT, "terminate called without an active exception")

        fabric.barrier()
        if dist.is_initialized():
            dist.destroy_process_group()
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
@exits_on_usage_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
