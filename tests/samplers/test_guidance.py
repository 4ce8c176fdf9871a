"""Classifier-free guidance: the algebra against closed forms, every sampler, the exact two-class Gaussian oracle,
label dropout's rate, the class embedding, and one-line errors."""

import pytest
import torch

from diffusion.processes.gaussian import GaussianDiffusion
from diffusion.processes.schedules import LinearSchedule
from diffusion.samplers.guidance import Guided, combine, rescale
from diffusion.samplers.registry import build_sampler, sampler_names
from tests.oracles import ClassGaussianOracle


class KnownOutputs:
    """A conditional "network" whose conditional and unconditional outputs are fixed tensors C and U."""

    num_classes = 3

    def __init__(self, cond, uncond):
        self.cond, self.uncond, self.batches = cond, uncond, []

    def __call__(self, x, t, y):
        self.batches.append(len(x))
        null = (y == self.num_classes).reshape(-1, *((1,) * (x.dim() - 1)))
        n = len(x) // len(self.cond)
        return torch.where(null, self.uncond.repeat(n, 1, 1, 1), self.cond.repeat(n, 1, 1, 1))


def _process(objective="eps", T=100):
    return GaussianDiffusion(LinearSchedule(T=T), objective=objective)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_guided_prediction_is_uncond_plus_w_times_the_difference_in_eps_space(objective):
    g = torch.Generator().manual_seed(0)
    cond, uncond, x = (torch.randn(4, 1, 4, 4, generator=g) for _ in range(3))
    labels = torch.tensor([0, 1, 2, 0])
    t = torch.full((4,), 37)
    process = _process(objective)
    a, s = process.sqrt_alphas_cumprod[37].item(), process.sqrt_one_minus_alphas_cumprod[37].item()

    def eps_of(out):  # the objective's output as eps at input x, from the definitions (not the package's code)
        if objective == "eps":
            return out
        if objective == "x0":
            return (x - a * out) / s
        return s * x + a * out  # v = a eps - s x0 and x = a x0 + s eps  =>  eps = s x + a v (a^2 + s^2 = 1)

    for w in (0.0, 0.5, 1.0, 2.0, 7.5):
        net = KnownOutputs(cond, uncond)
        guided = Guided(net, labels, guidance_scale=w)(x, t)
        expected = eps_of(uncond) + w * (eps_of(cond) - eps_of(uncond))
        torch.testing.assert_close(eps_of(guided), expected, rtol=1e-5, atol=1e-5)
        assert net.batches == ([4] if w in (0.0, 1.0) else [8])  # one forward pass, cond and null stacked
    assert torch.equal(Guided(KnownOutputs(cond, uncond), labels, 1.0)(x, t), cond)  # w = 1: the conditional model
    assert torch.equal(Guided(KnownOutputs(cond, uncond), labels, 0.0)(x, t), uncond)  # w = 0: the unconditional one


def test_learned_variance_channels_are_the_conditional_ones():
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(2, 2, 3, 3, generator=g), torch.randn(2, 2, 3, 3, generator=g)
    out = combine(cond, uncond, 3.0, channels=1)
    torch.testing.assert_close(out[:, :1], uncond[:, :1] + 3.0 * (cond[:, :1] - uncond[:, :1]))
    assert torch.equal(out[:, 1:], cond[:, 1:])


def test_rescale_matches_diffusers_rescale_noise_cfg():
    guider_utils = pytest.importorskip("diffusers.guiders.guider_utils")
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    for phi in (0.0, 0.7, 1.0):
        guided = uncond + 5.0 * (cond - uncond)
        torch.testing.assert_close(rescale(guided, cond, phi), guider_utils.rescale_noise_cfg(guided, cond, phi))
        torch.testing.assert_close(combine(cond, uncond, 5.0, phi), guider_utils.rescale_noise_cfg(guided, cond, phi))
    assert rescale(guided, cond, 1.0).flatten(1).std(1).sub(cond.flatten(1).std(1)).abs().max() < 1e-5


