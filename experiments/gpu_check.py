"""The GPU check: what this framework does on a GPU machine, measured in one command, written as one JSON + one table.

    python experiments/gpu_check.py --out outputs/gpu_check            # a GPU machine (budget: 8 minutes on one H200)
    python experiments/gpu_check.py --device cpu --quick --out DIR     # tiny settings on a CPU (the CI's run)

Most of a GPU run is torch.compile's first compilation of each network (training and inference graphs, ours and
diffusers', two configurations); inductor's on-disk cache makes a second run on the same machine faster.

It writes DIR/gpu_check.json (every number, the settings and the machine) and DIR/gpu_check.md (the table for the
README, headed by the machine: GPU name, count and memory, driver, CUDA, torch, CPU), rewritten after each part so
that an interrupted check keeps what it measured. The parts, each in its own try (a failure is reported in the
table with its error and the others still run):

1. **benchmark**: training and one-step sampling throughput and peak memory of this framework's UNet against
   diffusers' ``UNet2DModel`` of matched size (experiments/benchmark.py's ``build`` and ``measure``) with
   ``trainer.precision=bf16-mixed model.compile=true model.channels_last=true`` (16-mixed on a GPU without
   bfloat16), on the digits default (batch 64) and on a larger preset (``--larger``, default dog32 at its batch
   of 32, on generated images).
2. **sampling**: DDIM-50 images/s of the whole chain (``DiffusionModule.sample``; diffusers' ``DDIMScheduler``
   loop on its model) for the same two configurations, reusing their compiled networks.
3. **memory**: the human64 preset's peak CUDA memory (``torch.cuda.max_memory_allocated``) of one training step at
   its configured batch (16), after one warm-up step (the optimizer's state exists), with and without
   ``model.gradient_checkpointing=true``, in 32-true and bf16-mixed, on random images of its size (no compile).
4. **ddp**: a real ``python -m diffusion.train`` run on every visible GPU (``trainer.strategy=ddp``, NCCL; digits
   default, bf16-mixed, channels_last, no compile so that start-up stays short), with
   ``diffusion.training.probe.RankProbe``: each rank's EMA weights hash (equal on all ranks or not) and images/s.

``--device cpu --quick`` runs the same parts on tiny networks (base 8 channels, batch 4 / 1, DDIM-5, one iteration)
in float32 with channels_last and without compile (inductor's C++ build on a CPU takes minutes; bf16 is slow on
most CPUs; the memory part still runs both precisions), DDP as 2 gloo CPU ranks started in the background while
the other parts run (to fit CI's time), memory as the process's peak resident set size (RSS), which holds the
whole process (imports included), not one step's tensors. Its numbers show that every part runs; they measure
nothing. ``--quick`` on a GPU: the tiny settings with the GPU's precision and compile, DDP after the other parts.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

import benchmark as bench  # noqa: E402

from diffusion.run.errors import UsageError, exits_on_usage_error  # noqa: E402

PARTS = ("benchmark", "sampling", "memory", "ddp")
GPU_SPEED = ["model.compile=true", "model.channels_last=true"]  # and trainer.precision=bf16-mixed (see gpu_precision)
CPU_SPEED = ["model.channels_last=true"]  # no compile (minutes of C++ on a CPU), float32 (bf16 is slow on most CPUs)
TINY = ["model.base_channels=8", "model.time_emb_dim=32"]
PROBE = "+callbacks.probe._target_=diffusion.training.probe.RankProbe"
SYNTHETIC_IMAGES = 64  # enough for dog32's batch 32 and human64's 16 after the validation split
SAMPLE_STEPS = 50


# --------------------------------------------------------------------------------------------- the plan
def gpu_precision() -> str:
    """bf16-mixed; 16-mixed on a GPU without bfloat16 (before Ampere), where bf16 would be emulated or refused."""
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def make_plan(device: str, quick: bool, larger: str, images: Path) -> dict:
    """Every setting of the check: which configurations each part runs, with which batch and how many iterations."""
    cuda = device == "cuda"
    tiny = TINY if quick else []
    precision = gpu_precision() if cuda else "bf16-mixed"
    speed = [f"trainer.precision={precision}", *GPU_SPEED] if cuda else CPU_SPEED
    folder = [f"data.root={images}"]
    gpus = torch.cuda.device_count() if cuda else 0
    if cuda:  # every visible GPU, NCCL; bf16 and channels_last as above, no compile (each rank would compile)
        ddp = ["trainer.accelerator=gpu", f"trainer.devices={gpus}", f"trainer.precision={precision}",
               "model.channels_last=true", "trainer.max_epochs=3", "trainer.limit_train_batches=20"]
    else:  # 2 CPU ranks, gloo; 3 steps
        ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
               "trainer.log_every_n_steps=1"]
    ddp = ["trainer.strategy=ddp", *ddp, *(["model.base_channels=8"] if quick else []), "trainer.limit_val_batches=1",
           "logger=none", "module.sample_every_n_epochs=0", "final_samples=false", PROBE]
    return {
        "device": device,
        "quick": quick,
        "speed": speed,
        "configs": {"digits": [*speed, *tiny], larger: [f"experiment={larger}", *folder, *speed, *tiny]},
        "batch": 4 if quick else None,  # None: the preset's data.batch_size
        "bench": {"warmup": 0, "iters": 1, "repeats": 1} if quick else {"warmup": 3, "iters": 10, "repeats": 3},
        "sampling": {"num_steps": 5, "warmup": 0, "iters": 1, "repeats": 1} if quick
        else {"num_steps": SAMPLE_STEPS, "warmup": 1, "iters": 1, "repeats": 3},
        "memory": {
            "config": ["experiment=human64", *folder, *tiny, *(["model.num_res_blocks=1"] if quick else [])],
            "batch": 1 if quick else None,
            "precisions": ["32-true", precision],
            "kind": "cuda_max_allocated" if cuda else "peak_rss",
        },
        # on a CPU the DDP run overlaps the other parts (their tiny numbers are no measurements anyway), to fit CI's time
        "ddp": {"overrides": ddp, "world_size": gpus if cuda else 2, "timeout_s": 300 if cuda else 180, "overlap": not cuda},
    }


def write_synthetic_images(folder: Path, n: int = SYNTHETIC_IMAGES, size: int = 64) -> Path:
    """``n`` random RGB PNGs named like the dog preset's files (``dog.<i>.png``: every folder preset takes them)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"dog.{i:03d}.png")
    return folder


