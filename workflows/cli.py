"""How every command starts and ends: one console policy, one set of exit codes.

Exit codes: 0 done; 2 a usage, configuration or input error found before the work
started, or found while working by a check that then undid everything (an error with
``nothing_changed = True``, such as ingest's bad images): fix the input and re-run; 1 a
failure while working (storage lost, training failed: what was kept is said); 130 interrupted.

A user's mistake is one line that says what to fix, never a traceback. An error
nobody foresaw (a bug) gets one line too, and its traceback goes to a file that
the line names (``--verbose`` prints it).

The console is quiet by default: each command's own steps, its progress display and
its summary. ``--verbose`` or ``SIAMESE_VERBOSE=1`` brings back Ray's and MLflow's
logs; quiet or not, Ray keeps every process's log under its session directory
(``/tmp/ray/session_latest/logs`` on a local instance).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
import traceback
from typing import Callable

USAGE, FAILURE, INTERRUPTED = 2, 1, 130
VERBOSE_ENV = "SIAMESE_VERBOSE"

_state = {"verbose": False, "working": False}


def verbose() -> bool:
    """Whether this process shows the libraries' logs (``--verbose`` or ``SIAMESE_VERBOSE=1``)."""
    return _state["verbose"] or os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help=f"show Ray's and MLflow's own logs and tracebacks (or set {VERBOSE_ENV}=1)")


def started_work() -> None:
    """From here on, a failure is one at run time (exit 1), not an input error (exit 2)."""
    _state["working"] = True


def _input_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "fix this input": each module's own, raised with a message that says how."""
    from siamese_core.checkpoint import UnsafeCheckpointError
    from siamese_core.config import ConfigError
    from siamese_core.images import CorruptImageError
    from siamese_core.omniglot import OmniglotSourceError
    from workflows.download import DownloadError
    from workflows.embed import EmbedError
    from workflows.ingest import IngestError
    from workflows.models import ModelLoadError
    from workflows.predict import PredictError
    from workflows.shards import DatasetError
    from workflows.sources import SourceError
    from workflows.storage import StorageError

    return (ConfigError, CorruptImageError, UnsafeCheckpointError, OmniglotSourceError, DownloadError, EmbedError,
            IngestError, ModelLoadError, PredictError, DatasetError, SourceError, StorageError, FileNotFoundError,
            ConnectionError)


class _Quiet(logging.Filter):
    """Drops Ray's notice that a private local instance uses token authentication (not actionable here)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled" not in record.getMessage()


def configure_console(is_verbose: bool) -> None:
    _state["verbose"] = is_verbose
    if verbose():
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its loggers' level when imported
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per model download
    for name in ("mlflow", "alembic", "ray", "ray.data", "ray.train", "ray.tune", "urllib3", "botocore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for handler_owner in (logging.getLogger("ray"), logging.getLogger()):
        handler_owner.addFilter(_Quiet())
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_Quiet())


class _RayDataConsole(logging.Filter):
    """Ray Data's console lines in a quiet run: its warnings and, in a log file, a line per operator
    and update ("MapBatches(Embedder): 3/8"), not its plans, resources and INFO chatter."""

    PROGRESS = re.compile(r"^(Total Progress|[^\s:][^:]*): \d+/")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or (
            ".progress" in record.name and bool(self.PROGRESS.match(record.getMessage())))


def quiet_ray_data() -> None:
    """Call after ``import ray.data`` in a driver that executes Ray Data itself (``embed``).

    Ray Data configures its own ``ray.data`` logger when imported, with a console handler at
    INFO: plans, starts and sinks of every execution. Quiet runs keep its progress (bars on a
    terminal, a periodic summary in a file) and its warnings; the session's ray-data.log keeps all.
    """
    if verbose():
        return
    for handler in logging.getLogger("ray.data").handlers:
        # Streams only: Ray Data's session log handler is no FileHandler, and it keeps everything.
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_RayDataConsole())


def _unwrap(exc: BaseException) -> BaseException:
    """The user's error inside a Ray task's wrapper (its message would carry the remote traceback)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) and type(exc).__module__.startswith("ray") else exc


def _error_file(exc: BaseException) -> str:
    fd, path = tempfile.mkstemp(prefix="siamese-error-", suffix=".txt")
    with os.fdopen(fd, "w") as out:
        out.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return path


def run(body: Callable[[], int | None], on_failure: Callable[[BaseException], str | None] | None = None) -> int:
    """Run a command's body; map its outcome to an exit code and one line on stderr.

    ``on_failure`` may turn a run-time failure into the command's own message (what was
    kept, how to resume); returning None leaves the default.
    """
    _state["working"] = False
    try:
        code = body()
        return 0 if code is None else int(code)
    except KeyboardInterrupt:
        print("interrupted" + (": re-run the same command to resume" if _state["working"] else ""), file=sys.stderr)
        return INTERRUPTED
    except SystemExit:
        raise
    except BaseException as raw:  # noqa: BLE001 - the one place that turns errors into exit codes
        exc = _unwrap(raw)
        message = on_failure(exc) if on_failure is not None else None
        known = isinstance(exc, _input_errors())
        if message is None:
            message = f"error: {exc}" if known else f"error: {type(exc).__name__}: {exc}"
            if not known:
                message += f"\n(unexpected: the traceback is in {_error_file(raw)}; --verbose prints it)"
        print(message, file=sys.stderr)
        if verbose():
            traceback.print_exception(type(raw), raw, raw.__traceback__)
        found_in_input = known and (not _state["working"] or getattr(exc, "nothing_changed", False))
        return USAGE if found_in_input else FAILURE
