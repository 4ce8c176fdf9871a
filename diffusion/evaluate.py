"""Evaluate a checkpoint: ``python -m diffusion.evaluate ckpt=PATH metrics=[nll,fid,kid]``.

``nll``: the negative log-likelihood bound of Ho et al. in bits/dim over the run's validation images, with its
terms (L_T prior, the sum of L_{t-1}, the L_0 decoder) and the loss per timestep quarter. ``fid``/``kid``:
generated samples against the same images (:mod:`diffusion.metrics`). Results are printed and written to
``results.json`` in the output directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from diffusion.metrics import fid_kid, inception, inception_weights
from diffusion.module import DiffusionModule, to_model_range, to_uint8
from diffusion.runtime import UsageError, build_or_usage_error, exits_on_usage_error, log_to_training_run, require_ckpt
from diffusion.sample import draw, resolve_device
from diffusion.train import CONFIG_DIR

log = logging.getLogger("diffusion.evaluate")

METRICS = ("nll", "fid", "kid")


def evaluation_images(cfg: DictConfig, module: DiffusionModule) -> torch.Tensor:
    """The first ``max_images`` uint8 images of the chosen split of the data the model was trained on."""
    data_cfg = cfg.get("data") or module.hparams.get("data")
    if not data_cfg:
        raise UsageError(f"ckpt={cfg.ckpt} stores no data config: pass data=<option> (and its data.root)")
    datamodule = build_or_usage_error("data", lambda: instantiate(data_cfg))
    build_or_usage_error("data", lambda: (datamodule.prepare_data(), datamodule.setup("fit")))
    dataset = datamodule.val_set if cfg.split == "val" else datamodule.train_set
    n = len(dataset) if cfg.max_images is None else min(cfg.max_images, len(dataset))
    if n == 0:
        raise UsageError(f"split={cfg.split} holds no images (data val_fraction is 0?): use split=train")
    return torch.stack([dataset[i] for i in range(n)])


def nll(module: DiffusionModule, images: torch.Tensor, cfg: DictConfig) -> dict:
    generator = torch.Generator(device=module.device).manual_seed(cfg.seed)
    totals, priors, vbs, decoders, terms = [], [], [], [], []
    for start in tqdm(range(0, len(images), cfg.batch_size), desc="NLL (bits/dim)", unit="batch"):
        x0 = to_model_range(images[start : start + cfg.batch_size].to(module.device))
        out = module.process.calc_bpd_loop(module.model, x0, cfg.nll.num_timesteps, generator, cfg.nll.clip_denoised)
        totals.append(out["total_bpd"].cpu())
        priors.append(out["prior_bpd"].cpu())
        vbs.append(out["vb_bpd"].cpu())
        if "decoder_bpd" in out:
            decoders.append(out["decoder_bpd"].cpu())
        if cfg.nll.num_timesteps is None:
            terms.append(out["terms"].cpu().flip(1))  # columns in timestep order 0..T-1
    total = torch.cat(totals)
    result = {
        "bpd": total.mean().item(),
        "bpd_stderr": (total.std() / len(total) ** 0.5).item() if len(total) > 1 else 0.0,
        "prior_bpd": torch.cat(priors).mean().item(),
        "vb_bpd": torch.cat(vbs).mean().item(),
        "num_images": len(total),
        "num_timesteps": cfg.nll.num_timesteps or module.process.num_timesteps,
    }
    if decoders:
        result["decoder_bpd"] = torch.cat(decoders).mean().item()
    if terms:  # the bound per quarter of the timestep range, as improved-diffusion reports it
        per_t = torch.cat(terms).mean(0)
        for q, chunk in enumerate(per_t.chunk(4)):
            result[f"vb_bpd_q{q}"] = chunk.sum().item()
    return result


def feature_extractor(cfg: DictConfig):
    if cfg.fid.feature_extractor is not None:
        return instantiate(cfg.fid.feature_extractor)
    return inception(inception_weights(cfg.fid.weights))


def fid_and_kid(module: DiffusionModule, images: torch.Tensor, feature, cfg: DictConfig) -> dict:
    wanted = [m for m in ("fid", "kid") if m in cfg.metrics]
    n = cfg.fid.num_samples or len(images)
    sampler = module.sampler
    if cfg.fid.num_steps is not None:
        sampler = module.build_sampler(dict(module.hparams.sampler), num_steps=cfg.fid.num_steps)
    fake = to_uint8(draw(module, sampler, n, cfg.batch_size, cfg.seed))
    out = fid_kid(images, fake, feature.to(module.device), wanted, cfg.fid.kid_subset_size, cfg.fid.kid_subsets, cfg.batch_size, module.device)
    info = {"num_real": out["num_real"], "num_fake": out["num_fake"], "sampler": type(sampler).__name__, "num_steps": sampler.num_steps}
    result = {}
    if "fid" in out:
        result["fid"] = {"value": out["fid"], **info}
    if "kid" in out:
        result["kid"] = {"value": out["kid"], "std": out["kid_std"], "subset_size": out["kid_subset_size"], **info}
    return result


def evaluate(cfg: DictConfig) -> dict:
    require_ckpt(cfg)
    unknown = [m for m in cfg.metrics if m not in METRICS]
    if unknown or not cfg.metrics:
        raise UsageError(f"metrics={list(cfg.metrics)} is invalid: allowed metrics are {', '.join(METRICS)}")
    if cfg.get("wandb_run") and not Path(cfg.wandb_run).is_dir():
        raise UsageError(f"wandb_run={cfg.wandb_run} is not a training run directory")
    if cfg.split not in ("val", "train"):
        raise UsageError(f"split={cfg.split!r} is invalid: allowed values are val, train")
    out_dir = Path(cfg.paths.output_dir)
    if (out_dir / "results.json").exists():
        raise UsageError(f"output directory {out_dir} already holds results.json: choose another hydra.run.dir")
    try:
        module = DiffusionModule.from_checkpoint(cfg.ckpt, ema=cfg.ema).to(resolve_device(cfg.device))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    images = evaluation_images(cfg, module)
    results = {"ckpt": str(cfg.ckpt), "ema": bool(cfg.ema and module.has_ema), "split": cfg.split}
    try:
        feature = feature_extractor(cfg) if {"fid", "kid"} & set(cfg.metrics) else None  # fail before any work
        if "nll" in cfg.metrics:
            results["nll"] = nll(module, images, cfg)
        if feature is not None:
            results.update(fid_and_kid(module, images, feature, cfg))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    for metric, values in results.items():
        if isinstance(values, dict):
            log.info("%s: %s", metric, ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
    log.info("results written to %s", out_dir / "results.json")
    if cfg.get("wandb_run"):
        flat = {}
        for metric, values in results.items():
            if isinstance(values, dict):
                flat.update({f"eval/{metric}_{k}" if k != "value" else f"eval/{metric}": v for k, v in values.items() if isinstance(v, (int, float))})
        run_id = log_to_training_run(cfg.wandb_run, metrics=flat)
        log.info("results logged to W&B run %s", run_id)
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
@exits_on_usage_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
