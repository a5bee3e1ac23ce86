"""The hyperparameter search space: one readable table, replaceable from a YAML file.

Each key is a job config key (``optim.lr``, ``distort.rotation_deg``, ...), so a
trial is the main job with those keys overridden, and the best trial's values
drop straight into a config file ``workflows.train`` reads. Each value is a
distribution written as a one-key mapping::

    optim.lr: {loguniform: [0.01, 0.3]}      # log-uniform between the bounds
    distort.probability: {uniform: [0.2, 0.8]}
    pairs.distorted_copies: {int: [0, 2]}     # integers, both bounds included
    optim.momentum: {choice: [0.75, 0.9]}
    training.batch_size: 32                   # a constant: fixed for every trial

``python -m workflows.tune --print-space`` prints the default below; a file
given with ``--space FILE`` replaces it entirely (copy the default and edit), and
``--space NAME`` picks a named space from :data:`SPACES` (``mining``: hard pairs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from siamese_core.config import ConfigError, apply_overrides

KINDS = ("loguniform", "uniform", "int", "choice")

DEFAULT_SPACE: dict[str, Any] = {
    # Learning rate: a base rate and multipliers for the layers that gained most from
    # their own rate in the CPU demo search (fc, head); conv layers use the base rate.
    "optim.lr": {"loguniform": [0.01, 0.3]},
    "optim.lr_multipliers.fc": {"loguniform": [0.5, 8.0]},
    "optim.lr_multipliers.head": {"loguniform": [0.5, 8.0]},
    # Final momentum (reached after optim.momentum_ramp_epochs) and L2.
    "optim.momentum": {"uniform": [0.5, 0.95]},
    "optim.weight_decay": {"loguniform": [1e-5, 1e-3]},
    # Affine distortions: the range of each component, how often each applies,
    # and how many distorted copies of each pair are trained on (0: none).
    "distort.rotation_deg": {"uniform": [0.0, 15.0]},
    "distort.shear": {"uniform": [0.0, 0.3]},
    "distort.scale_min": {"uniform": [0.8, 1.0]},
    "distort.scale_max": {"uniform": [1.0, 1.2]},
    "distort.translate_px": {"uniform": [0.0, 3.0]},
    "distort.probability": {"uniform": [0.2, 0.8]},
    "pairs.distorted_copies": {"int": [0, 2]},
    # Weight of the batch's other pairings trained as "different" (0: the paper's loss).
    "training.in_batch_negatives": {"uniform": [0.0, 2.0]},
    # Share of them trained: the hardest of each batch (1: all).
    "training.in_batch_hardest": {"uniform": [0.05, 1.0]},
}


MINING_SPACE: dict[str, Any] = {
    # Hard pairs (siamese_core.mining) on, with the rates they train at.
    "mining.policy": "mined",
    "optim.lr": {"loguniform": [0.01, 0.3]},
    "optim.momentum": {"uniform": [0.5, 0.95]},
    "mining.every": {"int": [1, 4]},
    "mining.share": {"uniform": [0.25, 1.0]},
    "mining.noise_start": {"loguniform": [0.3, 5.0]},
    "mining.noise_end": {"loguniform": [0.01, 0.5]},
    "mining.noise_epochs": {"int": [5, 60]},
    "mining.exclude_used": {"choice": [True, False]},
}

SPACES: dict[str, dict[str, Any]] = {"default": DEFAULT_SPACE, "mining": MINING_SPACE}
"""Named spaces for ``--space NAME``; any other value is a YAML file."""


def load(path: str | Path | None) -> dict[str, Any]:
    """The named space, or the space in ``path`` (YAML), or the default when nothing is given."""
    if path is None:
        return dict(DEFAULT_SPACE)
    if str(path) in SPACES:
        return dict(SPACES[str(path)])
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(f"{path}: a search space is a non-empty mapping of config keys to distributions")
    return dict(data)


def _spec(key: str, value: Any) -> tuple[str, list[Any]] | None:
    """``(kind, arguments)`` of a distribution, or None for a constant."""
    if not isinstance(value, Mapping):
        return None
    if len(value) != 1 or next(iter(value)) not in KINDS:
        raise ConfigError(f"search space key {key!r}: expected one of {list(KINDS)} "
                          f"(e.g. {{loguniform: [0.01, 0.3]}}), got {dict(value)!r}")
    kind, args = next(iter(value.items()))
    if not isinstance(args, (list, tuple)) or not args:
        raise ConfigError(f"search space key {key!r}: {kind} needs a list, got {args!r}")
    args = list(args)
    if kind != "choice":
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"search space key {key!r}: {kind} needs [low, high] numbers, got {args!r}")
        if not args[0] < args[1]:
            raise ConfigError(f"search space key {key!r}: low must be below high, got {args!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"search space key {key!r}: loguniform needs low > 0, got {args!r}")
        if kind == "int" and not all(float(a).is_integer() for a in args):
            raise ConfigError(f"search space key {key!r}: int needs integer bounds, got {args!r}")
    return kind, args


def validate(space: Mapping[str, Any], base: Any) -> None:
    """Every key is a config key and every bound is a value that config accepts.

    Each bound is applied to ``base`` (a JobConfig) on its own, so a typo or an
    impossible range fails here, before any cluster resource is requested.
    """
    for key, value in space.items():
        spec = _spec(key, value)
        candidates = [value] if spec is None else spec[1]
        for candidate in candidates:
            try:
                apply_overrides(base, {key: candidate})
            except ConfigError as exc:
                raise ConfigError(f"search space key {key!r} = {candidate!r}: {exc}") from None


def to_tune(space: Mapping[str, Any]) -> dict[str, Any]:
    """Ray Tune's ``param_space`` (flat, keyed by config key) for the space."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, value in space.items():
        spec = _spec(key, value)
        if spec is None:
            out[key] = value
            continue
        kind, args = spec
        if kind == "loguniform":
            out[key] = tune.loguniform(float(args[0]), float(args[1]))
        elif kind == "uniform":
            out[key] = tune.uniform(float(args[0]), float(args[1]))
        elif kind == "int":
            out[key] = tune.randint(int(args[0]), int(args[1]) + 1)
        else:
            out[key] = tune.choice(args)
    return out


def searched_keys(space: Mapping[str, Any]) -> list[str]:
    """Keys that vary between trials (not constants)."""
    return [k for k, v in space.items() if _spec(k, v) is not None]


def dump(space: Mapping[str, Any]) -> str:
    """The space as the YAML that ``load`` reads back."""
    import yaml

    return yaml.safe_dump({k: dict(v) if isinstance(v, Mapping) else v for k, v in space.items()},
                          sort_keys=False, default_flow_style=None)
