"""experiments/first_run.py, the evidence behind the digits default: its time breakdown adds up to what the profiler
and the wall clock say, its table shows what it measured, and (slow) the README's default command trains a model
whose samples the independent classifiers read as digits."""

import json
import sys

import pytest
import torch

from tests.conftest import FAST, REPO

sys.path.insert(0, str(REPO / "experiments"))
import first_run  # noqa: E402


def test_a_candidates_seconds_add_up_to_the_profilers_and_the_wall_clock(classifier_cache, tmp_path, monkeypatch):
    """``--only <candidate> --out DIR`` on a tiny candidate, trained as the script trains every one (the training CLI
    with the SimpleProfiler on): the steps, validation, grids and checkpoints are the profiler's totals, they and the
    rest add up to the wall clock, the run's metrics.json says where its seconds went, and the table shows them."""
    monkeypatch.setenv("DIFFUSION_CACHE", str(classifier_cache))
    monkeypatch.setitem(first_run.CANDIDATES, "tiny", [*FAST, "trainer.max_epochs=2", "module.sample_every_n_epochs=1",
                                                      "logger=none"])
    result = first_run.main(["--only", "tiny", "--out", str(tmp_path), "--samples", "16"])
    spent = result["runs"]["tiny"]["time"]
    report = (tmp_path / "tiny" / "fit-profile.txt").read_text()
    assert "run_training_batch" in report and "sample_grid" in report
    totals = first_run.profiled_seconds(tmp_path / "tiny" / "fit-profile.txt")
    assert spent["steps_done"] == 4 and spent["steps"] == totals["steps"] > 0
    assert spent["sample_grids"] > 0 and spent["checkpoints"] > 0 and spent["validation"] >= 0
    parts = spent["steps"] + spent["validation"] + spent["sample_grids"] + spent["checkpoints"] + spent["other"]
    assert parts == pytest.approx(spent["wall"]) and spent["profiled"] < spent["wall"]
    assert spent["overhead"] == pytest.approx(1 - spent["steps"] / spent["wall"])
    seconds = json.loads((tmp_path / "tiny" / "metrics.json").read_text())["seconds"]
    # after_fit may round to 0.0: the final grid reuses the last epoch's (sample_every_n_epochs=1)
    assert set(seconds) == {"before_fit", "fit", "after_fit"} and min(seconds.values()) >= 0
    assert sum(seconds.values()) < spent["wall"]

    assert set(result["runs"]["tiny"]["quality"]) == {"8px", "16px"}
    assert "| tiny |" in (tmp_path / "first_run.md").read_text()
    quality = {"confident": 0.9, "class_kl": 0.01, "histogram": [0.1] * 10, "fd": 0.2, "fd@180": 0.3, "real_fd": 0.25}
    about = {"num_train": 1617, "num_val": 180, "accuracy": 0.97, "val_confident": {"confident": 0.95}}
    text = first_run.table({"tiny": {"overrides": ["a=1"], "time": spent, "quality": {"8px": quality, "16px": quality}}},
                           {"16px": about, "8px": about})
    row = next(line for line in text.splitlines() if line.startswith("| tiny"))
    assert "`a=1`" in row and "| 4 |" in row and "90.0% / 90.0%" in row and f"{spent['overhead']:.0%}" in row


def test_judging_a_run_you_trained(finished_run, classifier_cache, tmp_path, monkeypatch):
    """``--judge <run>``: the run's own sampler draws the samples; both judges score them; the cached 16 px
    classifier is read, not trained again; the table and JSON are written to --out."""
    monkeypatch.setenv("DIFFUSION_CACHE", str(classifier_cache))
    run, _ = finished_run
    result = first_run.main(["--judge", str(run), "--out", str(tmp_path), "--samples", "16"])
    row = result["runs"][run.name]
    assert row["sampler"].startswith("ddim, 3 steps") and row["time"]["steps_done"] == 4
    assert set(row["quality"]) == {"16px", "8px"} and all(q["samples"] == 16 for q in row["quality"].values())
    assert result["classifiers"]["16px"]["trained"] is False, "the cached classifier is used"
    assert result["classifiers"]["8px"]["val_confident"]["confident"] > 0.9, "the 8 px judge reads real digits"
    assert json.loads((tmp_path / "first_run.json").read_text())["runs"][run.name]["quality"] == row["quality"]
    assert f"| {run.name} |" in (tmp_path / "first_run.md").read_text()


def test_area_resize_averages_each_block():
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4) * 10
    small = first_run.area_resize(x, 2)
    expected = torch.tensor([[25, 45], [105, 125]], dtype=torch.uint8)  # e.g. (0 + 10 + 40 + 50) / 4 = 25
    assert torch.equal(small[0, 0], expected) and first_run.area_resize(x, 4) is x


def test_unknown_candidate_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as err:
        first_run.main(["--only", "nope", "--out", "unused"])
    assert "--only nope is not a candidate" in str(err.value) and "default" in str(err.value)


@pytest.mark.slow
def test_the_readme_default_trains_digits_the_classifiers_read(tmp_path):
    """``python -m diffusion.train`` as the README runs it (W&B offline), judged as the README's table says: of 400
    DDIM samples the classifiers are confident on at least 85% at 8 px (the digit's shape) and at 16 px, all ten
    classes come out about equally often, and the Frechet distance at 180 images is within 25% of the held-out
    real digits' own."""
    rows = first_run.main(["--only", "default", "--out", str(tmp_path)])["runs"]["default"]
    q8, q16 = rows["quality"]["8px"], rows["quality"]["16px"]
    assert q8["confident"] >= 0.85 and q16["confident"] >= 0.85, rows["quality"]
    assert q8["class_kl"] <= 0.05 and q16["class_kl"] <= 0.05, rows["quality"]
    assert q8["fd@180"] <= 1.25 * q8["real_fd"], rows["quality"]
    assert (tmp_path / "default" / "samples" / "final.png").is_file()


def test_the_final_grid_reuses_the_last_epochs_images_only_for_the_same_weights(ckpt, monkeypatch):
    """The final grid after a last epoch that drew one (same step, weights, sampler and seed) is those images,
    not drawn again; any other weights are sampled anew."""
    from diffusion.training.module import DiffusionModule

    module = DiffusionModule.from_checkpoint(ckpt)
    drawn = []
    sample = module.sample
    monkeypatch.setattr(module, "sample", lambda *a, **k: drawn.append(1) or sample(*a, **k))
    module.log_sample_grid("epoch_0001")
    module.log_sample_grid("final")
    assert len(drawn) == 1
    fresh = module.sample(module.hparams.num_samples, generator=torch.Generator().manual_seed(module.hparams.seed))
    assert torch.equal(module._last_grid[1], fresh.samples), "the reused images are what sampling gives"
    with torch.no_grad():
        next(module.model.parameters()).view(-1)[0] += 1e-3
    module.log_sample_grid("final")
    assert len(drawn) == 3, "other weights: sampled again (the check above drew once too)"