# --------------------------------------------------------------------------------------------- the machine
def _command(*cmd: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict:
    import lightning

    info = {
        "device": device,
        "gpu_count": 0,
        "gpus": [],
        "driver": None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "git_commit": _command("git", "rev-parse", "--short", "HEAD"),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    if device == "cuda":
        info["gpu_count"] = torch.cuda.device_count()
        for i in range(info["gpu_count"]):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                                 "capability": f"{props.major}.{props.minor}"})
        smi = _command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
        info["driver"] = smi.splitlines()[0].strip() if smi else None
    return info


def machine_line(m: dict) -> str:
    if m["gpu_count"]:
        names = sorted({g["name"] for g in m["gpus"]})
        gpus = f"{m['gpu_count']} x {' + '.join(names)} ({m['gpus'][0]['memory_gib']:.0f} GiB each)"
        cuda = f"driver {m['driver'] or 'n/a'}, CUDA {m['cuda'] or 'n/a'}"
    else:
        gpus, cuda = "no GPU (CPU run)", f"CUDA build {m['cuda'] or 'none'}"
    return (f"**Machine:** {gpus}, {cuda}, torch {m['torch']}, Lightning {m['lightning']}, "
            f"diffusers {m['diffusers'] or 'not installed'}, CPU {m['cpu']} ({m['cpu_count']} cores), "
            f"Python {m['python']}")


# --------------------------------------------------------------------------------------------- the parts
def release() -> None:
    """Free what the previous part left (compiled graphs hold their networks), so the next peak is its own."""
    if "torch._dynamo" in sys.modules:  # compiled graphs (and the networks they hold) go too
        torch._dynamo.reset()
    gc.collect()  # cheap: run_check froze the objects of the imports
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def diffusers_chain(contender: bench.Contender, process, num_steps: int, n: int) -> Callable[[], None]:
    """diffusers' DDIM sampling loop (``DDIMScheduler``: leading spacing, clipped x0, as our ddim) on its network."""
    from diffusers import DDIMScheduler

    betas = process.betas.detach().cpu().float().numpy()
    scheduler = DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas)
    scheduler.set_timesteps(num_steps)
    model, shape = contender.model, contender.x0.shape

    @torch.inference_mode()
    def run() -> None:
        model.eval()
        x = torch.randn(shape, device=contender.x0.device)
        with contender.autocast():
            for t in scheduler.timesteps:
                tb = torch.full((n,), int(t), dtype=torch.long, device=x.device)
                x = scheduler.step(model(x, tb).sample, t, x).prev_sample

    return run


