"""Find a trained network wherever a user points: a checkpoint folder (local or s3://) or MLflow.

``evaluate`` and ``predict`` accept the same ``--model`` values:

* ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/RUN_ID/model`` or a
  ``models:/m-...`` logged-model id: the model's ``model.pt`` is downloaded and
  loaded like a checkpoint (weights and config only; nothing is unpickled);
* a Ray Train checkpoint directory or a ``model.pt`` file, local or in object storage.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from siamese_core import checkpoint as ckpt_io
from siamese_core.config import ConfigError
from siamese_core.model import SiameseNet, with_test_time_shift

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


class ModelLoadError(Exception):
    """``--model`` names nothing loadable; the message says what was tried and what to give instead."""


def load_any(spec: str, endpoint_url: str | None = None, tracking_uri: str | None = None,
             test_time_shift_px: int | None = None, test_time_views: str | None = None) -> SiameseNet:
    """The network named by ``spec``, in eval mode on the CPU; :class:`ModelLoadError` if there is none.

    ``test_time_shift_px`` and ``test_time_views`` ("cross" or "square") replace the model's own
    test-time views (shift 0: the paper's single view; None: keep what the model was trained with).
    """
    try:
        net = _load(spec, endpoint_url, tracking_uri)
    except (OSError, ValueError, RuntimeError) as exc:  # StorageError is a RuntimeError
        raise ModelLoadError(f"cannot load --model {spec}: {exc}") from exc
    except Exception as exc:
        mlflow_exceptions = sys.modules.get("mlflow.exceptions")
        if mlflow_exceptions is not None and isinstance(exc, mlflow_exceptions.MlflowException):
            raise ModelLoadError(f"cannot load --model {spec} from MLflow: {exc}") from exc
        raise
    if test_time_shift_px is not None or test_time_views is not None:
        shift = net.config.test_time_shift_px if test_time_shift_px is None else test_time_shift_px
        try:
            net = with_test_time_shift(net, shift, test_time_views)
        except ConfigError as exc:
            raise ModelLoadError(f"--test-time-shift-px/--test-time-views: {exc}") from exc
    return net


def _load(spec: str, endpoint_url: str | None, tracking_uri: str | None) -> SiameseNet:
    if spec.startswith(MLFLOW_SCHEMES):
        return load_mlflow(spec, tracking_uri)
    if "://" in spec:
        return load_remote_checkpoint(spec, endpoint_url)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError("no such checkpoint folder or file; give a checkpoint "
                                "directory, a model.pt, or an MLflow URI such as models:/siamese-oneshot/1")
    return ckpt_io.load_model(path)


def load_mlflow(uri: str, tracking_uri: str | None = None) -> SiameseNet:
    """The network of a logged or registered model: its ``data/model.pt``, loaded with ``weights_only``."""
    import mlflow

    from workflows.tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    with tempfile.TemporaryDirectory() as directory:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=directory))
        found = sorted(local.rglob(ckpt_io.MODEL_FILE))
        if not found:
            raise FileNotFoundError(f"{uri} holds no {ckpt_io.MODEL_FILE}: it is not a siamese-oneshot model "
                                    "(logged by workflows.train)")
        return ckpt_io.load_model(found[0])


def load_remote_checkpoint(uri: str, endpoint_url: str | None = None) -> SiameseNet:
    """Copy ``model.pt`` out of object storage, then load it."""
    import pyarrow.fs as pafs

    from workflows import storage

    loc = storage.locate(uri, endpoint_url)
    storage.check_readable(loc.fs, loc.path, loc.uri)
    source = loc.path if loc.path.endswith(".pt") else storage.join(loc.path, ckpt_io.MODEL_FILE)
    if loc.fs.get_file_info(source).type != pafs.FileType.File:
        # e.g. the empty folder Ray Train leaves when the store vanished between creating it and the upload
        raise FileNotFoundError(f"no {ckpt_io.MODEL_FILE} there, so it is not a complete "
                                "siamese-oneshot checkpoint; give another checkpoint folder or an MLflow URI")
    with tempfile.TemporaryDirectory() as directory:
        target = Path(directory) / ckpt_io.MODEL_FILE
        target.write_bytes(storage.read_bytes(loc.fs, source))
        return ckpt_io.load_model(target)
