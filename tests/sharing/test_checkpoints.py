"""Safe checkpoint loading (issue #17, first part): every checkpoint the package reads goes through
diffusion.sharing.checkpoints.load_file, weights-only with an allow-list. A file whose pickle would run code is refused in
one line naming what it holds, and the code does not run; trust_checkpoint=true is the explicit way to open it."""

import pathlib

import pytest
import torch

from diffusion.run.errors import UsageError
from diffusion.sharing.checkpoints import load_file, unsafe_globals
from tests.conftest import REPO


class RunsCode:
    """Unpickling this touches ``marker``: what a malicious checkpoint would do (with os.system)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def crafted(ckpt, tmp_path):
    """The shared run's checkpoint with one extra entry whose unpickling runs code (touches a marker file)."""
    marker = tmp_path / "code_ran"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    saved["extra"] = RunsCode(marker)
    path = tmp_path / "crafted.ckpt"
    torch.save(saved, path)
    assert not marker.exists()
    return path, marker


def test_a_crafted_checkpoint_is_refused_and_its_code_does_not_run(crafted, tmp_path):
    from diffusion.sample import sample
    from tests.run.test_errors import compose_cfg, refused

    path, marker = crafted
    assert set(unsafe_globals(path)) == {"builtins.getattr", "pathlib.Path", "pathlib.PosixPath"}  # what its pickle calls
    with pytest.raises(ValueError, match=r"holds objects beyond tensors and plain data \(it names [a-zA-Z., ]*pathlib.Path"
                                         r"[a-zA-Z., ]*\), which a checkpoint of this framework never holds.*trust_checkpoint=true"):
        load_file(path)
    with pytest.raises(UsageError, match="trust_checkpoint=true") as info:  # diffusion.sample ckpt=<crafted>
        sample(compose_cfg(f"ckpt={path}", "n=1", f"paths.output_dir={tmp_path / 's'}", config_name="sample"))
    assert "\n" not in str(info.value) and not (tmp_path / "s").exists()
    assert "trust_checkpoint=true" in refused(tmp_path, f"ckpt_path={path}")  # diffusion.train ckpt_path=<crafted>
    assert not marker.exists()  # nothing in the file was run

    # the explicit way: trust_checkpoint=true reads it with the full unpickler (so the file's code runs) and samples
    sample(compose_cfg(f"ckpt={path}", "n=1", "trust_checkpoint=true", f"paths.output_dir={tmp_path / 't'}",
                       config_name="sample"))
    assert marker.exists() and (tmp_path / "t" / "samples.npz").is_file()


def test_every_checkpoint_the_framework_writes_loads_weights_only(ckpt, cond_ckpt):
    """The shared run's last.ckpt (EMA, loops, loader state), a conditional one and the legacy checkpoints of earlier
    versions hold only tensors and plain data: they load without trust and without any allowed extra class."""
    from diffusion.training.module import DiffusionModule

    legacy = sorted((REPO / "tests" / "data" / "legacy").glob("*.ckpt"))
    assert len(legacy) >= 3
    for path in [ckpt, cond_ckpt, *legacy]:
        assert unsafe_globals(path) == [], path
        assert isinstance(load_file(path), dict)
        DiffusionModule.from_checkpoint(path)


def test_unreadable_files_keep_their_one_line_answer(tmp_path):
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(ValueError, match="does not exist or is not a file"):
        load_file(missing)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        load_file(text)
