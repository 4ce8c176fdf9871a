"""The EMA callback's warm-up: its weights equal the closed-form recursion, and a short run's EMA is not its init."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from diffusion.training.ema import EMA, ema_decay


class Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordWeights(Callback):
    """The raw weights after every optimizer step (float64 copies)."""

    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(torch.cat([p.detach().double().flatten() for p in pl_module.parameters()]))


def fit(ema: EMA, steps: int):
    torch.manual_seed(0)
    x = torch.randn(steps, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 3.0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=1)
    record = RecordWeights()
    module = Linear()
    trainer = L.Trainer(max_epochs=1, callbacks=[record, ema], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, loader)
    average = torch.cat([p.double().flatten() for p in ema._average_model.module.parameters()])
    return record.weights, average


def test_decay_closed_form():
    assert ema_decay(0, 0.995) == 0.0  # the first update copies the weights
    assert ema_decay(30, 0.995) == pytest.approx(1 - 31 ** (-2 / 3))  # ~0.90
    assert ema_decay(10**6, 0.995) == 0.995  # capped at the configured decay
    assert ema_decay(5, 0.9, warmup_power=None) == 0.9


@pytest.mark.parametrize("warmup_power", [2 / 3, None])
def test_ema_weights_follow_the_recursion(warmup_power):
    """ema_0 = w_0, ema_k = d_k ema_{k-1} + (1 - d_k) w_k with d_k = min(decay, 1 - (1 + k)^-p): computed here in
    float64 from the recorded raw weights, against what the callback holds."""
    steps, decay = 40, 0.95
    weights, average = fit(EMA(decay=decay, warmup_power=warmup_power), steps)
    expected = weights[0]
    for k in range(1, steps):
        d = decay if warmup_power is None else min(decay, 1 - (1 + k) ** -warmup_power)
        expected = d * expected + (1 - d) * weights[k]
    torch.testing.assert_close(average, expected, rtol=0, atol=1e-6)


def test_short_run_ema_tracks_the_weights_with_warm_up():
    """After 30 steps the warmed-up EMA sits near the trained weights; a constant 0.995 is still near the init."""
    weights, warm = fit(EMA(decay=0.995), 30)
    _, cold = fit(EMA(decay=0.995, warmup_power=None), 30)
    init, final = weights[0], weights[-1]
    assert (warm - final).norm() < 0.25 * (init - final).norm()
    assert (cold - init).norm() < 0.25 * (init - final).norm()


@pytest.mark.parametrize("kwargs", [{"decay": 1.5}, {"warmup_power": 0}, {"inv_gamma": -1}])
def test_bad_values_are_one_line_errors(kwargs):
    with pytest.raises(ValueError, match="callbacks.ema.* is invalid"):
        EMA(**kwargs)


class LinearWithValidation(Linear):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val", torch.nn.functional.mse_loss(self.layer(x), y))


def test_the_lean_update_is_lightnings_bit_for_bit_across_validation_swaps(monkeypatch):
    """The cached-list update (EMA._pairs) against Lightning's own AveragedModel.update_parameters, over 3 epochs
    whose validations swap the EMA weights in and out: the same averaged weights, bit for bit, and the lean path
    really ran."""
    def run(lean: bool):
        torch.manual_seed(0)
        x = torch.randn(12, 3)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=2)
        ema = EMA(decay=0.9)
        calls = []
        if not lean:
            monkeypatch.setattr(ema, "_pairs", lambda *a: calls.append(1))  # returns None: Lightning's update
        trainer = L.Trainer(max_epochs=3, callbacks=[ema], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        trainer.fit(LinearWithValidation(), loader, loader)
        return torch.cat([p.flatten() for p in ema._average_model.module.parameters()]), ema, calls

    lean, ema, _ = run(True)
    plain, _, calls = run(False)
    assert ema._groups is not None and len(calls) == 17  # 18 steps: the first one copies
    assert torch.equal(lean, plain)
