"""Checkpoints and exported folders written by earlier versions, read in today's layout.

A checkpoint's hyper-parameters name the classes it was built with by their import paths (``_target_``), and older
ones keep the process options among the module's. Every reader upgrades them here (:func:`upgrade_hyper_parameters`:
``sharing.checkpoints.read_checkpoint``, exported folders, and ``DiffusionModule.__init__`` for Lightning's own
``load_from_checkpoint``), so a file written by any earlier layout loads and samples as it was trained
(tests/sharing/test_legacy_checkpoints.py, on the files of tests/data/legacy).
"""

from __future__ import annotations

from collections.abc import Mapping

#: the process options that lived among the module's arguments before conf/process/ held them
LEGACY_PROCESS_KEYS = ("variance", "loss_type", "objective", "min_snr_gamma", "hybrid_lambda", "timestep_sampling")

#: classes whose import path changed, old -> new: before the samplers/ and processes/ packages
RENAMED_CLASSES = {
    "diffusion.samplers.DDPMSampler": "diffusion.samplers.ddpm.DDPMSampler",
    "diffusion.samplers.DDIMSampler": "diffusion.samplers.ddim.DDIMSampler",
    "diffusion.samplers.ColdSampler": "diffusion.samplers.cold.ColdSampler",
    "diffusion.blur.BlurSchedule": "diffusion.processes.BlurSchedule",
}
#: modules that moved, old -> new (the package layout of issue #27: the math under processes/, sharing under sharing/)
MOVED_MODULES = {
    "diffusion.schedules": "diffusion.processes.schedules",
    "diffusion.diffusers_bridge": "diffusion.sharing.diffusers_bridge",
}
#: the hyper-parameters that hold a class config (a dict with ``_target_``)
CLASS_CONFIGS = ("model", "schedule", "sampler", "process", "optimizer", "data")


def upgrade_target(target):
    """Today's import path of a class that a checkpoint names by an earlier one; other values as they are."""
    if not isinstance(target, str):
        return target
    if target in RENAMED_CLASSES:
        return RENAMED_CLASSES[target]
    module, _, name = target.rpartition(".")
    return f"{MOVED_MODULES[module]}.{name}" if module in MOVED_MODULES else target


def has_legacy_layout(hparams: dict) -> bool:
    """Whether these hyper-parameters are of an earlier layout: no ``process`` (or the process options among the
    module's), or a class path that :func:`upgrade_target` changes."""
    if hparams.get("process") is None or any(k in hparams for k in LEGACY_PROCESS_KEYS):
        return True
    return any(isinstance(hparams.get(k), Mapping) and upgrade_target(hparams[k].get("_target_")) != hparams[k].get("_target_")
               for k in CLASS_CONFIGS)


def upgrade_hyper_parameters(hparams: dict) -> dict:
    """A checkpoint's hyper-parameters in today's layout: checkpoints written before ``conf/process/`` kept the
    process options at the top level, and every earlier layout names some classes by their old paths
    (:func:`upgrade_target`)."""
    hparams = dict(hparams)
    if hparams.get("process") is None:
        hparams.pop("process", None)
        old = {k: hparams.pop(k) for k in LEGACY_PROCESS_KEYS if k in hparams}
        blur = str(hparams["schedule"].get("_target_", "")).endswith("BlurSchedule")
        if blur:
            process = {"_target_": "diffusion.processes.BlurDiffusion", "loss_type": old.get("loss_type", "l1"),
                       "timestep_sampling": old.get("timestep_sampling", "uniform")}
        else:
            process = {"_target_": "diffusion.processes.GaussianDiffusion", **old}
            if process.get("variance") == "learned_range":
                process["variance"] = "fixed_small"  # the network's learn_sigma sets it
        hparams["process"] = {**process, "_partial_": True}
    for key in CLASS_CONFIGS:
        config = hparams.get(key)
        if isinstance(config, Mapping) and "_target_" in config:
            hparams[key] = {**config, "_target_": upgrade_target(config["_target_"])}
    return hparams