def sampling_part(setup: bench.Setup, plan: dict) -> dict:
    """Images/s of a whole DDIM chain, this framework's sampler and diffusers' scheduler, under the same precision."""
    settings = plan["sampling"]
    module, device, n = setup.module, setup.device, setup.x0.shape[0]
    ours = setup.contenders["ours"]
    sampler = module.named_sampler("ddim", num_steps=settings["num_steps"])
    generator = torch.Generator(device=device).manual_seed(0)

    def ours_chain() -> None:
        with ours.autocast():
            module.sample(n, sampler=sampler, generator=generator)

    fns = {"ours": ours_chain}
    if "diffusers" in setup.contenders:
        fns["diffusers"] = diffusers_chain(setup.contenders["diffusers"], module.process, settings["num_steps"], n)
    seconds = bench.interleaved(fns, device, settings["warmup"], settings["iters"], settings["repeats"])
    result = {"sampler": sampler.describe(), "num_steps": settings["num_steps"], "batch": n,
              "precision": setup.info["config"]["precision"], "compile": setup.info["config"]["compile"]}
    for name, s in seconds.items():
        result[f"{name}_images_per_s"] = n / s
        result[f"{name}_seconds_per_batch"] = s
    if "diffusers" in seconds:
        result["ratio_ours_to_diffusers"] = seconds["diffusers"] / seconds["ours"]
    return result


def memory_part(plan: dict, precision: str, checkpointing: bool) -> dict:
    """Peak memory of one training step of the human64 network (after a warm-up step), on a random batch."""
    settings = plan["memory"]
    overrides = [*settings["config"], f"trainer.precision={precision}", f"model.gradient_checkpointing={str(checkpointing).lower()}"]
    setup = bench.build(overrides, settings["batch"], plan["device"], with_diffusers=False)
    step = setup.contenders["ours"].train_step
    step()  # the optimizer's state and the allocator's pools exist before the measured step
    bench._sync(setup.device)
    # between steps: weights, their gradients and the optimizer's state
    between = torch.cuda.memory_allocated(setup.device) / 2**20 if setup.device.type == "cuda" else None
    peak = bench.peak_memory_mb([step], setup.device)
    return {"precision": precision, "gradient_checkpointing": checkpointing, "batch": setup.x0.shape[0],
            "image_size": setup.info["config"]["image_size"], "params": setup.contenders["ours"].params,
            "peak_memory_mb": peak, "allocated_between_steps_mb": between, "kind": settings["kind"]}


def summarize_ddp(probes: list[dict], world_size: int) -> dict:
    """The DDP verdict from the ranks' probe records: every rank present, their EMA hashes equal or not, images/s
    (the sum over ranks of each rank's images over its seconds)."""
    ranks = sorted(p["global_rank"] for p in probes)
    if ranks != list(range(world_size)) or any(p["world_size"] != world_size for p in probes):
        raise RuntimeError(f"expected probes of ranks 0..{world_size - 1} in a world of {world_size}, got ranks {ranks} "
                           f"(world sizes {sorted({p['world_size'] for p in probes})})")
    hashes = {p["ema_hash"] for p in probes}
    timed = [p for p in probes if p.get("train_seconds", 0) > 0]
    return {
        "world_size": world_size,
        "ranks": ranks,
        "ema_equal": len(hashes) == 1 if world_size > 1 else None,  # one rank: nothing to compare
        "ema_hash": min(hashes)[:16] if len(hashes) == 1 else None,
        "global_step": probes[0]["global_step"],
        "images_per_s": sum(p["train_images"] / p["train_seconds"] for p in timed) if len(timed) == len(probes) else None,
        "per_rank": sorted(probes, key=lambda p: p["global_rank"]),
    }


