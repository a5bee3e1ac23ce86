"""The twin network of Koch, Zemel & Salakhutdinov (2015), built from a ModelConfig.

Design notes (why, not what):

* ``forward`` returns *logits*, not probabilities: training uses
  ``BCEWithLogitsLoss``, which is numerically stable where ``sigmoid`` + BCE
  saturates. ``similarity`` gives the paper's ``p`` for callers that want it.
* ``embed`` and ``head_logits`` are separate so one-shot scoring embeds each
  image once and scores all query/support pairs with ``pairwise_logits``
  (the expensive part is the twin, not the head).
* Layer names (``conv1..conv4``, ``fc``, ``head``) equal
  :data:`siamese_core.config.LAYER_NAMES`; the layer-wise optimizer relies on it.
* ``scoring_embed`` is what every comparison after training uses (one-shot
  trials, ``predict``, the served model): the mean embedding over shifted views
  when ``config.test_time_shift_px`` asks for them. Training uses ``embed``.
* Input is ``(B, C, S, S)`` float in ``[0, 1]``, ``C`` = 1 (gray) or 3 (rgb),
  as :func:`siamese_core.images.decode_image` makes it (for Omniglot ink = 1.0 and
  background = 0.0, so zero padding in distortions is background). The model's
  per-channel normalisation (``config.preprocess.mean/std``) is its own first
  step, so every caller (training, evaluation, ``predict``, serving) applies it.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from .config import LAYER_NAMES, TEST_TIME_VIEWS, ModelConfig


class SiameseNet(nn.Module):
    """Convolutional siamese twin + weighted-L1 head (the paper's Figure 4)."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        config = config if config is not None else ModelConfig.from_preset("koch")
        # A network always knows its whole preprocessing: what the data set left open is the paper's.
        self.config = dataclasses.replace(config, preprocess=config.preprocess.resolved())
        c, k = self.config.channels, self.config.kernels
        mean, std = self.config.preprocess.mean, self.config.preprocess.std
        # Not persistent: the values live in the config, so state dicts stay the paper network's.
        self.register_buffer("input_mean", torch.tensor(mean or (0.0,), dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("input_std", torch.tensor(std or (1.0,), dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.normalizes = bool(mean)
        self.conv1 = nn.Conv2d(self.config.in_channels, c[0], k[0])
        self.conv2 = nn.Conv2d(c[0], c[1], k[1])
        self.conv3 = nn.Conv2d(c[1], c[2], k[2])
        self.conv4 = nn.Conv2d(c[2], c[3], k[3])
        # Batch norm after each conv when the config asks for it; Identity otherwise, so the
        # paper's network has exactly its own parameters and state-dict keys.
        for i in range(4):
            setattr(self, f"conv{i + 1}_norm", nn.BatchNorm2d(c[i]) if self.config.batch_norm else nn.Identity())
        self.pool = nn.MaxPool2d(2)
        side = self.config.feature_map_size()
        self.flat_dim = c[3] * side * side
        self.fc = nn.Linear(self.flat_dim, self.config.embedding_dim)
        # head: p = sigmoid(sum_j alpha_j |h1_j - h2_j| + b); alpha = weight, b = bias.
        self.head = nn.Linear(self.config.embedding_dim, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Convolutional trunk: ``(B,C,S,S)`` -> ``(B, C4, s, s)`` (256@6x6 for koch)."""
        if self.normalizes:
            x = (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)
        if self.conv1.weight.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
            # A channels_last model is only fast if its input is too.
            x = x.contiguous(memory_format=torch.channels_last)
        # ReLU after each max-pool, not before: the two commute (ReLU is monotone), so values
        # and gradients are the paper's, but the ReLU then touches a quarter of the values.
        x = torch.relu(self.pool(self.conv1_norm(self.conv1(x))))
        x = torch.relu(self.pool(self.conv2_norm(self.conv2(x))))
        x = torch.relu(self.pool(self.conv3_norm(self.conv3(x))))
        return torch.relu(self.conv4_norm(self.conv4(x)))

    def layer_parameters(self, layer: str) -> list[nn.Parameter]:
        """Parameters the optimizer treats as ``layer`` (a conv's batch norm belongs to it)."""
        params = list(getattr(self, layer).parameters())
        norm = getattr(self, f"{layer}_norm", None)
        return params + (list(norm.parameters()) if norm is not None else [])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """One twin: images ``(B,C,S,S)`` -> embedding ``h`` ``(B, embedding_dim)`` in (0, 1)."""
        # reshape (not view) so a channels_last feature map flattens in NCHW order,
        # the same order as a contiguous model: weights are interchangeable.
        return torch.sigmoid(self.fc(self.features(x).reshape(x.shape[0], -1)))

    def scoring_embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding images are compared by: ``embed``, averaged over the test-time views.

        Views run one at a time, so memory stays that of one ``embed`` call.
        """
        offsets = shift_offsets(self.config.test_time_shift_px, self.config.test_time_views)
        total = self.embed(x)
        for dx, dy in offsets[1:]:
            total = total + self.embed(shift_images(x, dx, dy))
        return total / len(offsets)

    def head_logits(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        """Logits ``(B,)`` of "same class" from the component-wise L1 distance."""
        return self.head(torch.abs(h1 - h2)).squeeze(-1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor,
                pairings: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Pre-sigmoid logits ``(B,)``; both images go through one batched twin pass.

        With ``pairings`` (index tensors ``(i, j)`` into the ``2B`` images, ``x1``
        then ``x2``), also returns the logits of those extra pairings, scored on
        the same embeddings: the in-batch negatives of ``train_step``. They are
        computed here, in ``forward``, so DistributedDataParallel sees them.
        """
        h = self.embed(torch.cat([x1, x2], dim=0))
        h1, h2 = h.split([x1.shape[0], x2.shape[0]], dim=0)
        logits = self.head_logits(h1, h2)
        if pairings is None:
            return logits
        # index_select, not h[idx]: its backward adds rows in a fixed order, where advanced
        # indexing's accumulates through index_put_, several times slower on CPU and summing in
        # a varying order with 2 threads (two runs with one seed trained different weights).
        return logits, self.head_logits(h.index_select(0, pairings[0]), h.index_select(0, pairings[1]))

    def similarity(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """The paper's ``p`` in (0, 1): probability that the two images share a class
        (scored on ``scoring_embed``, so with the test-time views when configured)."""
        return torch.sigmoid(self.head_logits(self.scoring_embed(x1), self.scoring_embed(x2)))

    def pairwise_logits(self, h_queries: torch.Tensor, h_support: torch.Tensor,
                        max_elements: int = 1 << 24) -> torch.Tensor:
        """Logits ``[Q, S]`` for every query/support pair of precomputed embeddings.

        Chunks over queries so the ``Q x S x D`` difference tensor stays under
        ``max_elements`` (memory-bounded for large galleries).
        """
        q, s, d = h_queries.shape[0], h_support.shape[0], h_queries.shape[1]
        step = max(1, max_elements // max(1, s * d))
        rows = [self.head_logits(h_queries[i:i + step, None, :], h_support[None, :, :])
                for i in range(0, q, step)]
        return torch.cat(rows, dim=0) if rows else h_queries.new_zeros((0, s))


def with_test_time_shift(model: SiameseNet, shift_px: int, views: str | None = None) -> SiameseNet:
    """The same network (parameters shared, not copied) scoring with other test-time views.

    Why: to report the paper's single-view accuracy beside the configured one, or to
    override a trained model's views, without a second copy of the weights. ``views``
    ("cross" or "square"; None keeps the model's) is the pattern of shifts.
    Raises ConfigError for an invalid ``shift_px`` or ``views``.
    """
    viewed = copy.copy(model)  # a shallow copy: the parameter tensors are the model's own
    viewed.config = dataclasses.replace(model.config, test_time_shift_px=shift_px,
                                        test_time_views=views or model.config.test_time_views)
    return viewed


def shift_offsets(max_px: int, views: str = "cross") -> list[tuple[int, int]]:
    """``(dx, dy)`` of the test-time views, ``(0, 0)`` first.

    "cross": then 1..max_px in four directions (4N + 1 views); "square": then every other
    shift with ``|dx|, |dy| <= max_px``, nearest first ((2N + 1)^2 views).
    """
    if views not in TEST_TIME_VIEWS:
        raise ValueError(f"test-time views must be 'cross' or 'square', got {views!r}")
    offsets = [(0, 0)]
    for d in range(1, max_px + 1):
        if views == "cross":
            offsets += [(d, 0), (-d, 0), (0, d), (0, -d)]
        else:  # the ring at Chebyshev distance d
            offsets += [(dx, dy) for dx in range(-d, d + 1) for dy in range(-d, d + 1) if max(abs(dx), abs(dy)) == d]
    return offsets


def shift_images(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``(B,C,S,S)`` images moved ``dx`` pixels right and ``dy`` down; zero (background) fills in."""
    pad = max(abs(dx), abs(dy))
    if pad == 0:
        return x
    size_y, size_x = x.shape[-2], x.shape[-1]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    return padded[..., pad - dy:pad - dy + size_y, pad - dx:pad - dx + size_x]


_KOCH = ModelConfig()  # the paper's network, reference for fan-in scaling


def _fan_ins(config: ModelConfig) -> dict[str, int]:
    """Inputs per output unit for each layer (conv: C_in * k * k)."""
    c, k = (config.in_channels, *config.channels), config.kernels
    fans = {f"conv{i + 1}": c[i] * k[i] * k[i] for i in range(4)}
    fans["fc"] = config.channels[3] * config.feature_map_size() ** 2
    fans["head"] = config.embedding_dim
    return fans


def init_paper_weights(model: SiameseNet, generator: torch.Generator | None = None,
                       fan_in_scaled: bool = True) -> SiameseNet:
    """The paper's initialisation: conv W ~ N(0, 1e-2), all biases ~ N(0.5, 1e-2),
    fully connected W ~ N(0, 2e-1) (read as standard deviations); the head
    (alpha) is fully connected too and gets N(0, 2e-1).

    With ``fan_in_scaled`` (default) each weight std is multiplied by
    ``sqrt(fan_in_koch / fan_in)``, which keeps every layer's gain equal to
    the paper network's. For the koch preset the factor is 1, so this *is*
    the paper's init. Why: the paper's fixed stds only work at the paper's
    widths; in the small presets (fan-ins 10-20x smaller) they shrink the
    image-dependent signal so much that all embeddings are equal, |h1 - h2|
    is ~0, and training stalls at loss ln 2 (``tests/test_model.py`` shows the
    scaled init learning where the literal one does not).
    ``fan_in_scaled=False`` applies the literal values to any preset.
    A ``generator`` makes the initialisation reproducible.
    """
    fans, koch_fans = _fan_ins(model.config), _fan_ins(_KOCH)
    with torch.no_grad():
        for name in LAYER_NAMES:
            layer = getattr(model, name)
            std = 1e-2 if name.startswith("conv") else 2e-1
            if fan_in_scaled:
                std *= (koch_fans[name] / fans[name]) ** 0.5
            layer.weight.normal_(0.0, std, generator=generator)
            layer.bias.normal_(0.5, 1e-2, generator=generator)
    return model


def init_kaiming_weights(model: SiameseNet, generator: torch.Generator | None = None) -> SiameseNet:
    """A non-saturating initialisation for small presets (``ModelConfig.init="kaiming"``).

    conv W ~ N(0, sqrt(2 / fan_in)) (He, for ReLU), conv biases ~ N(0, 1e-2);
    fc W ~ N(0, sqrt(1 / fan_in)), fc bias 0, so the sigmoid embedding starts
    near 0.5 with image-dependent pre-activations of order 1 (not saturated);
    head alpha ~ N(0, 2e-1) as in the paper, bias 0. Why: with the paper's
    stds the small net's features are nearly identical across images and most
    sigmoid units saturate, so early learning is slow and erratic.
    """
    fans = _fan_ins(model.config)
    with torch.no_grad():
        for name in LAYER_NAMES:
            layer = getattr(model, name)
            if name.startswith("conv"):
                layer.weight.normal_(0.0, (2.0 / fans[name]) ** 0.5, generator=generator)
                layer.bias.normal_(0.0, 1e-2, generator=generator)
            elif name == "fc":
                layer.weight.normal_(0.0, (1.0 / fans[name]) ** 0.5, generator=generator)
                layer.bias.zero_()
            else:
                layer.weight.normal_(0.0, 2e-1, generator=generator)
                layer.bias.zero_()
    return model


def init_weights(model: SiameseNet, generator: torch.Generator | None = None,
                 fan_in_scaled: bool = True) -> SiameseNet:
    """Initialise ``model`` with the scheme its config names (``model.config.init``).

    ``fan_in_scaled`` only affects the "paper" scheme.
    """
    if model.config.init == "kaiming":
        return init_kaiming_weights(model, generator)
    return init_paper_weights(model, generator, fan_in_scaled=fan_in_scaled)


def place_model(model: SiameseNet, device: torch.device | str,
                channels_last: bool | None = None) -> SiameseNet:
    """``model`` on ``device``, in the memory layout that trains it fastest there.

    ``channels_last=None`` picks by device: channels-last on CPU, where oneDNN's
    convolutions and max-pooling prefer it (``benchmarks/bench_model_presets.py
    --compare-layouts``), contiguous on GPU, where it did not help the paper's network
    (benchmarks/RESULTS.md). Results do not depend on the layout, only speed does:
    ``features`` converts the input to match, and state dicts load either way.
    """
    device = torch.device(device)
    model = model.to(device)
    if channels_last if channels_last is not None else device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model


def build_model(config: ModelConfig | str | None = None, *, seed: int | None = None,
                paper_init: bool = True) -> SiameseNet:
    """A ``SiameseNet`` from a ModelConfig or preset name ("koch", "cpu-small").

    Initialises with the config's scheme (``config.init``, the paper's for
    "koch"), seeded when ``seed`` is given; ``paper_init=False`` keeps torch's default.
    """
    if config is None:
        config = "koch"
    if isinstance(config, str):
        config = ModelConfig.from_preset(config)
    model = SiameseNet(config)
    if paper_init:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        init_weights(model, generator)
    return model


def parameter_count(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (38,951,745 for the koch preset)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def layer_shapes(model: SiameseNet, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """Output shape per conv block (after pooling), for documentation and tests."""
    x = torch.zeros(batch, model.config.in_channels, model.config.input_size, model.config.input_size,
                    device=model.conv1.weight.device)
    shapes: dict[str, tuple[int, ...]] = {}
    with torch.no_grad():
        for i, name in enumerate(("conv1", "conv2", "conv3", "conv4")):
            x = torch.relu(getattr(model, f"{name}_norm")(getattr(model, name)(x)))
            if i < 3:
                x = model.pool(x)
            shapes[name] = tuple(x.shape[1:])
    shapes["fc"] = (model.config.embedding_dim,)
    return shapes


def training_flops_per_pair(config: ModelConfig) -> int:
    """Floating-point operations of one training row (a pair): forward and backward, counted from the layers.

    Each convolution and the fully connected layer cost ``2 * inputs * outputs`` multiply-adds per
    image forward; backward costs twice the forward (gradients of inputs and of weights), so a
    training image costs 3x its forward and a pair twice that. The head, pooling, activations and
    distortions are under 0.1% and left out. Why counted, not profiled: MFU needs the model's own
    work, independent of how well a step runs it.
    """
    c, k = (config.in_channels, *config.channels), config.kernels
    size, forward = config.input_size, 0
    for i in range(4):
        size = size - k[i] + 1
        forward += 2 * c[i] * k[i] * k[i] * c[i + 1] * size * size
        if i < 3:
            size //= 2
    forward += 2 * config.channels[3] * config.feature_map_size() ** 2 * config.embedding_dim
    return 2 * 3 * forward
