"""Writes the notebooks from the cells below (edit here, run `python notebooks/make_notebooks.py`)."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
SETUP = '''import os
# NOTEBOOK_FAST=1 (set by the tests) shrinks every setting so that the notebook runs in seconds
FAST = os.environ.get("NOTEBOOK_FAST") == "1"
import matplotlib.pyplot as plt
import torch
from torchvision.utils import make_grid

def show(images, title="", nrow=8):
    """images in [-1, 1], (N, C, H, W)"""
    grid = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=nrow, padding=1)
    plt.figure(figsize=(8, 8 * grid.shape[1] / grid.shape[2]))
    plt.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray")
    plt.axis("off")
    plt.title(title)
    plt.show()'''

NOTEBOOKS = {
    "01_forward_process_and_schedules.ipynb": [
        new_markdown_cell("# The forward process and the noise schedules\n\nHo et al. (2020) eq. 4: "
                          "$q(x_t|x_0) = \\mathcal{N}(\\sqrt{\\bar\\alpha_t}x_0, (1-\\bar\\alpha_t)I)$. "
                          "How fast the signal disappears is the schedule's choice."),
        new_code_cell(SETUP),
        new_code_cell('''from diffusion.processes.schedules import LinearSchedule, CosineSchedule, ContinuousCosineSchedule
T = 1000
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
for name, sched in [("linear", LinearSchedule(T)), ("cosine", CosineSchedule(T)), ("continuous cosine", ContinuousCosineSchedule(T))]:
    tab = sched.table()
    a.plot(tab.alphas_cumprod, label=name); b.semilogy(tab.betas, label=name)
a.set(title="alpha_bar_t", xlabel="t"); b.set(title="beta_t", xlabel="t"); a.legend(); plt.show()'''),
        new_code_cell('''from diffusion.data import DigitsDataModule
from diffusion.training.module import to_model_range
from diffusion.processes import GaussianDiffusion
dm = DigitsDataModule(image_size=16); dm.setup()
x0 = to_model_range(torch.stack([dm.train_set[i] for i in range(6)]))
for name, sched in [("linear", LinearSchedule(T)), ("cosine", CosineSchedule(T))]:
    process = GaussianDiffusion(sched)
    times = torch.linspace(0, T - 1, 9).long()
    noise = torch.randn_like(x0)
    cols = torch.stack([process.q_sample(x0, torch.full((6,), int(t)), noise) for t in times], 1)
    show(cols.flatten(0, 1), f"{name}: t = " + ", ".join(str(int(t)) for t in times), nrow=9)'''),
        new_code_cell('''# the empirical moments of q_sample match the closed form
process = GaussianDiffusion(LinearSchedule(T))
t = 300
xt = process.q_sample(x0[:1].expand(20000, -1, -1, -1), torch.full((20000,), t))
abar = process.alphas_cumprod[t]
print("mean error", (xt.mean(0) - abar.sqrt() * x0[0]).abs().max().item(), " var error", (xt.var(0) - (1 - abar)).abs().max().item())'''),
    ],
    "02_train_and_sample_ddpm_vs_ddim.ipynb": [
        new_markdown_cell("# Train a small model, then sample it with DDPM (1000 steps) and DDIM (50 steps)\n\n"
                          "The same Lightning module and data module as `python -m diffusion.train`, built in Python."),
        new_code_cell(SETUP),
        new_code_cell('''import lightning as L, tempfile, time
from diffusion.training.module import DiffusionModule
from diffusion.data import DigitsDataModule
from diffusion.training.ema import EMA
out = tempfile.mkdtemp()
module = DiffusionModule(
    model={"_target_": "diffusion.models.UNet", "in_channels": 1, "image_size": 16, "base_channels": 8 if FAST else 16,
           "channel_mult": [1, 2, 4], "num_res_blocks": 1 if FAST else 2, "attention_resolutions": [4]},
    schedule={"_target_": "diffusion.processes.schedules.LinearSchedule", "T": 1000},
    sampler={"_target_": "diffusion.samplers.ddim.DDIMSampler", "num_steps": 50, "clip_denoised": True},
    optimizer={"_target_": "torch.optim.AdamW", "lr": 2e-3}, lr_warmup_steps=100, sample_every_n_epochs=0)
trainer = L.Trainer(max_epochs=1 if FAST else 20, limit_train_batches=3 if FAST else None, logger=False,
                    callbacks=[EMA(decay=0.995)], default_root_dir=out, enable_checkpointing=False)
trainer.fit(module, DigitsDataModule(image_size=16, batch_size=64))'''),
        new_code_cell('''from diffusion.samplers.ddim import DDIMSampler
from diffusion.samplers.ddpm import DDPMSampler
n = 4 if FAST else 16
for sampler in [DDPMSampler(module.process, clip_denoised=True), DDIMSampler(module.process, num_steps=50, clip_denoised=True)]:
    start = time.time()
    images = module.sample(n, sampler=sampler, generator=torch.Generator().manual_seed(0)).samples
    show(images, f"{type(sampler).__name__}: {sampler.num_steps} steps, {time.time() - start:.1f} s", nrow=4)'''),
    ],
    "03_checkpoint_figures.ipynb": [
        new_markdown_cell("# Load a checkpoint (no config needed) and draw the seeds' figures\n\n"
                          "Set `CKPT` to a `checkpoints/last.ckpt` written by `python -m diffusion.train`."),
        new_code_cell(SETUP + '''
CKPT = os.environ.get("DIFFUSION_CKPT", "outputs/train/<run>/checkpoints/last.ckpt")'''),
        new_code_cell('''from diffusion.training.module import DiffusionModule
module = DiffusionModule.from_checkpoint(CKPT)   # EMA weights; ema=False for the raw ones
print(module.hparams.schedule, module.hparams.sampler, sep="\\n")
images = module.sample(4 if FAST else 16, generator=torch.Generator().manual_seed(0)).samples
show(images, "samples (EMA weights)", nrow=4)'''),
        new_code_cell('''# the reverse process in 10 transitions (DDIM here; DDPMSampler for the ancestral chain)
from diffusion.samplers.ddim import DDIMSampler
out = module.sample(4, sampler=DDIMSampler(module.process, num_steps=20 if FAST else 100, clip_denoised=True),
                    generator=torch.Generator().manual_seed(1), return_trajectory=True)
picks = torch.linspace(0, out.trajectory.shape[0] - 1, 11).round().long()
show(out.trajectory[picks].transpose(0, 1).flatten(0, 1), "x_T -> x_0", nrow=11)'''),
        new_code_cell('''# the bound in bits/dim on a few validation images (an unbiased 50-term estimate)
from diffusion.data import DigitsDataModule
from diffusion.training.module import to_model_range
from hydra.utils import instantiate
dm = instantiate(module.hparams.data) if module.hparams.get("data") else DigitsDataModule(image_size=16)
dm.setup()
x0 = to_model_range(torch.stack([dm.val_set[i] for i in range(8)]))
bpd = module.process.calc_bpd_loop(module.model, x0, num_timesteps=10 if FAST else 50, generator=torch.Generator().manual_seed(0))
print(f"{bpd['total_bpd'].mean():.3f} bits/dim (prior {bpd['prior_bpd'].mean():.4f})")'''),
    ],
}

if __name__ == "__main__":
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
        nbformat.write(nb, HERE / name)
        print("written", HERE / name)
