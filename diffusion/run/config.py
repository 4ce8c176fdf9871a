"""The Hydra side of every CLI: the configuration directory, the resolvers conf/ uses, the shared ConfigStore, the
run's config written once its checks pass, and config groups instantiated with one-line errors."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion.checks import root_cause
from diffusion.run.errors import UsageError
from diffusion.run.jobs import hydra_job, is_rank_zero
from diffusion.run.outputs import write_text_atomic

#: the Hydra configuration directory every CLI composes from
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")

def _deepest_resolution(image_size, channel_mult) -> int:
    from diffusion.models.settings import deepest_resolution  # torch-free

    return deepest_resolution(image_size, channel_mult)


def register_resolvers() -> None:
    """The OmegaConf resolvers conf/ uses, registered when this module is imported (every CLI imports it for
    CONFIG_DIR before Hydra composes, and so does every test that composes a config):
    ``${deepest_resolution:<image_size>,<channel_mult>}``, the UNet's lowest-resolution level in pixels
    (conf/model/unet.yaml's default ``attention_resolutions``: the default model fits the data it is given)."""
    if not OmegaConf.has_resolver("deepest_resolution"):
        OmegaConf.register_new_resolver("deepest_resolution", _deepest_resolution)


register_resolvers()


def share_config_store() -> None:
    """Make Hydra share its ConfigStore (a process-wide singleton) instead of deep-copying it.

    Each ``CachingConfigRepository`` deep-copies its repository, and with it the StructuredConfigSource's reference
    to ``ConfigStore.instance()``: every structured config Hydra and its plugins registered (the Hydra schema, the
    submitit launchers, the Optuna sweeper and samplers). ``--help`` builds one such repository per config group it
    lists (about 125 here), which took 1.3 s of a 2.4 s ``python -m diffusion.train --help``; a sweep builds one per
    job. Reading from the store already copies what it returns (``ConfigStore.load``), so sharing it changes no
    config: Hydra's main branch reads the live singleton instead of a stored one (facebookresearch/hydra#2928;
    hydra-core 1.3.8 still stores and copies it). The help texts with and without this are compared in tests/test_cli_startup.py."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.__deepcopy__ = lambda self, memo: self


share_config_store()


def save_run_config(cfg: DictConfig, keep_existing: bool = False) -> Path | None:
    """Write what Hydra writes into ``<run>/.hydra/`` (config.yaml, hydra.yaml, overrides.yaml), once the run's
    checks have passed: conf/hydra sets ``output_subdir: null`` so that a refused run (a used directory, a bad value)
    changes nothing in the directory it was pointed at. Only the launching process writes; each file is written
    under a temporary name and renamed into place. ``keep_existing`` (a requeued job, same command line) leaves the
    files of the job's first start as they are. Returns the folder, or None outside Hydra or on other ranks."""
    hc = hydra_job()
    if hc is None or not is_rank_zero():
        return None
    folder = Path(hc.runtime.output_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", OmegaConf.create({"hydra": hc})),
                       ("overrides.yaml", hc.overrides.task)):
        if not (keep_existing and (folder / name).is_file()):
            write_text_atomic(folder / name, OmegaConf.to_yaml(node))
    return folder


# ----------------------------------------------------------------------------------------------- building
def instantiate_group(group: DictConfig | None, what: str) -> list:
    """Instantiate every entry of a dict-of-configs group (callbacks, logger); ``null`` entries are skipped."""
    objects = []
    for name, conf in (group or {}).items():
        if conf is None:
            continue
        if "_target_" not in conf:
            raise UsageError(f"{what}.{name} has no _target_: every {what} entry must name a class")
        try:
            objects.append(instantiate(conf))
        except Exception as exc:  # noqa: BLE001 - reported as one line naming the entry
            raise UsageError(f"{what}.{name}: {root_cause(exc)}") from exc
    return objects


def resolved_config(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
