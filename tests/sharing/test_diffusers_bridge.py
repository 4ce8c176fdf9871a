"""The diffusers bridge (diffusion/sharing/diffusers_bridge.py) against diffusers itself: our UNet exported as a DDPMPipeline
computes what ours does and samples what ours samples with DDIM; a diffusers UNet2DModel imported here samples what
diffusers' own DDIMPipeline samples; the state-dict maps are exact inverses; what does not map is refused in one line.

The networks are random (perturbed, so that no norm weight is 1 and no bias 0: a swapped tensor changes the output)
and tiny; their widths are multiples of 128, the only ones whose GroupNorms (gcd(32, channels // 4) groups) all have
UNet2DModel's one norm_num_groups."""

import json

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from diffusion.samplers.ddim import DDIMSampler
from diffusion.sharing.diffusers_bridge import (
    check_exportable,
    export_pipeline,
    from_diffusers_state_dict,
    import_pipeline,
    to_diffusers_state_dict,
    unet2d_config,
)
from diffusion.training.module import DiffusionModule

MODEL = {"_target_": "diffusion.models.UNet", "in_channels": 1, "image_size": 8, "base_channels": 128,
         "channel_mult": [1, 1], "num_res_blocks": 1, "attention_resolutions": [4], "num_heads": 2}
SCHEDULE = {"_target_": "diffusion.processes.schedules.LinearSchedule", "T": 1000}
OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-4}
STEPS = 4


