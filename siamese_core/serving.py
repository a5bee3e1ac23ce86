"""The served model: encoded images in, similarities (or embeddings) out, with the model's own preprocessing.

Registered in MLflow as a ``python_function`` model whose ``loader_module`` is this
module and whose data is a ``model.pt`` checkpoint: loading rebuilds the network
from its config and weights (``torch.load(weights_only=True)``), so a model from
a shared registry runs no code from its files, and imports nothing but this
package. Nothing here imports MLflow: the loader protocol is a function name.

Input (a pandas DataFrame, or a mapping of equal-length lists):

* columns ``left`` and ``right``: encoded images (bytes, any format Pillow reads)
  -> a float array of "same class" probabilities ``p``, one per row;
* a column ``image``: encoded images -> their embeddings ``[N, D]``, the scoring
  embedding (the model's test-time views included) that ``workflows.embed`` stores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_model
from .evaluation import embed_images
from .images import decode_image
from .model import SiameseNet


class ServedModel:
    """A trained network with its preprocessing, answering MLflow's ``predict``."""

    def __init__(self, net: SiameseNet, batch_size: int = 256) -> None:
        self.net = net.eval()
        self.batch_size = batch_size

    def decode(self, images: Any) -> np.ndarray:
        """Encoded images -> uint8 ``[N, C, S, S]`` exactly as training decoded them."""
        cfg = self.net.config
        return np.stack([decode_image(bytes(data), cfg.preprocess, cfg.input_size, path=f"row {i}")
                         for i, data in enumerate(images)]) if len(images) else \
            np.zeros((0, cfg.in_channels, cfg.input_size, cfg.input_size), np.uint8)

    def embed(self, images: Any) -> np.ndarray:
        return embed_images(self.net, self.decode(images), batch_size=self.batch_size).float().cpu().numpy()

    @torch.no_grad()
    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        columns = {name: list(model_input[name]) for name in ("left", "right", "image") if name in model_input}
        if "image" in columns:
            return self.embed(columns["image"])
        if "left" not in columns or "right" not in columns:
            raise ValueError("input needs columns 'left' and 'right' (pairs of encoded images) or 'image'")
        h1 = torch.from_numpy(self.embed(columns["left"]))
        h2 = torch.from_numpy(self.embed(columns["right"]))
        return torch.sigmoid(self.net.head_logits(h1, h2)).numpy()

    def get_raw_model(self) -> SiameseNet:
        return self.net


def _load_pyfunc(data_path: str) -> ServedModel:
    """MLflow's loader hook: ``data_path`` is the logged ``model.pt``."""
    return ServedModel(load_model(Path(data_path)))