@pytest.mark.parametrize("name", [n for n in sampler_names("gaussian")])
def test_every_sampler_guides_with_one_forward_pass_per_call(name):
    """Every sampler of the registry takes guidance_scale; with w != 0, 1 each network call is one pass of 2B."""
    process = _process()
    sampler = build_sampler(name, process, guidance_scale=3.0, **({"num_steps": 4} if "num_steps" in
                                                                  build_sampler(name, process).__init__.__code__.co_varnames else {}))
    net = ClassGaussianOracle(process, [-1.0, 1.0], 0.5)
    labels = torch.tensor([0, 1, 1])
    out = sampler.sample(net, (3, 1, 2, 2), generator=torch.Generator().manual_seed(0), labels=labels)
    assert out.samples.shape == (3, 1, 2, 2) and torch.isfinite(out.samples).all()
    assert net.calls == sampler.nfe
    assert all(torch.equal(y, torch.tensor([0, 1, 1, 2, 2, 2])) for y in net.seen)  # labels, then the null class
    assert "guidance 3" in sampler.describe()


def _draw(sampler_name, w, n=2000, seed=0, **options):
    process = _process(T=1000)  # abar_T ~ 4e-5: the prior N(0, I) is the marginal at T
    sampler = build_sampler(sampler_name, process, guidance_scale=w, clip_denoised=False, **options)
    net = ClassGaussianOracle(process, [-0.5, 0.5], 0.5)
    labels = torch.arange(n) % 2
    x = sampler.sample(net, (n, 1, 2, 2), generator=torch.Generator().manual_seed(seed), labels=labels).samples
    return x.double(), labels, net


@pytest.mark.parametrize("sampler_name, options", [("ddim", {"num_steps": 250}), ("ddpm", {})])  # DDIM-50 shrinks s by 5%
def test_conditional_sampling_returns_each_class_distribution(sampler_name, options):
    """w = 1 with the exact per-class denoiser: class k's samples are N(mu_k, s^2 I) (mean and spread per pixel)."""
    x, labels, _ = _draw(sampler_name, 1.0, **options)
    for k, mu in enumerate((-0.5, 0.5)):
        xk = x[labels == k]
        se = 0.5 / len(xk) ** 0.5  # standard error of the mean of 1,000 draws of N(mu, 0.25)
        assert (xk.mean(0) - mu).abs().max() < 4 * se + 0.01, (k, xk.mean(0))
        assert (xk.std(0) - 0.5).abs().max() < 0.04, (k, xk.std(0))


def test_larger_guidance_moves_samples_towards_their_class():
    """The Bayes classifier's log-odds of the true class rises with w, and fewer samples fall nearer the other class;
    w > 1 pushes samples away from the other class (their mean moves past mu_k, away from it)."""
    margins, wrong, shift = [], [], []
    for w in (0.0, 1.0, 2.0, 4.0):
        x, labels, net = _draw("ddim", w, num_steps=50)
        flat = x.flatten(1)
        d = torch.stack([((flat - m) ** 2).sum(1) for m in (-0.5, 0.5)], dim=1)  # squared distance to each mean
        own, other = d[torch.arange(len(x)), labels], d[torch.arange(len(x)), 1 - labels]
        margins.append(float((other - own).mean()))  # proportional to the log-odds of the true class
        wrong.append(float((own > other).double().mean()))
        shift.append(float((flat.mean(1) * (2 * labels - 1)).mean()))  # the mean, signed towards the own class
    assert margins == sorted(margins) and margins[0] < margins[1] < margins[2] < margins[3], margins
    # w = 0 ignores the class (half on the wrong side); w = 1 is the Bayes error Phi(-2) = 0.0228 of two N(mu_k, 0.25 I)
    # classes whose means lie 2 apart in 4 dimensions; guidance takes it towards 0
    assert wrong[0] > 0.4 and abs(wrong[1] - 0.0228) < 0.01 and wrong[3] <= wrong[2] < wrong[1] / 2, wrong
    assert abs(shift[1] - 0.5) < 0.03 and shift[3] > 0.6, shift  # w=1: exactly mu; w=4 past it


