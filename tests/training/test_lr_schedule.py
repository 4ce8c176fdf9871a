"""module.lr_schedule: the linear warm-up and the cosine decay against PyTorch's own schedulers, and bad values."""

import pytest
import torch

from diffusion.training.optim import check_lr_schedule, lr_factor


@pytest.mark.parametrize("warmup, total, min_ratio", [(10, 110, 0.0), (1, 37, 0.1), (25, 200, 0.05)])
def test_cosine_decay_is_pytorchs_linear_warmup_then_cosine_annealing(warmup, total, min_ratio):
    """A second implementation on the same steps: SequentialLR(LinearLR from 1/warmup to 1 over the warm-up,
    CosineAnnealingLR from 1 down to min_ratio over the remaining total - 1 - warmup steps)."""
    lr = 2e-3
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=max(warmup - 1, 1))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - 1 - warmup, eta_min=min_ratio * lr)
    schedule = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cosine], milestones=[warmup])
    theirs = []
    for _ in range(total):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    ours = [lr * lr_factor(step, warmup, total, min_ratio) for step in range(total)]
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)
    assert ours[-1] == pytest.approx(min_ratio * lr) and max(ours) == pytest.approx(lr)


def test_constant_is_the_warm_up_alone():
    assert [lr_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("args, text", [(("linear", 0.0, 100), "module.lr_schedule='linear' is invalid: allowed values are constant, cosine"),
                                        (("cosine", 1.5, 100), "module.lr_min_ratio=1.5 is invalid"),
                                        (("cosine", 0.0, -1), "module.lr_warmup_steps=-1 is invalid")])
def test_bad_values_are_one_line_errors(args, text):
    with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(")", r"\)")) as err:
        check_lr_schedule(*args)
    assert "\n" not in str(err.value)