def perturb(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


def build(spec: dict) -> DiffusionModule:
    """What the lead's build_module does: the module from import_pipeline's dict, then the network's weights."""
    module = DiffusionModule(model=spec["model"], schedule=spec["schedule"], sampler=spec["sampler"],
                             optimizer=OPTIMIZER, process=spec["process"])
    module.model.load_state_dict(spec["state_dict"])
    module.sampler = module.build_sampler(spec["sampler"], num_steps=STEPS)  # conf/sampler/ddim.yaml's, on a short grid
    return module.eval()


def our_module(objective="eps", model=MODEL, clip=True) -> DiffusionModule:
    torch.manual_seed(0)
    sampler = {"_target_": "diffusion.samplers.ddim.DDIMSampler", "_partial_": True, "num_steps": STEPS, "clip_denoised": clip}
    process = {"_target_": "diffusion.processes.GaussianDiffusion", "_partial_": True, "objective": objective}
    module = DiffusionModule(model=model, schedule=SCHEDULE, sampler=sampler, optimizer=OPTIMIZER, process=process)
    perturb(module.model, 1)
    return module.eval()


def diffusers_ddim(unet, scheduler_config, noise, clip: bool):
    """diffusers' DDIM loop by hand, with our DDIM's settings: x_0 at alpha_bar = 1, no offset, leading grid, and
    with clipping the noise recomputed from the clipped x_0 (use_clipped_model_output; DDIMPipeline's default, None,
    keeps the network's noise and gives other samples)."""
    scheduler = DDIMScheduler.from_config(scheduler_config, set_alpha_to_one=True, steps_offset=0,
                                          timestep_spacing="leading", clip_sample=clip)
    scheduler.set_timesteps(STEPS)
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x, scheduler.timesteps.tolist()


@pytest.mark.parametrize("objective, clip", [("eps", True), ("v", False)])
def test_export_pipeline_computes_and_samples_like_ours(tmp_path, objective, clip):
    module = our_module(objective, clip=clip)
    out = export_pipeline(module, tmp_path / "pipe")
    pipe = DDPMPipeline.from_pretrained(out, local_files_only=True)
    scheduler = pipe.scheduler.config
    assert torch.equal(pipe.scheduler.betas, module.process.betas.float())  # trained_betas: our betas exactly
    assert (scheduler.prediction_type, scheduler.variance_type, scheduler.clip_sample) == (
        {"eps": "epsilon", "v": "v_prediction"}[objective], "fixed_small", clip)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for t in (0, 17, 500, 999):
            tt = torch.full((3,), t, dtype=torch.long)
            ours = module.model(x, tt)
            torch.testing.assert_close(pipe.unet(x, tt).sample, ours, atol=1e-5, rtol=1e-5)
            assert ours.abs().mean() > 0.1
    theirs, grid = diffusers_ddim(pipe.unet, scheduler, x, clip)
    sampler = DDIMSampler(module.process, num_steps=STEPS, clip_denoised=clip)
    assert sampler.timesteps == grid
    ours = sampler.sample(module.model, noise=x).samples
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert (ours - x).abs().mean() > 0.1


def diffusers_unet(seed=3, **overrides) -> UNet2DModel:
    torch.manual_seed(seed)
    config = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [128, 256],
              "layers_per_block": 1, "down_block_types": ["AttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "AttnUpBlock2D"], "attention_head_dim": None, "norm_num_groups": 32}
    config.update(overrides)
    return perturb(UNet2DModel(**config), seed)


def test_import_unet_folder_samples_like_ddim_pipeline(tmp_path):
    """A bare UNet2DModel folder: DDPMScheduler's defaults (linear 1e-4..0.02, T=1000, epsilon, clip_sample)."""
    unet = diffusers_unet()
    unet.save_pretrained(tmp_path / "unet")
    spec = import_pipeline(tmp_path / "unet")
    assert spec["schedule"]["_target_"] == "diffusion.processes.schedules.LinearSchedule" and spec["sampler"]["clip_denoised"]
    module = build(spec)
    reference = DDPMScheduler()
    torch.testing.assert_close(module.process.betas.float(), reference.betas, atol=0, rtol=1e-6)
    theirs = DDIMPipeline(unet=unet, scheduler=reference)(batch_size=2, generator=torch.Generator().manual_seed(4),
                                                          num_inference_steps=STEPS, eta=0.0, output_type="np",
                                                          use_clipped_model_output=True).images
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))  # DDIMPipeline's draw on a CPU
    ours = module.sampler.sample(module.model, noise=noise).samples
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - 0.5).mean() > 0.05
    torch.testing.assert_close(torch.from_numpy(ours), torch.from_numpy(theirs), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheduler_kwargs, target", [
    ({"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "clip_sample": False}, "CosineSchedule"),
    ({"beta_schedule": "scaled_linear", "beta_start": 1e-3, "beta_end": 0.03, "prediction_type": "sample"}, "QuadraticSchedule"),
])
def test_import_pipeline_folder_samples_like_diffusers(tmp_path, scheduler_kwargs, target):
    unet = diffusers_unet(seed=5)
    scheduler = DDPMScheduler(**scheduler_kwargs)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    spec = import_pipeline(tmp_path / "pipe")
    assert spec["schedule"]["_target_"].endswith(target)
    assert spec["process"]["objective"] == {"v_prediction": "v", "sample": "x0"}[scheduler_kwargs["prediction_type"]]
    module = build(spec)
    torch.testing.assert_close(module.process.betas.float(), scheduler.betas, atol=0, rtol=1e-5)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    clip = scheduler.config.clip_sample
    theirs, _ = diffusers_ddim(unet, scheduler.config, noise, clip)
    ours = module.sampler.sample(module.model, noise=noise).samples
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_our_export_imports_back_to_the_same_module(tmp_path):
    """ours -> DDPMPipeline folder -> ours: the same config, weights, betas and samples."""
    module = our_module("v", clip=False)
    spec = import_pipeline(export_pipeline(module, tmp_path / "pipe"))
    assert spec["schedule"]["_target_"] == "diffusion.sharing.diffusers_bridge.TrainedBetasSchedule"
    back = build(spec)
    assert torch.equal(back.process.betas, module.process.betas)
    for key, value in module.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[key], value), key
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    assert spec["sampler"]["clip_denoised"] is False and back.sampler.nfe == module.sampler.nfe == STEPS
    assert torch.equal(back.sampler.sample(back.model, noise=noise).samples, module.sampler.sample(module.model, noise=noise).samples)


