"""One file format for trained weights: the state dict plus the config that built it.

A checkpoint directory (Ray Train's, or any folder) holds ``model.pt``. It
carries the :class:`ModelConfig`, so loading needs no other file and a
checkpoint of one preset can never be loaded into another's shapes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .model import SiameseNet

MODEL_FILE = "model.pt"
FORMAT = "siamese-oneshot/1"


def unwrap(model: torch.nn.Module) -> SiameseNet:
    """The bare network inside a DistributedDataParallel (or any ``.module``) wrapper."""
    return getattr(model, "module", model)  # type: ignore[return-value]


def save(directory: str | Path, model: torch.nn.Module, **training_state: Any) -> Path:
    """Write ``model.pt`` (weights on CPU, model config, and any training state) into ``directory``."""
    net = unwrap(model)
    path = Path(directory) / MODEL_FILE
    payload = {
        "format": FORMAT,
        "model_config": dataclasses.asdict(net.config),
        "state_dict": {k: v.detach().to("cpu") for k, v in net.state_dict().items()},
        **training_state,
    }
    torch.save(payload, path)
    return path


def load_payload(directory: str | Path) -> dict[str, Any]:
    path = Path(directory)
    path = path / MODEL_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no {MODEL_FILE} in {directory}: not a siamese-oneshot checkpoint")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint")
    return payload


def model_from_payload(payload: dict[str, Any]) -> SiameseNet:
    config = ModelConfig(**payload["model_config"])
    model = SiameseNet(config)
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def load_model(directory: str | Path) -> SiameseNet:
    """The network saved in a checkpoint directory (or a ``model.pt`` path), in eval mode."""
    return model_from_payload(load_payload(directory))


class PairScorer(torch.nn.Module):
    """Single-input wrapper for serving: stacked pairs ``[B, 2, 1, S, S]`` -> similarity ``[B]``.

    MLflow's PyTorch flavour calls ``model(input)`` with one tensor; the twin
    network needs two, so this is what gets logged and registered.
    """

    def __init__(self, net: SiameseNet) -> None:
        super().__init__()
        self.net = unwrap(net)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.net.similarity(pairs[:, 0], pairs[:, 1])