class DdpRun:
    """A real ``python -m diffusion.train`` DDP run with the rank probe (its log: DIR/ddp_train.log). ``start``
    launches it; ``result`` waits for it (starting it first if need be) and reads the ranks' probe records."""

    def __init__(self, plan: dict, out: Path):
        self.settings, self.out = plan["ddp"], out
        self.run_dir, self.log = out / "ddp_run", out / "ddp_train.log"
        self.cmd = [sys.executable, "-m", "diffusion.train", *self.settings["overrides"], f"hydra.run.dir={self.run_dir}",
                    f"paths.log_dir={out / 'ddp_logs'}"]  # a rank that made a run directory of its own would show there
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> None:
        if self.settings["world_size"] < 1:
            raise RuntimeError("no GPU is visible: nothing to run DDP on")
        # run inside a SLURM job (sbatch / srun of this script, one task): the ranks are the ones Lightning starts here,
        # not SLURM's tasks, so the run must not see SLURM's task layout
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        print(f"    {self.settings['world_size']} ranks: {shlex.join(self.cmd[1:])}\n    log: {self.log}", flush=True)
        with open(self.log, "w") as f:  # a session of its own: stop() ends the ranks Lightning starts along with it
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.started = time.perf_counter()

    def stop(self) -> None:
        """End the run's process group (the launching rank and the ranks it started), if it is still running."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    def result(self) -> dict:
        if self.proc is None:
            self.start()
        timeout = self.settings["timeout_s"]
        try:
            returncode = self.proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - self.started)))
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"the DDP run took more than {timeout} s (log: {self.log})") from None
        if returncode != 0:
            raise RuntimeError(f"the DDP run exited {returncode} (log: {self.log}): ...{self.log.read_text()[-1500:]}")
        probes = [json.loads(p.read_text()) for p in sorted(self.run_dir.glob("probe_rank*.json"))]
        return {**summarize_ddp(probes, self.settings["world_size"]), "run_dir": str(self.run_dir),
                "command": shlex.join(self.cmd[1:]), "overlapped": self.settings["overlap"],
                "run_seconds": time.perf_counter() - self.started}


# --------------------------------------------------------------------------------------------- running
class Check:
    """The report under construction: each part runs in its own try, and both files are rewritten after it."""

    def __init__(self, out: Path, report: dict):
        self.out, self.report, self.start = out, report, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, section: str, name: str | None, fn: Callable[[], dict], describe: Callable[[dict], str] = lambda r: "") -> dict:
        label = section + (f" {name}" if name else "")
        print(f"[{self.elapsed():6.1f} s] {label} ...", flush=True)
        t0 = time.perf_counter()
        try:
            entry = {"ok": True, **fn()}
        except Exception as err:  # noqa: BLE001 - reported in the table; the other parts still run
            traceback.print_exc()
            entry = {"ok": False, "error": f"{type(err).__name__}: {err}".strip()[:2000]}
        entry["seconds"] = time.perf_counter() - t0
        if name is None:
            self.report[section] = entry
        else:
            self.report.setdefault(section, {})[name] = entry
        status = describe(entry) if entry["ok"] else f"FAILED: {entry['error'].splitlines()[0][:300]}"
        print(f"[{self.elapsed():6.1f} s] {label}: {status} ({entry['seconds']:.1f} s)", flush=True)
        self.write()
        return entry

    def write(self) -> None:
        self.report["total_seconds"] = self.elapsed()
        (self.out / "gpu_check.json").write_text(json.dumps(self.report, indent=2, default=str))
        (self.out / "gpu_check.md").write_text(render_markdown(self.report))


def _bench_line(r: dict) -> str:
    line = f"train {r['ours']['train_images_per_s']:.1f} img/s"
    if "ratio_ours_to_diffusers" in r:
        line += f" ({r['ratio_ours_to_diffusers']['train_images_per_s']:.2f}x diffusers)"
    return line


def run_check(args: argparse.Namespace, argv: list[str]) -> dict:
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} is not an empty directory: choose a new one (a check never overwrites another)")
    if args.device not in ("cuda", "cpu"):
        raise UsageError(f"--device {args.device!r} is invalid: allowed values are cuda, cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is false): "
                         "on a CPU pass --device cpu --quick")
    if args.device == "cpu" and not args.quick:
        raise UsageError("--device cpu needs --quick: the full settings (compile, the human64 network) are for a GPU")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise UsageError(f"--parts {args.parts!r} is invalid: a comma-separated list of {', '.join(PARTS)}")
    presets = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
    if args.larger not in presets:
        raise UsageError(f"--larger {args.larger!r} is invalid: allowed values are the presets {', '.join(presets)}")
    out.mkdir(parents=True, exist_ok=True)
    gc.freeze()  # what the imports made is never garbage: release()'s collections skip it (0.6 s each otherwise)
    try:
        return _run_check(args, argv, parts, out)
    finally:
        gc.unfreeze()


def _run_check(args: argparse.Namespace, argv: list[str], parts: list[str], out: Path) -> dict:
    images = write_synthetic_images(out / "synthetic_images")
    plan = make_plan(args.device, args.quick, args.larger, images)
    report = {
        "command": shlex.join(["python", "experiments/gpu_check.py", *argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(args.device),
        "plan": plan,
    }
    check = Check(out, report)
    print(machine_line(report["machine"]).replace("**", ""), flush=True)

    ddp = DdpRun(plan, out)
    try:
        if "ddp" in parts and plan["ddp"]["overlap"]:
            print(f"[{check.elapsed():6.1f} s] ddp: started, in the background (CPU --quick)", flush=True)
            try:
                ddp.start()
            except Exception:  # noqa: BLE001 - result() starts it again and reports why it cannot
                traceback.print_exc()
        _run_parts(args, parts, plan, check, ddp)
    finally:
        ddp.stop()  # only if this process is leaving early (Ctrl-C): the run is over otherwise
    failed = failures(report)
    print(f"[{check.elapsed():6.1f} s] done: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}"
          + (f"; {len(failed)} part(s) failed: {', '.join(failed)}" if failed else "; every part passed"), flush=True)
    return report


def _run_parts(args: argparse.Namespace, parts: list[str], plan: dict, check: Check, ddp: DdpRun) -> None:
    setups: dict[str, bench.Setup] = {}

    def setup(name: str) -> bench.Setup:  # built once for the benchmark and the sampling of a configuration
        if name not in setups:
            setups[name] = bench.build(plan["configs"][name], plan["batch"], args.device, with_diffusers=not args.no_diffusers)
        return setups[name]

    for name in plan["configs"]:
        if "benchmark" in parts:
            check.run("benchmark", name, lambda name=name: bench.measure(setup(name), **plan["bench"], loader=False), _bench_line)
        if "sampling" in parts:
            check.run("sampling", name, lambda name=name: sampling_part(setup(name), plan),
                      lambda r: f"{r['ours_images_per_s']:.1f} img/s ({r['sampler']})")
        setups.clear()
        release()
    if "memory" in parts:
        for precision in plan["memory"]["precisions"]:
            for checkpointing in (False, True):
                key = f"{precision}{' gradient_checkpointing' if checkpointing else ''}"
                check.run("memory", key, lambda p=precision, c=checkpointing: memory_part(plan, p, c),
                          lambda r: f"{r['peak_memory_mb']:.0f} MB")
                release()
    if "ddp" in parts:
        check.run("ddp", None, ddp.result,
                  lambda r: f"{r['world_size']} ranks, EMA equal {r['ema_equal']}, "
                            f"{r['images_per_s'] or float('nan'):.1f} img/s")
    check.write()


def failures(report: dict) -> list[str]:
    failed = []
    for section in PARTS:
        value = report.get(section)
        if isinstance(value, dict) and "ok" in value:
            value = {None: value}
        for name, entry in (value or {}).items():
            if not entry.get("ok", True):
                failed.append(section + (f" {name}" if name else ""))
    if report.get("ddp", {}).get("ema_equal") is False:
        failed.append("ddp (EMA weights differ between ranks)")
    return failed


# --------------------------------------------------------------------------------------------- the table
def _f(value, spec: str = ".1f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _failed(entry: dict) -> str:
    return "failed: " + entry["error"].splitlines()[0][:200].replace("|", "\\|")


def render_markdown(report: dict) -> str:
    m, plan = report["machine"], report["plan"]
    lines = ["# GPU check", "", machine_line(m), "",
             f"`{report['command']}` on {report['date']}, commit {m['git_commit'] or 'n/a'}, "
             f"{report.get('total_seconds', 0):.0f} s in all", ""]
    if plan["quick"]:
        lines += ["*--quick: tiny networks" + (", the DDP run overlapping the other parts" if plan["ddp"]["overlap"] else "")
                  + ": these numbers check that every part runs, they measure nothing.*", ""]

    speed = " ".join(plan["speed"])
    lines += ["## Training and sampling throughput against diffusers' UNet2DModel", "",
              f"`{speed}`; one training step (forward, backward, optimizer) and one denoising step, median of "
              f"{plan['bench']['repeats']} x {plan['bench']['iters']} iterations (experiments/benchmark.py).", "",
              "| configuration | batch | params (M) | train img/s ours | train img/s diffusers | train ours/diffusers "
              "| sample img/s/step ours | sample img/s/step diffusers | peak MB ours | peak MB diffusers |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, e in report.get("benchmark", {}).items():
        if not e["ok"]:
            lines.append(f"| {name} | {_failed(e)} |" + " |" * 8)
            continue
        o, d = e["ours"], e.get("diffusers")
        r = e.get("ratio_ours_to_diffusers", {})
        lines.append(f"| {name} | {e['config']['batch']} | {o['params'] / 1e6:.2f} | {o['train_images_per_s']:.1f} | "
                     f"{_f(d and d['train_images_per_s'])} | {_f(r.get('train_images_per_s'), '.2f', 'x')} | "
                     f"{o['sample_images_per_s_per_step']:.1f} | {_f(d and d['sample_images_per_s_per_step'])} | "
                     f"{o['peak_memory_mb']:.0f} | {_f(d and d['peak_memory_mb'], '.0f')} |")

    steps = plan["sampling"]["num_steps"]
    lines += ["", f"## DDIM-{steps} sampling", "",
              f"The whole chain of {steps} network calls (`DiffusionModule.sample`; diffusers' `DDIMScheduler` "
              "loop), same precision and compile as above.", "",
              "| configuration | batch | images/s ours | images/s diffusers | ours/diffusers | s per batch ours |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, e in report.get("sampling", {}).items():
        if not e["ok"]:
            lines.append(f"| {name} | {_failed(e)} |" + " |" * 4)
            continue
        lines.append(f"| {name} | {e['batch']} | {e['ours_images_per_s']:.1f} | {_f(e.get('diffusers_images_per_s'))} | "
                     f"{_f(e.get('ratio_ours_to_diffusers'), '.2f', 'x')} | {e['ours_seconds_per_batch']:.3f} |")

    kind = plan["memory"]["kind"]
    what = ("peak CUDA memory (`torch.cuda.max_memory_allocated`)" if kind == "cuda_max_allocated"
            else "peak RSS of the whole process (a CPU run: imports included, not a step's own memory)")
    lines += ["", "## human64: peak memory of one training step", "",
              f"{what} in MB of one training step after a warm-up step, on random images; "
              "`model.gradient_checkpointing=false` / `true`.", "",
              "| precision | batch | params (M) | peak MB | peak MB with checkpointing | saved |",
              "|---|---:|---:|---:|---:|---:|"]
    memory = report.get("memory", {})
    for precision in plan["memory"]["precisions"]:
        off, on = memory.get(precision), memory.get(f"{precision} gradient_checkpointing")
        if off is None and on is None:
            continue
        cells = []
        for e in (off, on):
            cells.append("n/a" if e is None else (f"{e['peak_memory_mb']:.0f}" if e["ok"] else _failed(e)))
        ok = [e for e in (off, on) if e is not None and e["ok"]]
        saved = (f"{100 * (1 - on['peak_memory_mb'] / off['peak_memory_mb']):.0f}%".replace("-0%", "0%")
                 if len(ok) == 2 else "n/a")
        first = ok[0] if ok else {}
        lines.append(f"| {precision} | {first.get('batch', 'n/a')} | "
                     f"{_f(first.get('params') and first['params'] / 1e6, '.1f')} | {cells[0]} | {cells[1]} | {saved} |")

    lines += ["", "## DDP", ""]
    ddp = report.get("ddp")
    if ddp is not None:
        lines += ["A real `python -m diffusion.train` run, `trainer.strategy=ddp` on every visible device, "
                  "with `diffusion.training.probe.RankProbe` (EMA weights hashed on each rank when training ends).", "",
                  "| ranks | EMA weights equal | images/s (all ranks) | optimizer steps |", "|---:|---|---:|---:|"]
        if ddp["ok"]:
            equal = {True: "yes", False: "**NO**", None: "n/a (one rank)"}[ddp["ema_equal"]]
            lines.append(f"| {ddp['world_size']} | {equal} | {_f(ddp['images_per_s'])} | {ddp['global_step']} |")
        else:
            lines.append(f"| {_failed(ddp)} | | | |")
    failed = failures(report)
    lines += ["", "**Result:** " + (f"{len(failed)} failed: {', '.join(failed)}" if failed else "every part passed"), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main
@exits_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_check"),
                        help="a new (or empty) directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny settings (a CPU's CI run)")
    parser.add_argument("--larger", default="dog32", help="the larger preset (conf/experiment/) next to the digits default")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"the parts to run (default: all of {','.join(PARTS)})")
    parser.add_argument("--no-diffusers", action="store_true", help="measure this framework only")
    args = parser.parse_args(argv)
    return run_check(args, argv)


if __name__ == "__main__":
    main()
