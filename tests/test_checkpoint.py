"""Model files load without running code: a crafted checkpoint is refused, a real one round-trips."""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path

import pytest
import torch

from siamese_core import checkpoint
from siamese_core.config import ModelConfig
from siamese_core.model import SiameseNet


class _RunsCode:
    """What an attacker pickles: unpickling it calls ``os.system`` (here: touching a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def crafted_checkpoint(directory: Path, marker: Path) -> Path:
    """A ``model.pt`` that looks like ours (format, config, weights) but carries code."""
    net = SiameseNet(ModelConfig(preset="cpu-small", input_size=35, channels=(4, 4, 4, 4), kernels=(3, 3, 2, 2),
                                 embedding_dim=8))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / checkpoint.MODEL_FILE
    payload = {"format": checkpoint.FORMAT, "model_config": dataclasses.asdict(net.config),
               "state_dict": net.state_dict(), "surprise": _RunsCode(marker)}
    torch.save(payload, path)
    return path


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    crafted_checkpoint(tmp_path / "ckpt", marker)
    # the control: plain unpickling would run it (so the test can fail if loading ever stops being safe)
    torch.load(tmp_path / "ckpt" / checkpoint.MODEL_FILE, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(checkpoint.UnsafeCheckpointError, match="was not loaded"):
        checkpoint.load_model(tmp_path / "ckpt")
    assert not marker.exists()


def test_a_checkpoint_written_here_loads_with_its_config_and_weights(tmp_path: Path) -> None:
    net = SiameseNet(ModelConfig(preset="cpu-small", input_size=35, channels=(4, 4, 4, 4), kernels=(3, 3, 2, 2),
                                 embedding_dim=8))
    checkpoint.save(tmp_path, net, epoch=3, metrics={"val": 0.5})
    loaded = checkpoint.load_model(tmp_path)
    assert loaded.config == net.config
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    assert checkpoint.load_payload(tmp_path)["epoch"] == 3
