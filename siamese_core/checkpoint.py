"""One file format for trained weights: the state dict plus the config that built it.

A checkpoint directory (Ray Train's, or any folder) holds ``model.pt``. It
carries the :class:`ModelConfig` (preprocessing included), so loading needs no
other file and a checkpoint of one preset can never be loaded into another's
shapes. The file holds only tensors and plain values, and is loaded with
``torch.load(weights_only=True)``: a checkpoint from a shared bucket cannot run
code on whoever loads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ModelConfig
from .model import SiameseNet

MODEL_FILE = "model.pt"
FORMAT = "siamese-oneshot/2"


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
        **plain(training_state),
    }
    torch.save(payload, path)
    return path


def plain(value: Any) -> Any:
    """Numpy scalars and arrays as Python values and tensors, so ``weights_only`` loading accepts them."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    return value


class UnsafeCheckpointError(ValueError):
    """A model file holds more than tensors and plain values (code, or objects that run code)."""


def load_payload(directory: str | Path) -> dict[str, Any]:
    path = Path(directory)
    path = path / MODEL_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no {MODEL_FILE} in {directory}: not a siamese-oneshot checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path} holds more than weights and plain values, so it was not loaded (loading it could run "
            f"code from the file). Load only checkpoints that siamese-oneshot wrote. ({str(exc).splitlines()[0]})"
        ) from exc
    except (RuntimeError, EOFError) as exc:
        raise ValueError(f"{path} is not a readable checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not a {FORMAT} checkpoint (found {found!r}); "
                         "retrain, or load it with the version of siamese-oneshot that wrote it")
    return payload


def model_from_payload(payload: dict[str, Any]) -> SiameseNet:
    """The network, with ``new_threshold``: the "new individual" threshold (a probability) that the
    evaluation chose on validation and stored with a registered model, or None."""
    model = SiameseNet(ModelConfig.from_dict(payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    model.new_threshold = payload.get("new_threshold")
    return model.eval()


def load_model(directory: str | Path) -> SiameseNet:
    """The network saved in a checkpoint directory (or a ``model.pt`` path), in eval mode."""
    return model_from_payload(load_payload(directory))


def model_digest(model: torch.nn.Module) -> str:
    """sha256 of a network's config and weights: what a gallery's embeddings were made with."""
    net = unwrap(model)
    h = hashlib.sha256(json.dumps(dataclasses.asdict(net.config), sort_keys=True, default=list).encode())
    for key, value in sorted(net.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().to("cpu").contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()