@pytest.mark.parametrize("model", [
    MODEL,
    {**MODEL, "channel_mult": [1, 2], "attention_resolutions": [8, 4], "num_heads": 1, "num_res_blocks": 2,
     "time_emb_dim": 96, "num_classes": 3, "learn_sigma": True},
    {**MODEL, "block_attention": "none", "channel_mult": [1, 2], "num_heads": 4},
])
def test_state_dict_round_trip_is_exact(model):
    from diffusion.models.unet import UNet

    args = {k: v for k, v in model.items() if k != "_target_"}
    net = perturb(UNet(**args), 8)
    state = net.state_dict()
    theirs = to_diffusers_state_dict(state, model)
    unet = UNet2DModel(**unet2d_config(model))
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in unet.state_dict().items()}
    config, back = from_diffusers_state_dict(theirs, dict(unet.config, _ddpm_null_class=model.get("num_classes")))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert UNet(**{k: v for k, v in config.items() if k != "_target_"}).state_dict().keys() == state.keys()
    unet.load_state_dict(theirs)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 900])
    y = torch.tensor([0, 3]) if model.get("num_classes") else None  # 3: our null class
    with torch.no_grad():
        torch.testing.assert_close(unet.eval()(x, t, class_labels=y).sample, net(x, t, y), atol=1e-5, rtol=1e-5)


DIGITS = {"_target_": "diffusion.models.UNet", "in_channels": 1, "image_size": 16, "base_channels": 16,
          "channel_mult": [1, 2, 4], "num_res_blocks": 1, "attention_resolutions": [4]}


@pytest.mark.parametrize("model, process, message", [
    ({**MODEL, "block_attention": "cbam"}, None, "model.block_attention=cbam cannot be exported"),
    ({**MODEL, "skip_gates": True}, None, "model.skip_gates=true cannot be exported"),
    ({"_target_": "diffusion.models.SimpleUNet", "in_channels": 1}, None, "model=SimpleUNet cannot be exported"),
    (DIGITS, None, "different group counts (4 at 16 channels, 8 at 32 channels, 16 at 64 channels"),
    ({**MODEL, "channel_mult": [1, 2], "attention_resolutions": [8]}, None, "model.num_heads=2 cannot be exported"),
    (MODEL, {"_target_": "diffusion.processes.BlurDiffusion"}, "process=BlurDiffusion cannot be exported"),
    (MODEL, {"_target_": "diffusion.processes.EDMProcess"}, "process=edm cannot be exported to diffusers: DDPMPipeline"),
    (MODEL, {"_target_": "diffusion.processes.FlowMatching", "objective": "x0"},
     "process.objective=x0 cannot be exported to diffusers with process=flow: FlowMatchEulerDiscreteScheduler steps on the velocity (allowed: v)"),
])
def test_refusals_are_one_line(model, process, message):
    with pytest.raises(ValueError) as info:
        check_exportable(model, process)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_export_refuses_a_used_folder(tmp_path):
    module = our_module()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        export_pipeline(module, tmp_path / "used")
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("overrides, message", [
    ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier'"),
    ({"flip_sin_to_cos": False}, "flip_sin_to_cos=False"),
    ({"norm_num_groups": 32, "attn_norm_num_groups": 16}, "norm_num_groups=32 (attn_norm_num_groups=16)"),
    ({"num_class_embeds": 10}, "num_class_embeds=10 has no null class"),
])
def test_import_refuses_what_ours_cannot_compute(tmp_path, overrides, message):
    diffusers_unet(**overrides).save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError) as info:
        import_pipeline(tmp_path / "unet")
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_import_refuses_a_pickled_unet(tmp_path):
    diffusers_unet().save_pretrained(tmp_path / "unet", safe_serialization=False)
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["_class_name"] == "UNet2DModel"
    with pytest.raises(ValueError, match=r"\.bin is a pickle"):
        import_pipeline(tmp_path / "unet")


# ----------------------------------------------------------------------------------------------- process=flow
def flow_module(shift=3.0) -> DiffusionModule:
    torch.manual_seed(0)
    sampler = {"_target_": "diffusion.samplers.flow.FlowEulerSampler", "_partial_": True, "num_steps": STEPS}
    process = {"_target_": "diffusion.processes.FlowMatching", "_partial_": True, "shift": shift}
    module = DiffusionModule(model=MODEL, schedule={"_target_": "diffusion.processes.schedules.NoSchedule"},
                             sampler=sampler, optimizer=OPTIMIZER, process=process)
    perturb(module.model, 1)
    return module.eval()