def test_unconditional_network_rejects_labels_and_conditional_defaults_to_null():
    from diffusion.models import SimpleUNet, UNet

    for cls, kw in ((UNet, {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": []}),
                    (SimpleUNet, {"base_channels": 8, "channel_mult": [1, 2]})):
        torch.manual_seed(0)
        net = cls(in_channels=1, image_size=8, num_classes=4, **kw).eval()
        x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 50])
        assert torch.equal(net(x, t), net(x, t, torch.tensor([4, 4])))  # y=None is the null class
        assert not torch.allclose(net(x, t, torch.tensor([0, 0])), net(x, t, torch.tensor([1, 1])))
        plain = cls(in_channels=1, image_size=8, **kw)
        assert not any("class_embed" in k for k in plain.state_dict())  # unconditional checkpoints: unchanged keys
        with pytest.raises(ValueError, match="unconditional"):
            plain(x, t, torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="num_classes=1 is invalid"):
            cls(in_channels=1, image_size=8, num_classes=1, **kw)


def _module(num_classes=10, cond_drop_prob=0.1, guidance_scale=1.0):
    from diffusion.training.module import DiffusionModule

    return DiffusionModule(
        model={"_target_": "diffusion.models.UNet", "in_channels": 1, "image_size": 8, "base_channels": 8,
               "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [], "num_classes": num_classes},
        schedule={"_target_": "diffusion.processes.schedules.LinearSchedule", "T": 50},
        sampler={"_target_": "diffusion.samplers.ddim.DDIMSampler", "_partial_": True, "num_steps": 3,
                 "guidance_scale": guidance_scale},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
        process={"_target_": "diffusion.processes.GaussianDiffusion", "_partial_": True},
        cond_drop_prob=cond_drop_prob)


def test_label_dropout_uses_the_null_class_at_the_configured_rate():
    module = _module(cond_drop_prob=0.2)
    seen = []
    module.model.register_forward_pre_hook(lambda m, args: seen.append(args[2].clone()))
    labels = torch.arange(64) % 10
    images = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    for step in range(150):
        module._losses((images, labels), module._seeded_generator(1, 0, step), drop_labels=True)
    y = torch.stack(seen)
    dropped = y == 10
    assert abs(dropped.double().mean().item() - 0.2) < 0.01  # 9,600 labels: standard error 0.004
    assert torch.equal(y[~dropped], labels.expand_as(y)[~dropped])  # the others are the batch's labels
    assert dropped.any(0).all() and not dropped.all(0).any()  # the drop differs from step to step
    seen.clear()
    module._losses((images, labels), module._seeded_generator(2, 0, 0))  # validation: no dropout
    assert torch.equal(seen[0], labels)


def test_bad_classes_and_guidance_give_one_line_errors():
    module = _module()
    with pytest.raises(ValueError, match=r"classes=\[10\] is invalid: class 10 is not in 0..9"):
        module.sample(1, labels=[10])
    unconditional = _module(num_classes=None, guidance_scale=2.0)
    with pytest.raises(ValueError, match="guidance_scale=2 is invalid for this model: it is unconditional"):
        unconditional.sample(1)
    with pytest.raises(ValueError, match="this model is unconditional"):
        _module(num_classes=None).sample(1, labels=[0])
    with pytest.raises(ValueError, match="needs classes to guide towards"):
        _module(guidance_scale=2.0).sample(1)
    with pytest.raises(ValueError, match="guidance_rescale=1.5 is invalid: it must be a number in"):
        build_sampler("ddim", module.process, guidance_rescale=1.5)
    with pytest.raises(ValueError, match="cond_drop_prob=1 is invalid"):
        _module(cond_drop_prob=1)
