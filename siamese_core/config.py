"""One typed configuration for the siamese core, with presets and validation.

Every section is a frozen dataclass that validates itself on construction, so a
bad value fails where it is written, not deep inside a training loop. The
workflows compose these sections with their own (storage, tracking, cluster)
and override them from the command line via :func:`apply_overrides`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

INIT_SCHEMES: tuple[str, ...] = ("paper", "kaiming")
"""Weight initialisations a ModelConfig may name (``ModelConfig.init``)."""

TEST_TIME_VIEWS: tuple[str, ...] = ("cross", "square")
"""Patterns of test-time shifts a ModelConfig may name (``ModelConfig.test_time_views``)."""

NEGATIVES: tuple[str, ...] = ("same_group", "any")
"""Where "different" partners come from (``TrainingConfig.negatives``)."""

VALIDATION_VIEWS: tuple[str, ...] = ("model", "single")
"""How per-epoch validation may view images (``TrainingConfig.validation_views``)."""

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
COLORS: tuple[str, ...] = ("gray", "rgb")
"""Input colours a PreprocessConfig may name: one channel or three."""

FITS: tuple[str, ...] = ("stretch", "pad", "crop")
"""How a non-square image is fitted to the square input (``PreprocessConfig.fit``)."""
"""Optimizers an OptimizerConfig may name (``OptimizerConfig.algorithm``)."""

LAYER_NAMES: tuple[str, ...] = ("conv1", "conv2", "conv3", "conv4", "fc", "head")
"""The network's layers, in order; per-layer optimizer settings use these names."""


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says what to fix."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)



@dataclass(frozen=True)
class PreprocessConfig:
    """How an encoded image becomes the network's input: part of the model, so training,
    evaluation, ``predict`` and the served model all apply the same steps.

    ``None`` means "the data set's default" (its manifest says, see
    :meth:`resolved`); a trained model always carries resolved values.
    Steps, in order: decode (any format Pillow reads), ``color``, ``fit`` to
    the square ``ModelConfig.input_size``, ``invert`` (dark on light becomes 1
    on 0, so the distortions' zero padding is background), then inside the
    network ``(x - mean) / std`` per channel (``()``: none).
    """

    color: str | None = None
    fit: str | None = None
    invert: bool | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        _require(self.color is None or self.color in COLORS,
                 f"model.preprocess.color must be one of {COLORS}, got {self.color!r}")
        _require(self.fit is None or self.fit in FITS, f"model.preprocess.fit must be one of {FITS}, got {self.fit!r}")
        _require(self.invert is None or isinstance(self.invert, bool),
                 f"model.preprocess.invert must be true or false, got {self.invert!r}")
        if self.mean is not None and self.std is not None:
            _require(len(self.mean) == len(self.std),
                     f"model.preprocess.mean {self.mean} and std {self.std} need one value per channel each")
        _require(all(s > 0 for s in self.std or ()), f"model.preprocess.std must be positive, got {self.std}")
        if self.color is not None:
            for name in ("mean", "std"):
                value = getattr(self, name)
                _require(value is None or len(value) in (0, self.channels),
                         f"model.preprocess.{name} needs {self.channels} value(s) for color {self.color!r} "
                         f"(or [] for none), got {value}")

    @property
    def channels(self) -> int:
        """Input channels of the network: 3 for "rgb", else 1."""
        return 3 if self.color == "rgb" else 1

    @property
    def is_resolved(self) -> bool:
        return None not in (self.color, self.fit, self.invert, self.mean, self.std)

    def resolved(self, defaults: "PreprocessConfig | Mapping[str, Any] | None" = None) -> "PreprocessConfig":
        """Every ``None`` filled in from ``defaults`` (a data set's), then from :data:`PAPER_PREPROCESS`.

        A ``defaults`` mapping may give ``mean``/``std`` per colour (``{"gray": [...], "rgb": [...]}``,
        as a manifest does, measured on ink-is-dark pixels): the values for the resolved colour
        are taken, mirrored when the resolved ``invert`` flips the pixels.
        """
        given = dict(defaults) if isinstance(defaults, Mapping) else (
            dataclasses.asdict(defaults) if defaults is not None else {})
        color = self.color or given.get("color") or PAPER_PREPROCESS.color
        fit = self.fit or given.get("fit") or PAPER_PREPROCESS.fit
        invert = self.invert if self.invert is not None else given.get("invert")
        invert = PAPER_PREPROCESS.invert if invert is None else bool(invert)
        stats = {}
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None:
                value = given.get(name)
                if isinstance(value, Mapping):
                    value = value.get(color, ())
                    if name == "mean" and invert and value:
                        value = tuple(1.0 - v for v in value)
            stats[name] = tuple(value) if value is not None else ()
        return PreprocessConfig(color=color, fit=fit, invert=invert, **stats)


