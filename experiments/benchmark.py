"""Measure training and sampling throughput for any config: images/s, peak memory, parameter count.

    python experiments/benchmark.py                                  # the digits default
    python experiments/benchmark.py model.base_channels=64 data.image_size=32 --batch 32 --device cuda
    python experiments/benchmark.py --out outputs/bench              # also writes benchmark.json there

Overrides are the training CLI's Hydra overrides, so the benchmark measures exactly what training would run.
Each measurement is the median of ``--repeats`` timed runs of ``--iters`` iterations after ``--warmup``
iterations; CUDA work is synchronised before each clock read. Peak memory is CUDA's max allocated bytes on a GPU
and the process's peak resident set size (RSS) on the CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion.module import DiffusionModule  # noqa: E402
from diffusion.train import CONFIG_DIR, build_module  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, iters: int, repeats: int) -> float:
    """Median seconds per call of ``fn``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def benchmark_loader(datamodule, batches: int) -> float:
    """Images/s the training DataLoader delivers (from the cache for image folders), after one warm-up batch."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader())
    next(loader)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            n += next(loader).shape[0]
        except StopIteration:
            break
    return n / (time.perf_counter() - start)


def benchmark_module(module: DiffusionModule, batch: int, device: torch.device, warmup: int, iters: int, repeats: int) -> dict:
    module = module.to(device)
    model, process = module.model, module.process
    c, h, w = module.image_shape
    x0 = torch.rand(batch, c, h, w, device=device) * 2 - 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        t = torch.randint(0, process.num_timesteps, (batch,), device=device)
        loss = process.training_losses(model, x0, t).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    train_s = timed(train_step, device, warmup, iters, repeats)

    model.eval()
    xt = torch.randn_like(x0)
    t = torch.full((batch,), process.num_timesteps // 2, device=device, dtype=torch.long)
    sampler = module.sampler

    @torch.inference_mode()
    def sample_step():
        eps = model(xt, t)
        sampler.step(eps, sampler.timesteps[len(sampler.timesteps) // 2], xt)

    sample_s = timed(sample_step, device, warmup, iters, repeats)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "train_images_per_s": batch / train_s,
        "train_step_ms": train_s * 1e3,
        "sample_images_per_s_per_step": batch / sample_s,
        "sample_step_ms": sample_s * 1e3,
        "peak_memory_mb": peak_memory_mb(device),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m diffusion.train")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the config's data.batch_size)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="directory to write benchmark.json into")
    args = parser.parse_args(argv)

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=args.overrides)
    device = torch.device(args.device)
    batch = args.batch or cfg.data.batch_size
    datamodule = instantiate(cfg.data)  # the network's channels and size follow the data, as in training
    module = build_module(cfg, channels=datamodule.channels, image_size=datamodule.image_size)
    result = {
        "config": {"overrides": args.overrides, "batch": batch, "image_size": cfg.data.image_size},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "ours": benchmark_module(module, batch, device, args.warmup, args.iters, args.repeats),
        "data_loader_images_per_s": benchmark_loader(datamodule, batches=10),
    }
    r = result["ours"]
    print(f"device: {result['device']}   batch {batch}   image {cfg.data.image_size}px")
    print(f"{'':8}{'params':>10}{'train img/s':>14}{'sample img/s/step':>20}{'peak MB':>10}")
    print(f"{'ours':8}{r['params'] / 1e6:>9.2f}M{r['train_images_per_s']:>14.1f}{r['sample_images_per_s_per_step']:>20.1f}{r['peak_memory_mb']:>10.0f}")
    print(f"data loader ({cfg.data._target_.rsplit('.', 1)[-1]}): {result['data_loader_images_per_s']:.0f} images/s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "benchmark.json").write_text(json.dumps(result, indent=2))
        print(f"written {args.out / 'benchmark.json'}")
    return result


if __name__ == "__main__":
    main()
