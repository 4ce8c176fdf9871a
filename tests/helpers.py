"""Test-only pieces loaded by training subprocesses (``+callbacks.nan._target_=tests.helpers.NaNAtStep``); the DDP
probe lives in the package (diffusion.training.probe.RankProbe, also used by experiments/gpu_check.py) and is re-exported here."""

import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from diffusion.training.probe import RankProbe, state_hash  # noqa: F401 - tests.helpers.RankProbe in the tests' overrides


class NaNAtStep(Callback):
    """Sets the network's first weight to NaN before optimizer step ``step``: that step's loss (and every later one)
    is NaN, as in a run that diverged there (``+callbacks.nan._target_=tests.helpers.NaNAtStep +callbacks.nan.step=3``)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.model.parameters()).fill_(float("nan"))


class TinyFeatures(torch.nn.Module):
    """A fixed, small feature extractor standing in for Inception in FID/KID tests: uint8 images -> 16 features."""

    num_features = 16

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("weight", torch.randn(8, 3, 3, 3, generator=g))

    def forward(self, x):
        h = torch.nn.functional.conv2d(x.float() / 255.0, self.weight, padding=1)
        return torch.cat([h.mean((2, 3)), h.std((2, 3))], 1)  # 8 means + 8 spreads


def fid_kid_on_a_shard(rank: int, world_size: int, port: int, real, fake, out_dir: str) -> None:
    """One gloo rank of ``tests/metrics/test_metrics.py``'s DDP check: FID/KID from every ``world_size``-th image."""
    import torch.distributed as dist

    from diffusion.metrics import fid_kid

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # KID draws its subsets from the global generator
        out = fid_kid(real[rank::world_size], fake[rank::world_size], TinyFeatures(), kid_subset_size=1000, kid_subsets=3,
                      batch_size=7, num_real=len(real), num_fake=len(fake))
        out["shard"] = len(real[rank::world_size])
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


class WaitForSignalAtStep(Callback):
    """In the middle of training step ``step`` (its batch fetched, before the forward pass) writes the file ``marker``
    and waits, up to ``timeout`` s, until the run's ``ResumableRun`` has received a requeue signal (the test sends it
    when the marker appears), so that the signal arrives mid-step at a known step:
    ``+callbacks.wait._target_=tests.helpers.WaitForSignalAtStep +callbacks.wait.step=4 +callbacks.wait.marker=<file>``."""

    def __init__(self, step: int, marker: str, timeout: float = 120.0):
        self.step, self.marker, self.timeout = step, marker, timeout

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import time

        from diffusion.training.resumable import ResumableRun

        if trainer.global_step != self.step:
            return
        resumable = next(c for c in trainer.callbacks if isinstance(c, ResumableRun))
        Path(self.marker).write_text(str(trainer.global_step))
        deadline = time.monotonic() + self.timeout
        while resumable._received is None and time.monotonic() < deadline:
            time.sleep(0.02)