PAPER_PREPROCESS = PreprocessConfig(color="gray", fit="stretch", invert=True, mean=(), std=())
"""Omniglot's preprocessing, the paper's: grayscale, stretched square, ink = 1, no normalisation."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the twin network. ``koch`` is the published network."""

    preset: str = "koch"
    input_size: int = 105
    channels: tuple[int, int, int, int] = (64, 128, 128, 256)
    kernels: tuple[int, int, int, int] = (10, 7, 4, 4)
    embedding_dim: int = 4096
    init: str = "paper"
    """Weight initialisation: "paper" (Koch's stds, see ``model.init_paper_weights``)
    or "kaiming" (He-normal convs, 1/sqrt(fan_in) fc; see ``model.init_kaiming_weights``)."""
    batch_norm: bool = False
    """Batch normalisation after each convolution (not in the paper). Why: it lets the
    small CPU preset take larger steps and learn more per pair, which matters when a
    2-core demo can only afford a few hundred thousand pairs."""
    test_time_shift_px: int = 0
    """Test-time views: when N > 0, images are compared by their mean embedding over
    themselves and their shifts by 1..N pixels up, down, left and right (4N + 1 views;
    ``SiameseNet.scoring_embed``); 0 is the paper's single view. Training never uses it.
    Why: the small net is not shift-invariant at 35 px, and averaging over shifted views
    gains several points on validation (benchmarks/RESULTS.md, "test-time views")."""
    test_time_views: str = "cross"
    """Which shifts of up to ``test_time_shift_px`` are views: "cross" (1..N px up, down,
    left and right: 4N + 1 views) or "square" (every ``(dx, dy)`` within N px: (2N + 1)^2
    views). The demo keeps "cross": square's small gain on validation did not hold on the
    test alphabets, and it costs (2N + 1)^2 / (4N + 1) times the scoring compute
    (benchmarks/RESULTS.md, "test-time view patterns")."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """How images become input (colour, fit, polarity, normalisation); the data set's defaults
    fill what is left ``None`` before training, and the trained model carries the result."""

    def __post_init__(self) -> None:
        if isinstance(self.preprocess, Mapping):
            object.__setattr__(self, "preprocess", PreprocessConfig(**self.preprocess))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "kernels", tuple(int(k) for k in self.kernels))
        _require(len(self.channels) == 4, f"model.channels needs 4 values, got {self.channels}")
        _require(len(self.kernels) == 4, f"model.kernels needs 4 values, got {self.kernels}")
        _require(all(c > 0 for c in self.channels), f"model.channels must be positive, got {self.channels}")
        _require(all(k > 0 for k in self.kernels), f"model.kernels must be positive, got {self.kernels}")
        _require(self.embedding_dim > 0, f"model.embedding_dim must be positive, got {self.embedding_dim}")
        _require(isinstance(self.batch_norm, bool), f"model.batch_norm must be true or false, got {self.batch_norm!r}")
        _require(isinstance(self.test_time_shift_px, int) and 0 <= self.test_time_shift_px < self.input_size // 2,
                 f"model.test_time_shift_px must be an integer in [0, {self.input_size // 2}) "
                 f"(0 turns test-time views off), got {self.test_time_shift_px!r}")
        _require(self.test_time_views in TEST_TIME_VIEWS,
                 f"model.test_time_views must be one of {TEST_TIME_VIEWS}, got {self.test_time_views!r}")
        _require(self.init in INIT_SCHEMES, f"model.init must be one of {INIT_SCHEMES}, got {self.init!r}")
        _require(self.feature_map_size() >= 1,
                 f"model.input_size={self.input_size} is too small for kernels {self.kernels}")

    @staticmethod
    def from_dict(values: Mapping[str, Any]) -> "ModelConfig":
        """A ModelConfig from ``dataclasses.asdict`` output (a checkpoint's or a registered model's)."""
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"model config has unknown keys {unknown}; known: {sorted(known)}")
        return ModelConfig(**values)

    @property
    def in_channels(self) -> int:
        """Channels the first convolution takes (1 gray, 3 rgb)."""
        return self.preprocess.channels

    def feature_map_size(self) -> int:
        """Side of the last convolution's output (6 for the paper's 105x105 input)."""
        size = self.input_size
        for i, k in enumerate(self.kernels):
            size = size - k + 1
            if i < 3:
                size //= 2
        return size

    @staticmethod
    def from_preset(name: str, **overrides: Any) -> "ModelConfig":
        """The named preset, with any field overridden."""
        if name not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
        return dataclasses.replace(MODEL_PRESETS[name], **overrides)


MODEL_PRESETS: dict[str, ModelConfig] = {
    # Koch et al. 2015, exactly: 38,951,745 parameters at 105x105.
    "koch": ModelConfig(preset="koch"),
    # Same design, small enough to train in minutes on 2 CPU cores: 35x35 input
    # (105 / 3), a quarter of the channels, 2x2x64 = 256 features, 83,233
    # parameters (speeds: benchmarks/bench_model_presets.py).
    # init="kaiming": the paper's stds saturate ~2/3 of this net's sigmoid units and make
    # all embeddings nearly equal, so early learning is slow (model.init_kaiming_weights).
    "cpu-small": ModelConfig(preset="cpu-small", input_size=35, channels=(16, 32, 32, 64),
                             kernels=(3, 3, 2, 2), embedding_dim=256, init="kaiming"),
    # cpu-small at 1.5x the channels and embedding (186,673 parameters, ~1.5x the time per
    # pair): the CPU demo's net, about a point higher than cpu-small on validation in the
    # demo's budget (benchmarks/RESULTS.md).
    "cpu-medium": ModelConfig(preset="cpu-medium", input_size=35, channels=(24, 48, 48, 96),
                              kernels=(3, 3, 2, 2), embedding_dim=384, init="kaiming"),
}


def _per_layer(name: str, values: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(values) - set(LAYER_NAMES))
    _require(not unknown, f"optim.{name} has unknown layers {unknown}; layers are {list(LAYER_NAMES)}")
    return {k: float(v) for k, v in values.items()}


@dataclass(frozen=True)
class OptimizerConfig:
    """The paper's layer-wise SGD: per-layer rate, momentum ramp, L2 and decay.

    Each per-layer value is ``default * multiplier`` (learning rate) or an
    explicit override (momentum, L2); missing layers use the scalar default, so
    Tune can search either a base rate or each layer independently.
    """

    lr: float = 0.01
    lr_multipliers: Mapping[str, float] = field(default_factory=dict)
    momentum_start: float = 0.5
    momentum: float = 0.9
    momentum_per_layer: Mapping[str, float] = field(default_factory=dict)
    momentum_ramp_epochs: int = 10
    weight_decay: float = 2e-4
    weight_decay_per_layer: Mapping[str, float] = field(default_factory=dict)
    lr_decay: float = 0.99
    algorithm: str = "sgd"
    """"sgd" (the paper's, with the momentum ramp) or "adam" (per-layer rates, L2 and decay
    kept; the momentum settings do not apply)."""
    ema_decay: float | None = None
    """Validate, select and ship an exponential moving average of the weights, updated after
    every step with this decay, warmed up over the first steps (it averages over about
    ``1 / (1 - ema_decay)`` steps once the run is long; :class:`siamese_core.optim.WeightAverage`);
    None uses the weights as trained. The average settles what a short run's rate leaves noisy."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_multipliers", _per_layer("lr_multipliers", self.lr_multipliers))
        object.__setattr__(self, "momentum_per_layer", _per_layer("momentum_per_layer", self.momentum_per_layer))
        object.__setattr__(self, "weight_decay_per_layer",
                           _per_layer("weight_decay_per_layer", self.weight_decay_per_layer))
        _require(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        _require(all(m > 0 for m in self.lr_multipliers.values()), "optim.lr_multipliers must be positive")
        for name, value in [("momentum_start", self.momentum_start), ("momentum", self.momentum),
                            *[(f"momentum_per_layer.{k}", v) for k, v in self.momentum_per_layer.items()]]:
            _require(0.0 <= value < 1.0, f"optim.{name} must be in [0, 1), got {value}")
        for name, value in [("weight_decay", self.weight_decay),
                            *[(f"weight_decay_per_layer.{k}", v) for k, v in self.weight_decay_per_layer.items()]]:
            _require(value >= 0.0, f"optim.{name} must be >= 0, got {value}")
        _require(self.momentum_ramp_epochs >= 1, "optim.momentum_ramp_epochs must be >= 1")
        _require(0.0 < self.lr_decay <= 1.0, f"optim.lr_decay must be in (0, 1], got {self.lr_decay}")
        _require(self.algorithm in OPTIMIZERS, f"optim.algorithm must be one of {OPTIMIZERS}, got {self.algorithm!r}")
        _require(self.ema_decay is None or 0.0 < self.ema_decay < 1.0,
                 f"optim.ema_decay must be in (0, 1) or none, got {self.ema_decay}")

    def layer_lr(self, layer: str) -> float:
        return self.lr * self.lr_multipliers.get(layer, 1.0)

    def layer_momentum(self, layer: str) -> float:
        return self.momentum_per_layer.get(layer, self.momentum)

    def layer_weight_decay(self, layer: str) -> float:
        return self.weight_decay_per_layer.get(layer, self.weight_decay)


@dataclass(frozen=True)
class DistortionConfig:
    """The paper's affine distortions; each component applies with ``probability``."""

    rotation_deg: float = 10.0
    shear: float = 0.3
    scale_min: float = 0.8
    scale_max: float = 1.2
    translate_px: float = 2.0
    probability: float = 0.5

    def __post_init__(self) -> None:
        _require(0.0 <= self.rotation_deg <= 180.0, f"distort.rotation_deg must be in [0, 180], got {self.rotation_deg}")
        _require(0.0 <= self.shear < 1.0, f"distort.shear must be in [0, 1), got {self.shear}")
        _require(0.0 < self.scale_min <= 1.0 <= self.scale_max,
                 f"distort scale range must satisfy 0 < scale_min <= 1 <= scale_max, got "
                 f"[{self.scale_min}, {self.scale_max}]")
        _require(self.translate_px >= 0.0, f"distort.translate_px must be >= 0, got {self.translate_px}")
        _require(0.0 <= self.probability <= 1.0, f"distort.probability must be in [0, 1], got {self.probability}")


NEW_CLASSES: dict[str, int] = {"unchanged": 1, "rot90": 4, "dihedral": 8}
"""``pairs.new_classes``: how many classes each of the data's classes becomes."""


@dataclass(frozen=True)
class PairConfig:
    """Same/different pair sampling, as in the paper's 30k/90k/150k sets."""

    pairs_per_epoch: int = 30_000
    distorted_copies: int = 8
    same_fraction: float = 0.5
    sources: tuple[str, ...] = ()
    """Sources (a data set's ``source`` column: Omniglot's drawers, cameras, sessions) whose
    images may be used for training pairs; empty: all. Koch used 12 of Omniglot's 20 drawers."""
    new_classes: str | None = None
    """Training classes made from the data's own: "rot90" trains each class turned by 90, 180 and
    270 degrees as three more classes, "dihedral" adds the mirror images too (8 per class),
    "unchanged" trains the classes as they are; none given takes the data set's word (its manifest's
    ``new_classes``: Omniglot's is "rot90", other data's "unchanged" unless ingested with
    ``--new-classes``). Each pair gets one turn for both images (``train_step.new_class_views``).
    Only for classes a turn or a mirror changes (characters, symbols), never a whale or a lion.
    Why: more classes to tell apart, for a model that runs out of new things to learn in its budget."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(str(s) for s in self.sources))
        _require(self.new_classes is None or self.new_classes in NEW_CLASSES,
                 f"pairs.new_classes must be one of {sorted(NEW_CLASSES)} (or none given: the data set's), "
                 f"got {self.new_classes!r}")
        _require(self.pairs_per_epoch >= 2, f"pairs.pairs_per_epoch must be >= 2, got {self.pairs_per_epoch}")
        _require(self.distorted_copies >= 0, f"pairs.distorted_copies must be >= 0, got {self.distorted_copies}")
        _require(0.0 < self.same_fraction < 1.0, f"pairs.same_fraction must be in (0, 1), got {self.same_fraction}")
        _require(len(self.sources) != 1, "pairs.sources needs at least 2 sources to form 'same' pairs across "
                                         "them (or none: every source)")

    def resolved(self, data_new_classes: str) -> "PairConfig":
        """``new_classes`` filled in from the data set's word where it is left open."""
        return dataclasses.replace(self, new_classes=self.new_classes or data_new_classes)

    @property
    def classes_per_class(self) -> int:
        """How many training classes each of the data's classes becomes (1 when none are made)."""
        return NEW_CLASSES[self.new_classes or "unchanged"]


@dataclass(frozen=True)
class OneShotConfig:
    """N-way K-shot episodes within one group (Lake's protocol: 20-way 1-shot, 2 runs per alphabet).

    A data set without groups is one group: its runs draw from every class of the split.
    """

    n_way: int = 20
    runs_per_group: int = 2
    queries_per_run: int | None = None
    """Queries per run (default ``n_way``, one per class). Koch's 320 validation trials over 10
    alphabets are 20-way runs with 16 queries each: ``VALIDATION_ONESHOT``."""
    k_shot: int = 1
    """Support images per class; a query's score for a class is its best-matching support image."""

    def __post_init__(self) -> None:
        _require(self.n_way >= 2, f"oneshot.n_way must be >= 2, got {self.n_way}")
        _require(self.k_shot >= 1, f"oneshot.k_shot must be >= 1, got {self.k_shot}")
        _require(self.queries_per_run is None or 1 <= self.queries_per_run <= self.n_way,
                 f"oneshot.queries_per_run must be in [1, n_way={self.n_way}], got {self.queries_per_run}")
        _require(self.runs_per_group >= 1, f"oneshot.runs_per_group must be >= 1, got {self.runs_per_group}")


TEST_ONESHOT = OneShotConfig()
"""Lake's protocol on the 10 test alphabets: 20-way, 2 runs each, 400 trials."""

VALIDATION_ONESHOT = OneShotConfig(queries_per_run=16)
"""Koch's 320 validation trials: 10 alphabets x 2 runs x 16 queries, still 20-way."""


@dataclass(frozen=True)
class EvaluationConfig:
    """The one-shot episodes that select epochs (validation) and report a model (test).

    The defaults are Lake's and Koch's on Omniglot and adapt to other data: ``n_way`` None
    takes 20, or fewer when a group of the evaluated split has fewer classes with a query;
    ``runs_per_group`` None takes 2 runs per group where there are groups (400 test trials
    over Omniglot's 10 test alphabets), and 20 runs over the whole split where there are none.
    """

    n_way: int | None = None
    k_shot: int = 1
    runs_per_group: int | None = None
    validation_queries_per_run: int | None = 16
    """Koch's 320 validation trials are 10 alphabets x 2 runs x 16 queries (None: ``n_way``)."""
    validation_runs_multiplier: int = 1
    """The validation trials that select the epoch draw this many times the runs of ``runs_per_group``.
    Why: one epoch's score on Koch's 320 trials moves by about 2 points by chance, so a lucky
    early epoch can be kept over better later ones; more runs cost only their embeddings, once an
    epoch. The test trials keep ``runs_per_group``."""
    reid: bool | None = None
    """Also score re-identification (``siamese_core.reid``: queries ranked against a gallery, MAP@5, a
    threshold for new individuals chosen on validation). None: where the data set has no groups,
    as for individual animals; Omniglot's task is one-shot within an alphabet."""
    reid_new_share: float = 0.2
    """The share of a split's classes held out of its gallery as new individuals (seeded)."""

    def reid_enabled(self, has_groups: bool) -> bool:
        return (not has_groups) if self.reid is None else self.reid

    def __post_init__(self) -> None:
        _require(0.0 <= self.reid_new_share < 1.0,
                 f"evaluation.reid_new_share must be in [0, 1), got {self.reid_new_share}")
        _require(self.n_way is None or self.n_way >= 2, f"evaluation.n_way must be >= 2, got {self.n_way}")
        _require(self.k_shot >= 1, f"evaluation.k_shot must be >= 1, got {self.k_shot}")
        _require(self.runs_per_group is None or self.runs_per_group >= 1,
                 f"evaluation.runs_per_group must be >= 1, got {self.runs_per_group}")
        _require(self.validation_runs_multiplier >= 1,
                 f"evaluation.validation_runs_multiplier must be >= 1, got {self.validation_runs_multiplier}")
        _require(self.validation_queries_per_run is None or self.validation_queries_per_run >= 1,
                 f"evaluation.validation_queries_per_run must be >= 1, got {self.validation_queries_per_run}")

    def episodes(self, has_groups: bool, max_n_way: int, validation: bool) -> OneShotConfig:
        """The :class:`OneShotConfig` for a split whose groups allow at most ``max_n_way`` classes."""
        if self.n_way is not None and self.n_way > max_n_way:
            raise ConfigError(f"evaluation.n_way={self.n_way} but a group of this split has only {max_n_way} "
                              "classes with images enough for a support and a query; lower evaluation.n_way")
        if max_n_way < 2:
            raise ConfigError(f"this split has {max_n_way} class(es) with images enough for a support and a "
                              "query: one-shot episodes need at least 2; give it more classes")
        n_way = self.n_way or min(20, max_n_way)
        runs = self.runs_per_group or (2 if has_groups else 20)
        runs *= self.validation_runs_multiplier if validation else 1
        queries = self.validation_queries_per_run if validation else None
        return OneShotConfig(n_way=n_way, runs_per_group=runs, k_shot=self.k_shot,
                             queries_per_run=None if queries is None else min(queries, n_way))


def apply_overrides(config: Any, overrides: Mapping[str, Any], _prefix: str = "") -> Any:
    """Return ``config`` with dotted keys (``"optim.lr"``) replaced; unknown keys fail.

    Values are coerced to the annotated type of the field they replace, so
    strings from a command line (``"0.01"``, ``"64,128,128,256"``, ``"none"``) work.
    """
    grouped: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(type(config))
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in names:
            where = f" in section {_prefix.rstrip('.')!r}" if _prefix else ""
            raise ConfigError(f"unknown config key {_prefix + key!r}; known keys{where}: {sorted(names)}")
        if rest:
            grouped.setdefault(head, {})[rest] = value
        else:
            direct[head] = _coerce(hints[head], value, _prefix + key)
    for head, sub in grouped.items():
        current = getattr(config, head)
        if dataclasses.is_dataclass(current):
            direct[head] = apply_overrides(current, sub, f"{_prefix}{head}.")
        elif isinstance(current, Mapping):
            direct[head] = {**current, **{k: _coerce(float, v, f"{_prefix}{head}.{k}") for k, v in sub.items()}}
        else:
            raise ConfigError(f"config key {_prefix + head!r} has no sub-keys (got {sorted(sub)})")
    return dataclasses.replace(config, **direct)


def _coerce(kind: Any, value: Any, key: str) -> Any:
    """``value`` (often a command-line string) as the annotated type ``kind``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null", ""}):
            if type(None) in args:
                return None
        kinds = [a for a in args if a is not type(None)]
        return _coerce(kinds[0], value, key) if len(kinds) == 1 else value
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ValueError(value)
                return value.lower() in {"true", "1", "yes"}
            return bool(value)
        if kind in (int, float):
            if isinstance(value, bool):
                raise ValueError(value)
            number = kind(value)
            if kind is int and isinstance(value, float) and number != value:
                raise ValueError(value)
            return number
        if kind is str:
            return str(value)
        if origin is tuple:
            item = args[0] if args else float
            if isinstance(value, str) and value.strip() in ("[]", "()"):
                return ()
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(_coerce(item, v.strip() if isinstance(v, str) else v, key)
                         for v in items if not (isinstance(v, str) and not v.strip()))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key {key!r}: cannot read {value!r} as {kind}") from exc
    if isinstance(value, str) and dataclasses.is_dataclass(kind):
        raise ConfigError(f"config key {key!r} is a section; set its keys, e.g. {key}.<name>=...")
    return value


@dataclass(frozen=True)
class TrainingConfig:
    """How long and how one run trains (the paper: at most 200 epochs, patience 20, batch 128)."""

    epochs: int = 200
    patience: int = 20
    batch_size: int = 128
    seed: int = 0
    time_budget_s: float | None = None
    """Wall-clock budget for training and per-epoch validation; no epoch starts that would overrun it."""
    negatives: str = "same_group"
    """'same_group' ("different" pairs within a group, like the paper's within-alphabet pairs;
    every class is a candidate where the data has no groups) or 'any'."""
    fan_in_scaled: bool = True
    """Scale the paper's init stds by fan-in (see ``model.init_paper_weights``)."""
    threads: int | None = None
    """``torch.set_num_threads`` for CPU runs. None fits the machine: a Ray Train worker takes
    its node's cores shared among the node's workers, a plain process torch's default (its cores)."""
    keep_freed_memory: bool = True
    """Fix glibc's malloc thresholds in the training process (``siamese_core.heap``) so the
    memory a step frees stays mapped for the next. Why: with glibc's adaptive defaults a Ray
    Train worker faults each step's memory back in and spends a large share of its CPU in the
    kernel (``bench_pipeline.py --alternate [--glibc-malloc]`` measures both; figures in
    benchmarks/RESULTS.md). False leaves the defaults, which hand a process's peak heap back
    to the OS."""
    in_batch_negatives: float = 0.0
    """Weight of the extra loss term on every other pairing of a batch's images, labelled
    "different" (``train_step.in_batch_negative_pairings``); 0 is the paper's loss."""
    in_batch_hardest: float = 1.0
    """Share of those pairings the term trains: the hardest (highest loss) in each batch; 1.0 all.
    Why: after a few epochs nearly all random "different" pairings are easy, and a mean over
    them carries little signal; the hardest are mined in the batch at no extra embedding."""
    in_batch_hardest_epochs: int = 0
    """Epochs over which that share falls linearly from 1.0 (all pairings) to ``in_batch_hardest``;
    0 starts at the share. Why: from random weights, the hardest pairings alone can drive a net
    to one constant output on a hard data set (the lions did, at 0.25 from the first step)."""
    compile: bool = False
    """``torch.compile`` the network for training (GPU: fewer kernel launches; its first steps compile)."""
    validation_views: str = "model"
    """Views of the per-epoch validation one-shot trials that early stopping and model
    selection read: "model" (the model's test-time views) or "single" (one view per image,
    as in the paper). Why "single": selection only needs to rank epochs, and scoring every
    epoch with the demo's 13 views costs a large share of each CPU epoch (benchmarks/RESULTS.md);
    the final scores always use the model's views."""

    def __post_init__(self) -> None:
        _require(self.in_batch_negatives >= 0,
                 f"training.in_batch_negatives must be >= 0 (0 turns it off), got {self.in_batch_negatives}")
        _require(0.0 < self.in_batch_hardest <= 1.0,
                 f"training.in_batch_hardest must be in (0, 1], got {self.in_batch_hardest}")
        _require(self.in_batch_hardest_epochs >= 0,
                 f"training.in_batch_hardest_epochs must be >= 0, got {self.in_batch_hardest_epochs}")
        _require(self.epochs >= 1, f"training.epochs must be >= 1, got {self.epochs}")
        _require(self.patience >= 1, f"training.patience must be >= 1, got {self.patience}")
        _require(self.batch_size >= 1, f"training.batch_size must be >= 1, got {self.batch_size}")
        _require(self.time_budget_s is None or self.time_budget_s > 0,
                 f"training.time_budget_s must be positive, got {self.time_budget_s}")
        _require(self.negatives in NEGATIVES,
                 f"training.negatives must be one of {NEGATIVES}, got {self.negatives!r}")
        _require(self.validation_views in VALIDATION_VIEWS,
                 f"training.validation_views must be one of {VALIDATION_VIEWS}, got {self.validation_views!r}")
        _require(self.threads is None or self.threads >= 1, f"training.threads must be >= 1, got {self.threads}")

    def in_batch_share(self, epoch: int) -> float:
        """The share of the in-batch pairings trained in 0-based ``epoch``."""
        ramp = min(1.0, epoch / self.in_batch_hardest_epochs) if self.in_batch_hardest_epochs else 1.0
        return 1.0 - (1.0 - self.in_batch_hardest) * ramp


MINING_POLICIES: tuple[str, ...] = ("random", "mined")
"""Where training pairs come from (``MiningConfig.policy``)."""


@dataclass(frozen=True)
class MiningConfig:
    """Hard pairs: every ``every`` epochs the model scores each group's images and a linear assignment
    (with annealed noise) gives each image a hard "different" partner (``siamese_core.mining``).

    ``policy="random"`` is the paper's random pairs. With "mined", ``share`` of each group's pairs
    per epoch come from the latest assignment (half "same": a derangement of each class's images),
    the rest stay random. The noise scale goes from ``noise_start`` to ``noise_end`` over
    ``noise_epochs`` epochs from ``first_epoch`` (``noise_shape`` "linear" or "exponential");
    ``exclude_used`` never serves a mined "different" pair twice.
    """

    policy: str = "random"
    every: int = 2
    first_epoch: int = 1
    share: float = 0.5
    noise_start: float = 2.0
    noise_end: float = 0.1
    noise_epochs: int = 30
    noise_shape: str = "linear"
    exclude_used: bool = True
    block_size: int = 2048
    """Images per assignment problem: a larger group is solved in seeded random blocks of this size."""

    def __post_init__(self) -> None:
        _require(self.policy in MINING_POLICIES, f"mining.policy must be one of {MINING_POLICIES}, got {self.policy!r}")
        _require(self.every >= 1, f"mining.every must be >= 1, got {self.every}")
        _require(self.first_epoch >= 0, f"mining.first_epoch must be >= 0, got {self.first_epoch}")
        _require(0.0 < self.share <= 1.0, f"mining.share must be in (0, 1], got {self.share}")
        _require(self.noise_start >= 0 and self.noise_end >= 0, "mining.noise_start and noise_end must be >= 0")
        _require(self.noise_epochs >= 1, f"mining.noise_epochs must be >= 1, got {self.noise_epochs}")
        _require(self.noise_shape in ("linear", "exponential"),
                 f"mining.noise_shape must be 'linear' or 'exponential', got {self.noise_shape!r}")
        _require(self.noise_shape == "linear" or (self.noise_start > 0 and self.noise_end > 0),
                 "an exponential mining noise schedule needs noise_start > 0 and noise_end > 0")
        _require(self.block_size >= 2, f"mining.block_size must be >= 2, got {self.block_size}")

    @property
    def enabled(self) -> bool:
        return self.policy == "mined"

    def mines_at(self, epoch: int) -> bool:
        """True for the epochs that start with a new assignment."""
        return self.enabled and epoch >= self.first_epoch and (epoch - self.first_epoch) % self.every == 0


@dataclass(frozen=True)
class TrainingRecipe:
    """Everything one training run needs besides data: model, optimizer, pairs, distortions, loop."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    distort: DistortionConfig = field(default_factory=DistortionConfig)
    pairs: PairConfig = field(default_factory=PairConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)


DEMO_DEFAULTS = TrainingRecipe(
    model=dataclasses.replace(MODEL_PRESETS["cpu-medium"], test_time_shift_px=3),
    optim=OptimizerConfig(lr=0.08, lr_multipliers={"fc": 3.0, "head": 3.0}, momentum=0.75,
                          momentum_ramp_epochs=5, weight_decay=2e-4, lr_decay=0.96, ema_decay=0.9995),
    distort=DistortionConfig(),
    pairs=PairConfig(pairs_per_epoch=10_000, distorted_copies=0),
    training=TrainingConfig(epochs=200, patience=40, batch_size=32, seed=0, time_budget_s=480.0,
                            in_batch_negatives=1.0, in_batch_hardest=0.25, in_batch_hardest_epochs=4,
                            validation_views="single"),
    evaluation=EvaluationConfig(validation_runs_multiplier=4),
)
"""The CPU demo's recipe: what trains best in 480 s on 2 cores, chosen on validation only.

Why each value (the measurements are in benchmarks/RESULTS.md, "Choosing the CPU demo recipe"
and the sections after it): a small net (cpu-medium) at 35 px, because the paper's net gets a
few hundred SGD steps in that time; batch 32, for 4x the steps of batch 128 on the same pairs;
fresh undistorted pairs from every source instead of distorted copies, with lr x3 on fc and
head; momentum 0.75, because every rate tried turned unstable with momentum ramping to 0.9;
lr 0.08 and decay 0.96, slow enough that the net still learns at the end of the budget from
the data set's new classes (``pairs.new_classes``: Omniglot's characters turned); a moving
average of the weights over about 2,000 steps (6 epochs), which settles what that rate leaves
noisy; in-batch negatives, for more training signal per image embedded, of which only the
hardest quarter is trained, since the rest are easy, reached over 4 epochs, since from random
weights the hardest alone can stall a net at one output (the lions' did); test-time views,
which the small net needs at 35 px; selection on one view, since it only ranks epochs, and on
4x Koch's runs (1,280 trials), since on 320 a lucky early epoch can win; patience 40, because
an epoch here is 10,000 pairs against the paper's 270,000 rows.
"""

PAPER_RECIPE = TrainingRecipe(model=MODEL_PRESETS["koch"],
                              pairs=PairConfig(sources=tuple(f"{d:02d}" for d in range(1, 13)),
                                               new_classes="unchanged"))
"""Koch's network, schedule and pairs: 12 of Omniglot's 20 drawers (sources), 8 distorted copies,
the classes as they are."""

PAPER_GPU_RECIPE = TrainingRecipe(
    model=MODEL_PRESETS["koch"],
    optim=OptimizerConfig(lr=0.02, lr_multipliers={"fc": 3.0, "head": 3.0}, momentum=0.9, momentum_ramp_epochs=5,
                          weight_decay=2e-4, lr_decay=0.97),
    pairs=PairConfig(pairs_per_epoch=30_000, distorted_copies=3),
    training=TrainingConfig(epochs=200, patience=20, batch_size=256, seed=0, time_budget_s=480.0,
                            in_batch_negatives=1.0, validation_views="single"),
)
"""The paper's network and method for one GPU in 8 minutes: Koch's twin net, weighted-L1 head and
cross-entropy on distorted pairs, with the CPU demo's lessons (a larger batch of fresh pairs from
every source, faster fc and head, in-batch negatives). ``benchmarks/gpu_paper.py`` trains and scores
it; its measured figures, when a GPU was at hand, are in benchmarks/RESULTS.md."""

RECIPES: dict[str, TrainingRecipe] = {
    "demo": DEMO_DEFAULTS,
    "paper": PAPER_RECIPE,
    "paper-gpu": PAPER_GPU_RECIPE,
}
"""Named starting points: the CPU demo and the paper's network and schedule."""