def test_flow_exports_as_flow_match_euler_and_samples_like_diffusers(tmp_path):
    """process=flow -> a DDPMPipeline folder with FlowMatchEulerDiscreteScheduler (our shift): diffusers' own step loop
    over the exported UNet, on our grid, ends where our flow_euler does; the pipeline runs on its own grid."""
    import numpy as np

    module = flow_module()
    pipe = DDPMPipeline.from_pretrained(export_pipeline(module, tmp_path / "pipe"), local_files_only=True)
    scheduler = pipe.scheduler
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert (scheduler.config.shift, scheduler.config.num_train_timesteps, scheduler.config.use_dynamic_shifting) == (3.0, 1000, False)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    scheduler.set_timesteps(sigmas=[1 - i / STEPS for i in range(STEPS)])  # diffusers shifts them, as ours are shifted
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(pipe.unet(x, t).sample, t, x).prev_sample
        ours = module.sampler.sample(module.model, noise=noise).samples
    torch.testing.assert_close(x, ours, atol=1e-4, rtol=1e-4)
    assert (ours - noise).abs().mean() > 0.1
    images = pipe(batch_size=2, num_inference_steps=STEPS, output_type="np", generator=torch.Generator().manual_seed(3)).images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all() and images.std() > 0.01


def test_flow_export_imports_back_to_the_same_module(tmp_path):
    module = flow_module(shift=2.0)
    spec = import_pipeline(export_pipeline(module, tmp_path / "pipe"))
    assert spec["process"] == {"_target_": "diffusion.processes.FlowMatching", "_partial_": True, "objective": "v", "shift": 2.0}
    assert spec["schedule"]["_target_"].endswith("NoSchedule") and spec["sampler"]["_target_"].endswith("FlowEulerSampler")
    back = build(spec)
    for key, value in module.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[key], value), key
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(back.sampler.sample(back.model, noise=noise).samples, module.sampler.sample(module.model, noise=noise).samples)


def test_flow_refusals_are_one_line(tmp_path):
    flow = {"_target_": "diffusion.processes.FlowMatching"}
    with pytest.raises(ValueError, match=r"^sampler.clip_denoised=true cannot be exported to diffusers with process=flow: .*\(allowed: false\)$"):
        check_exportable(MODEL, flow, {"clip_denoised": True})
    from diffusers import FlowMatchEulerDiscreteScheduler

    DDPMPipeline(unet=diffusers_unet(), scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)).save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match=r"^scheduler use_dynamic_shifting=True has no counterpart in our flow samplers \(allowed: False\)$"):
        import_pipeline(tmp_path / "p")


# ----------------------------------------------------------------------------------------------- one group count
@pytest.mark.parametrize("norm_groups", [4, "auto"])
def test_the_digits_default_with_one_group_count_exports_and_computes_the_same(norm_groups):
    """model.norm_groups=4 (or auto, which is 4 here): every GroupNorm with 4 groups, UNet2DModel's norm_num_groups=4,
    the same outputs at 16 px; the config comes back with norm_groups=4 (the per-layer rule: 4, 8, 16, 32 groups)."""
    from diffusion.models.unet import UNet

    model = {**DIGITS, "norm_groups": norm_groups}
    check_exportable(model)
    net = perturb(UNet(**{k: v for k, v in model.items() if k != "_target_"}), 9)
    assert {m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)} == {4}
    unet = UNet2DModel(**unet2d_config(model))
    assert unet.config.norm_num_groups == 4
    unet.load_state_dict(to_diffusers_state_dict(net.state_dict(), model))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 900])
    with torch.no_grad():
        ours = net(x, t)
        torch.testing.assert_close(unet.eval()(x, t).sample, ours, atol=1e-5, rtol=1e-5)
    assert ours.abs().mean() > 0.1
    config, _ = from_diffusers_state_dict(to_diffusers_state_dict(net.state_dict(), model), dict(unet.config))
    assert config["norm_groups"] == 4


def test_a_diffusers_unet_with_another_group_count_imports_and_computes_the_same(tmp_path):
    unet = diffusers_unet(norm_num_groups=16)
    unet.save_pretrained(tmp_path / "unet")
    spec = import_pipeline(tmp_path / "unet")
    assert spec["model"]["norm_groups"] == 16
    module = build(spec)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 700])
    with torch.no_grad():
        torch.testing.assert_close(module.model(x, t), unet(x, t).sample, atol=1e-5, rtol=1e-5)
