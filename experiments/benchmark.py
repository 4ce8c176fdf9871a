"""Throughput and memory of this framework's UNet next to diffusers' UNet2DModel of matched size, in one process.

    python experiments/benchmark.py                                     # the digits default, ours vs diffusers
    python experiments/benchmark.py model.base_channels=128 data.image_size=64 data=folder data.root=... --batch 16
    python experiments/benchmark.py trainer.precision=bf16-mixed model.compile=true --device cuda
    python experiments/benchmark.py experiment=human64 model.gradient_checkpointing=true --no-diffusers
    python experiments/benchmark.py --out outputs/bench                 # also writes benchmark.json there
    python experiments/benchmark.py --processes edm,flow --no-diffusers  # the three families' training step, same network

On a GPU machine, ``python experiments/gpu_check.py --out outputs/gpu_check`` runs this comparison with
bf16-mixed, compile and channels_last on two configurations, plus whole DDIM-50 chains, human64's peak memory with
and without gradient checkpointing and a DDP run on every GPU, into one JSON + Markdown table (see its docstring).

Overrides are the training CLI's Hydra overrides, so "ours" is exactly what training would run. diffusers
(``pip install -e ".[bench]"``) gets ``UNet2DModel`` configured to the same widths, levels, blocks per level and
attention resolutions (its parameter count must be within 10% of ours, or the script stops), the optimizer
of diffusers' training example (``torch.optim.AdamW`` with our hyper-parameters and PyTorch's default multi-tensor
update; ours is as configured, fused by default), the same precision (``trainer.precision``: autocast for both) and the same ``model.channels_last`` /
``model.compile`` switches, and its own ``DDPMScheduler.add_noise`` / ``DDIMScheduler.step``.

``--processes edm,flow`` adds a contender per family (``process=<kind>`` appended to the overrides: the same network,
data and optimizer), timed in the same turns, with its own training-time draw (log-normal sigma, logit-normal t)
and loss; ``ratio_to_ours`` gives each one's figures over the configured process's (``ours``).

Method: both models are warmed up, then timed in turns (ours, diffusers, ours, ...) so that drifts of the machine
hit both alike; each figure is the median of ``--repeats`` runs of ``--iters`` iterations; CUDA is synchronised
before each clock read. Peak memory is measured per model around one training and one sampling step: CUDA's max
allocated bytes on a GPU, the process's peak resident set size (RSS, reset through /proc/self/clear_refs) on a CPU.
"Sampler overhead" is the time of ``sampler.step`` (everything in a denoising step but the network) as a
percentage of the network's forward pass, for DDIM and DDPM.

Achieved FLOP/s: the floating-point operations of one training step (forward and backward: matmuls, convolutions,
attention, as ``torch.utils.flop_counter.FlopCounterMode`` counts them, the recomputation of gradient checkpointing
included; elementwise work such as norms, activations and the optimizer counts nothing) and of one sampling step
(forward), counted once per model on the eager path, divided by the step's measured median time. The machine's
peak is a timed square matmul (``matmul_peak``: sizes doubled from 256 while one product takes under 0.1 s, up to
2048 on a CPU and 8192 on a GPU; the best rate), in fp32 and bf16 (and fp16 for ``16-mixed``), with this process's
threads and matmul precision settings; "% of peak" is the achieved rate against the peak of the run's precision
(fp32 for ``32-true``, bf16 for ``bf16-mixed``, fp16 for ``16-mixed``). On a CPU without native bf16 (AVX2 only)
the bf16 matmul is a slow fallback (~1 GFLOP/s against ~80-130 in fp32 on a 2-core EPYC) that oneDNN's bf16
convolutions outrun, so a bf16-mixed run there can read over 100%: bf16-mixed does not pay on such a CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion.models.blocks import group_norm  # noqa: E402
from diffusion.models.speed import apply_speed_options, split_speed_options  # noqa: E402
from diffusion.run.errors import UsageError  # noqa: E402
from diffusion.train import CONFIG_DIR, build_module  # noqa: E402
from diffusion.training.module import DiffusionModule  # noqa: E402
from diffusion.training.optim import build_optimizer  # noqa: E402

MATCH_TOLERANCE = 0.10
FIELDS = ("params", "train_images_per_s", "train_step_ms", "sample_images_per_s_per_step", "sample_step_ms", "peak_memory_mb",
          "train_gflop", "train_gflop_per_s", "train_pct_of_peak", "sample_gflop", "sample_gflop_per_s", "sample_pct_of_peak")
#: the dtype whose matmul peak a run's precision is compared with
PEAK_DTYPE = {"32-true": "fp32", "32": "fp32", "bf16-mixed": "bf16", "16-mixed": "fp16"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], None], device: torch.device, iters: int) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def interleaved(fns: dict[str, Callable[[], None]], device: torch.device, warmup: int, iters: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in turns after warm-up."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_time(fn, device, iters))
    return {name: statistics.median(t) for name, t in times.items()}


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS (Linux)
    except OSError:
        pass


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # never reset: the whole process's peak


def peak_memory_mb(steps: list[Callable[[], None]], device: torch.device) -> float:
    _sync(device)
    _reset_peak(device)
    for step in steps:
        step()
    _sync(device)
    return _peak_mb(device)


# scaled_dot_product_attention's CPU kernel is missing from FlopCounterMode's registry (only the CUDA ones are in)
# (the formulas take the shapes of the arguments, in the kernels' order)
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad_out, q, k, v),
}


def count_flops(fn: Callable[[], None]) -> int:
    """Floating-point operations of one call of ``fn`` (matmuls, convolutions, attention; forward and backward), as
    ``torch.utils.flop_counter.FlopCounterMode`` counts them, on the eager path (a compiled network is run eagerly:
    the count is the same work)."""
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


@functools.lru_cache(maxsize=None)
def _matmul_peak(device: str, dtype: str, threads: int, min_seconds: float) -> dict:
    device_, dt = torch.device(device), DTYPES[dtype]
    largest = 8192 if device_.type == "cuda" else 2048
    best, n = {"gflop_per_s": 0.0, "n": 0}, 256
    while n <= largest:
        a = torch.randn(n, n, device=device_).to(dt)
        b = torch.randn(n, n, device=device_).to(dt)
        a @ b  # warm-up (kernel selection, first-touch of the output)
        _sync(device_)
        calls, start = 0, time.perf_counter()
        while True:
            a @ b
            calls += 1
            _sync(device_)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        rate = 2 * n**3 * calls / elapsed / 1e9
        if rate > best["gflop_per_s"]:
            best = {"gflop_per_s": rate, "n": n}
        if elapsed / calls > 0.1:  # a larger product would take too long (bf16 without native support on a CPU)
            break
        n *= 2
    return best


def matmul_peak(device: torch.device, dtype: str, min_seconds: float = 0.1) -> dict:
    """The machine's measured matmul rate in ``dtype`` (fp32, bf16 or fp16): ``{"gflop_per_s", "n"}``, the best of
    square n x n products for n = 256, 512, ... (each timed for ``min_seconds``), measured once per process."""
    return dict(_matmul_peak(str(device), dtype, torch.get_num_threads(), min_seconds))


# --------------------------------------------------------------------------------------------- contenders
class Contender:
    """One network with its training step and one denoising step, under the benchmark's precision."""

    def __init__(self, name: str, model: torch.nn.Module, forward: Callable, loss: Callable, sample_step: Callable,
                 x0: torch.Tensor, T: int, optimizer_cfg: dict, autocast, draw_t: Callable | None = None):
        self.name, self.model, self.x0, self.T, self.autocast = name, model, x0, T, autocast
        #: the training times of a step (None: integer t uniform in 0..T-1, a DDPM's and diffusers' draw)
        self.draw_t = draw_t
        self.forward, self.loss, self._sample_step = forward, loss, sample_step
        self.optimizer = build_optimizer(optimizer_cfg, model.parameters(), x0.device)
        self.xt = torch.randn_like(x0)
        self.t_mid = torch.full((x0.shape[0],), T // 2, device=x0.device, dtype=torch.long)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _mode(self, training: bool) -> None:
        # only on a change (Lightning switches once per epoch): Module.train() walks every submodule, 0.6-0.7 ms
        # for these UNets, which is no part of a step
        if self.model.training != training:
            self.model.train(training)

    def train_step(self) -> None:
        self._mode(True)
        # the last step's gradients go before the forward pass, as in Lightning's loop and diffusers' training
        # example (which zeroes them after its step): they never sit beside this step's activations
        self.optimizer.zero_grad(set_to_none=True)
        if self.draw_t is None:
            t = torch.randint(0, self.T, (self.x0.shape[0],), device=self.x0.device)
        else:
            t = self.draw_t()
        with self.autocast():
            loss = self.loss(self.x0, t)
        loss.backward()
        self.optimizer.step()

    @torch.inference_mode()
    def sample_step(self) -> None:
        self._mode(False)
        with self.autocast():
            self._sample_step(self.xt, self.t_mid)

    @torch.inference_mode()
    def forward_only(self) -> None:
        self._mode(False)
        with self.autocast():
            self.forward(self.xt, self.t_mid)


def ours(module: DiffusionModule, x0, optimizer_cfg, autocast, name: str = "ours") -> tuple[Contender, dict]:
    model, process, sampler = module.model, module.process, module.sampler
    def sample_step(xt, t):  # one step (the first, from a fresh state: any sampler, multistep ones included)
        sampler.reset()
        sampler.step(model(xt, t), 0, xt)

    # a continuous-time process draws its own training times (sigma, or t in [0, 1]) as training does
    draw_t = (lambda: process.sample_timesteps(x0.shape[0], x0.device)) if process.continuous_time else None
    contender = Contender(name, model, model, lambda x0, t: process.training_losses(model, x0, t).mean(),
                          sample_step, x0, process.num_timesteps, optimizer_cfg, autocast, draw_t)
    if process.kind != "gaussian":  # the sampler-overhead rows: its own sampler (DDPM reverses only gaussian)
        return contender, {sampler.name: sampler}
    samplers = {sampler.name: sampler, "ddpm": module.named_sampler("ddpm", clip_denoised=False)}
    return contender, samplers


def diffusers_config(model_cfg: dict, channels: int, image_size: int) -> dict:
    """``UNet2DModel`` arguments with this framework's UNet's widths, depth and attention placement."""
    mult, base = list(model_cfg["channel_mult"]), model_cfg["base_channels"]
    widths = [base * m for m in mult]
    resolutions = [image_size // 2**i for i in range(len(mult))]
    attn = set(model_cfg.get("attention_resolutions") or [])
    heads = model_cfg.get("num_heads", 1)
    attn_widths = [w for w, r in zip(widths, resolutions) if r in attn] or [widths[-1]]
    return {
        "sample_size": image_size,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": widths,
        "layers_per_block": model_cfg["num_res_blocks"],
        "down_block_types": ["AttnDownBlock2D" if r in attn else "DownBlock2D" for r in resolutions],
        "up_block_types": ["AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(resolutions)],
        "norm_num_groups": min(group_norm(w).num_groups for w in widths),
        "attention_head_dim": None if heads == 1 else min(attn_widths) // heads,
        "dropout": model_cfg.get("dropout", 0.0),
    }


def theirs(config: dict, process, x0, optimizer_cfg, autocast, speed: dict, num_steps: int) -> Contender:
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    model = apply_speed_options(UNet2DModel(**config).to(x0.device), **speed)
    betas = process.betas.detach().cpu().float()
    train_scheduler = DDPMScheduler(num_train_timesteps=len(betas), trained_betas=betas.numpy())
    sampler = DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas.numpy())
    sampler.set_timesteps(num_steps)
    train_scheduler.alphas_cumprod = train_scheduler.alphas_cumprod.to(x0.device)
    t_grid = int(sampler.timesteps[len(sampler.timesteps) // 2])

    def loss(x0, t):
        noise = torch.randn_like(x0)
        return F.mse_loss(model(train_scheduler.add_noise(x0, noise, t), t).sample, noise)

    def sample_step(xt, t):
        sampler.step(model(xt, t).sample, t_grid, xt)

    return Contender("diffusers", model, lambda x, t: model(x, t).sample, loss, sample_step, x0, len(betas), optimizer_cfg, autocast)


def sampler_overhead_pct(contender: Contender, samplers: dict, device, warmup: int, iters: int, repeats: int) -> dict:
    """``sampler.step`` alone, as a percentage of one network forward pass."""
    eps, xt = torch.randn_like(contender.xt), contender.xt
    fns = {"network": contender.forward_only}
    for name, sampler in samplers.items():
        # the first step, from a fresh state (a multistep sampler refuses a middle step without its history)
        fns[name] = lambda sampler=sampler: (sampler.reset(), sampler.step(eps, 0, xt))
    with torch.inference_mode():
        times = interleaved(fns, device, warmup, iters, repeats)
    return {f"{name}_pct": 100 * times[name] / times["network"] for name in samplers}


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


def _autocast(precision: str, device: torch.device):
    if precision in ("32-true", "32", 32):
        return nullcontext
    dtypes = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"trainer.precision={precision!r} is not benchmarked: use 32-true, bf16-mixed or 16-mixed")
    return lambda: torch.autocast(device.type, dtype=dtypes[precision])


# --------------------------------------------------------------------------------------------- main
@dataclass
class Setup:
    """What :func:`measure` times: the composed config, the module training would build, and the contenders
    (``ours`` and, unless left out, ``diffusers``) on one synthetic batch ``x0``."""

    cfg: DictConfig
    device: torch.device
    datamodule: object
    module: DiffusionModule
    x0: torch.Tensor
    contenders: dict
    samplers: dict
    info: dict  # the result's header: config, device, versions


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def build(overrides: list[str], batch: int | None = None, device: str | torch.device = "cpu", with_diffusers: bool = True,
          processes: tuple[str, ...] = ()) -> Setup:
    """Compose the training config from ``overrides`` and build both contenders on a random batch (and one contender
    per name in ``processes``: the overrides plus ``process=<name>``, named ``ours (<name>)``).

    Raises UsageError when diffusers is missing or its matched model is more than MATCH_TOLERANCE apart."""
    cfg = _compose(overrides)
    device = torch.device(device)
    batch = batch or cfg.data.batch_size
    datamodule = instantiate(cfg.data)  # the network's channels and size follow the data, as in training
    channels, size = datamodule.channels, datamodule.image_size
    module = build_module(cfg, channels=channels, image_size=size).to(device)
    model_cfg, speed = split_speed_options(OmegaConf.to_container(cfg.model, resolve=True))
    optimizer_cfg = OmegaConf.to_container(cfg.optimizer, resolve=True)
    autocast = _autocast(cfg.trainer.precision, device)
    torch.manual_seed(0)
    x0 = torch.rand(batch, channels, size, size, device=device) * 2 - 1

    contenders = {}
    contenders["ours"], samplers = ours(module, x0, optimizer_cfg, autocast)
    for kind in processes:  # the same network, data and optimizer under another family's loss and time draw
        other = build_module(_compose([*overrides, f"process={kind}"]), channels=channels, image_size=size).to(device)
        contenders[f"ours ({kind})"], _ = ours(other, x0, optimizer_cfg, autocast, name=f"ours ({kind})")
    info: dict = {
        "config": {"overrides": list(overrides), "batch": batch, "image_size": size, "channels": channels,
                   "precision": cfg.trainer.precision, **{k: speed.get(k, False) for k in ("channels_last", "compile")},
                   "gradient_checkpointing": bool(model_cfg.get("gradient_checkpointing", False))},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "process": cfg.process._target_.rsplit(".", 1)[-1],
        "processes": list(processes),
    }
    if with_diffusers:
        try:
            import diffusers
        except ImportError:
            raise UsageError('diffusers is not installed: pip install -e ".[bench]" (or pass --no-diffusers)') from None
        matched = diffusers_config(model_cfg, channels, size)
        # diffusers' own training example (train_unconditional.py) builds torch.optim.AdamW with PyTorch's defaults
        theirs_optimizer = {k: v for k, v in optimizer_cfg.items() if k not in ("fused", "foreach")}
        contenders["diffusers"] = theirs(matched, module.process, x0, theirs_optimizer, autocast, speed, module.sampler.num_steps)
        ratio = contenders["diffusers"].params / contenders["ours"].params
        if abs(ratio - 1) > MATCH_TOLERANCE:
            raise UsageError(f"diffusers' matched UNet2DModel has {ratio:.2f}x our parameters: more than {MATCH_TOLERANCE:.0%} apart")
        info["diffusers_version"] = diffusers.__version__
        info["diffusers_config"] = matched
    return Setup(cfg, device, datamodule, module, x0, contenders, samplers, info)


def measure(setup: Setup, warmup: int = 2, iters: int = 3, repeats: int = 5, loader: bool = True) -> dict:
    """Peak memory, training and one-step sampling throughput of each contender, the sampler overhead and (with
    ``loader``) the data loader's images/s: the dict benchmark.json holds."""
    contenders, device, batch = setup.contenders, setup.device, setup.x0.shape[0]
    result = {**setup.info, "config": {**setup.info["config"], "warmup": warmup, "iters": iters, "repeats": repeats}}
    measured = {name: {"params": c.params, "peak_memory_mb": peak_memory_mb([c.train_step, c.sample_step], device)}
                for name, c in contenders.items()}
    train = interleaved({n: c.train_step for n, c in contenders.items()}, device, warmup, iters, repeats)
    sample = interleaved({n: c.sample_step for n, c in contenders.items()}, device, warmup, iters, repeats)
    precision = str(setup.info["config"]["precision"])
    dtypes = ["fp32", "bf16"] + (["fp16"] if PEAK_DTYPE.get(precision) == "fp16" else [])
    peaks = {dtype: matmul_peak(device, dtype) for dtype in dtypes}
    reference = PEAK_DTYPE.get(precision, "fp32")
    result["matmul_peak"] = {**{f"{d}_gflop_per_s": p["gflop_per_s"] for d, p in peaks.items()},
                             **{f"{d}_n": p["n"] for d, p in peaks.items()}, "reference": reference,
                             "threads": torch.get_num_threads()}
    peak = peaks[reference]["gflop_per_s"]
    for name, c in contenders.items():
        train_gflop, sample_gflop = count_flops(c.train_step) / 1e9, count_flops(c.sample_step) / 1e9
        measured[name].update({
            "train_images_per_s": batch / train[name], "train_step_ms": train[name] * 1e3,
            "sample_images_per_s_per_step": batch / sample[name], "sample_step_ms": sample[name] * 1e3,
            "train_gflop": train_gflop, "train_gflop_per_s": train_gflop / train[name],
            "train_pct_of_peak": 100 * train_gflop / train[name] / peak,
            "sample_gflop": sample_gflop, "sample_gflop_per_s": sample_gflop / sample[name],
            "sample_pct_of_peak": 100 * sample_gflop / sample[name] / peak,
        })
        result[name] = {k: measured[name][k] for k in FIELDS}
    if "diffusers" in result:
        result["ratio_ours_to_diffusers"] = {k: result["ours"][k] / result["diffusers"][k] for k in FIELDS}
    others = [name for name in contenders if name.startswith("ours (")]
    if others:
        result["ratio_to_ours"] = {name: {k: result[name][k] / result["ours"][k] for k in FIELDS} for name in others}
    result["sampler_overhead"] = sampler_overhead_pct(contenders["ours"], setup.samplers, device, warmup, iters, repeats)
    if loader:
        result["data_loader_images_per_s"] = benchmark_loader(setup.datamodule, batches=10)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m diffusion.train")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the config's data.batch_size)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-diffusers", action="store_true", help="measure this framework only")
    parser.add_argument("--no-loader", action="store_true", help="skip the data loader measurement")
    parser.add_argument("--out", type=Path, default=None, help="directory to write benchmark.json into")
    parser.add_argument("--processes", default="", help="comma-separated families to time beside the configured one "
                        "(edm, flow, gaussian, blur): the same network under each one's training step")
    args = parser.parse_args(argv)
    processes = tuple(p for p in args.processes.split(",") if p)
    allowed = sorted(path.stem for path in (Path(CONFIG_DIR) / "process").glob("*.yaml"))
    bad = [p for p in processes if p not in allowed]
    if bad:
        parser.exit(2, f"--processes {bad[0]} is not a process: allowed {', '.join(allowed)}\n")

    try:
        setup = build(args.overrides, args.batch, args.device, with_diffusers=not args.no_diffusers, processes=processes)
    except (UsageError, ValueError) as err:  # a setting a constructor refuses (sampler=ddim with --processes edm, ...)
        parser.exit(2, f"{err}\n")
    result = measure(setup, args.warmup, args.iters, args.repeats, loader=not args.no_loader)

    print_table(result, setup.cfg)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "benchmark.json").write_text(json.dumps(result, indent=2))
        print(f"written {args.out / 'benchmark.json'}")
    return result


def print_table(result: dict, cfg) -> None:
    c = result["config"]
    print(f"device: {result['device']}   torch {result['torch']}   batch {c['batch']}   {c['image_size']}px   "
          f"precision {c['precision']}   channels_last {c['channels_last']}   compile {c['compile']}")
    print(f"{'':16}{'params':>10}{'train img/s':>14}{'sample img/s/step':>20}{'peak MB':>10}   (ours: {result['process']})")
    rows = [(n, result[n]) for n in ("ours", "diffusers", *(f"ours ({p})" for p in result.get("processes", []))) if n in result]
    if "ratio_ours_to_diffusers" in result:
        rows.append(("ratio", result["ratio_ours_to_diffusers"]))
    for name, r in rows:
        if name == "ratio":
            print(f"{'ours/diff':16}{r['params']:>10.2f}{r['train_images_per_s']:>13.2f}x{r['sample_images_per_s_per_step']:>19.2f}x{r['peak_memory_mb']:>9.2f}x")
        else:
            print(f"{name:16}{r['params'] / 1e6:>9.2f}M{r['train_images_per_s']:>14.1f}{r['sample_images_per_s_per_step']:>20.1f}{r['peak_memory_mb']:>10.0f}")
    peak = result["matmul_peak"]
    print("matmul peak (square n x n, " + f"{peak['threads']} threads): "
          + ", ".join(f"{d} {peak[f'{d}_gflop_per_s']:.1f} GFLOP/s (n={peak[f'{d}_n']})" for d in DTYPES if f"{d}_n" in peak))
    print(f"{'':16}{'train GFLOP':>12}{'GFLOP/s':>10}{'% ' + peak['reference'] + ' peak':>14}"
          f"{'sample GFLOP':>14}{'GFLOP/s':>10}{'% ' + peak['reference'] + ' peak':>14}")
    for name, r in rows:
        if name == "ratio":
            print(f"{'ours/diff':16}{r['train_gflop']:>11.2f}x{r['train_gflop_per_s']:>9.2f}x{'':>14}"
                  f"{r['sample_gflop']:>13.2f}x{r['sample_gflop_per_s']:>9.2f}x")
        else:
            print(f"{name:16}{r['train_gflop']:>12.2f}{r['train_gflop_per_s']:>10.1f}{r['train_pct_of_peak']:>13.1f}%"
                  f"{r['sample_gflop']:>14.2f}{r['sample_gflop_per_s']:>10.1f}{r['sample_pct_of_peak']:>13.1f}%")
    for name, r in result.get("ratio_to_ours", {}).items():
        print(f"{name} / ours: train {r['train_images_per_s']:.2f}x images/s, sample {r['sample_images_per_s_per_step']:.2f}x, "
              f"peak memory {r['peak_memory_mb']:.2f}x, params {r['params']:.2f}x")
    o = result["sampler_overhead"]
    print("sampler overhead (step outside the network, % of a forward pass): " + ", ".join(f"{k[:-4]} {v:.2f}%" for k, v in o.items()))
    if "data_loader_images_per_s" in result:
        print(f"data loader ({cfg.data._target_.rsplit('.', 1)[-1]}): {result['data_loader_images_per_s']:.0f} images/s")


if __name__ == "__main__":
    main()
