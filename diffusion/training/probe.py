"""A diagnostic callback: each rank's EMA-weights hash and training throughput, written when training ends."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from diffusion.training.ema import EMA


def state_hash(state: dict) -> str:
    """SHA-256 of a state dict's names and bytes, in name order: equal hashes mean bit-for-bit equal weights."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RankProbe(Callback):
    """A diagnostic: each rank writes ``probe_rank<R>.json`` into the run directory when training ends: who trained
    (global rank, world size, steps, T), the hash of its EMA weights (:func:`state_hash`; equal on every rank of a
    correct DDP run) and its training throughput. Added from the command line, never by default:
    ``+callbacks.probe._target_=diffusion.training.probe.RankProbe`` (the DDP tests, experiments/gpu_check.py).

    Throughput: ``train_images`` and ``train_seconds`` count the batches after the first of each epoch, from one
    batch's end to the next (CUDA synchronised), so data-loader start-up, validation and compilation stay out."""

    def __init__(self):
        self.train_images, self.train_seconds = 0, 0.0
        self._last: tuple[int, float] | None = None  # (epoch, time) of the previous batch end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        if self._last is not None and self._last[0] == trainer.current_epoch:
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            self.train_images += int(images.shape[0])
            self.train_seconds += now - self._last[1]
        self._last = (trainer.current_epoch, now)

    def on_train_end(self, trainer, pl_module):
        ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
        record = {
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "T": pl_module.process.num_timesteps,
            "ema_hash": state_hash(ema.average_state_dict()),
            "train_images": self.train_images,
            "train_seconds": self.train_seconds,
            "device": str(pl_module.device),
        }
        path = Path(trainer.default_root_dir) / f"probe_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record))
