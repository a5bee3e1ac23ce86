"""Every command's conventions: one line for a user's mistake (no traceback), exit codes, --help."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from workflows import cli

COMMANDS = ("ingest", "train", "tune", "evaluate", "predict", "embed")
ROOT = Path(__file__).resolve().parents[1]


def _call(command: str, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = importlib.import_module(f"workflows.{command}").main(argv)
    err = capsys.readouterr().err
    return code, err


def _one_clear_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    assert err.strip().startswith("error:"), err
    for needle in needles:
        assert needle in err, (needle, err)


# --- the exit-code policy ----------------------------------------------------------


def test_an_input_error_before_work_is_2_and_after_work_started_is_1(capsys) -> None:
    from workflows.storage import StorageError

    def before() -> None:
        raise StorageError("bucket b does not exist: create it")

    def after() -> None:
        cli.started_work()
        raise StorageError("storage went away")

    assert cli.run(before) == cli.USAGE
    assert "error: bucket b does not exist: create it" in capsys.readouterr().err
    assert cli.run(after) == cli.FAILURE
    assert cli.run(before) == cli.USAGE  # each run starts before the work again


def test_bad_input_found_while_working_is_2_when_everything_was_undone(capsys) -> None:
    from workflows.ingest import BadInputError, IngestError

    def bad_images() -> None:
        cli.started_work()
        raise BadInputError("2 bad file(s); nothing was written")

    def write_failed() -> None:
        cli.started_work()
        raise IngestError("writing shards failed")

    assert cli.run(bad_images) == cli.USAGE
    assert cli.run(write_failed) == cli.FAILURE


def test_an_unexpected_error_is_one_line_and_its_traceback_goes_to_a_file(capsys) -> None:
    def bug() -> None:
        raise ZeroDivisionError("a bug")

    assert cli.run(bug) == cli.FAILURE
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: ZeroDivisionError: a bug" in err
    path = err.split("the traceback is in ")[1].split(";")[0]
    assert "ZeroDivisionError" in Path(path).read_text() and "Traceback" in Path(path).read_text()


def test_an_interrupt_is_130_and_the_command_can_say_what_it_kept(capsys) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    assert cli.run(interrupted) == cli.INTERRUPTED
    assert "interrupted" in capsys.readouterr().err
    assert cli.run(lambda: (_ for _ in ()).throw(RuntimeError("gave up")),
                   on_failure=lambda exc: "error: training failed; resume with the same --name") == cli.FAILURE
    assert "resume with the same --name" in capsys.readouterr().err


def test_a_users_error_inside_a_ray_task_is_shown_without_the_remote_traceback(capsys) -> None:
    from ray.exceptions import RayTaskError

    from workflows.shards import DatasetError

    def remote() -> None:
        try:
            raise DatasetError("shard train/0.parquet is missing: re-run workflows.ingest")
        except DatasetError as exc:
            raise RayTaskError("read_shard", "Traceback (most recent call last): ...", exc).as_instanceof_cause()

    assert cli.run(remote) == cli.USAGE
    err = capsys.readouterr().err
    assert err.strip() == "error: shard train/0.parquet is missing: re-run workflows.ingest"


def test_verbose_comes_from_the_flag_or_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
    cli.configure_console(False)
    assert not cli.verbose()
    monkeypatch.setenv(cli.VERBOSE_ENV, "1")
    assert cli.verbose()
    monkeypatch.delenv(cli.VERBOSE_ENV)
    cli.configure_console(True)
    assert cli.verbose()
    cli.configure_console(False)


def test_a_quiet_run_shows_ray_datas_progress_and_warnings_and_its_log_keeps_everything(monkeypatch) -> None:
    import logging

    import ray.data  # noqa: F401  (Ray Data sets up its logger's console and session-log handlers)

    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
    handlers = logging.getLogger("ray.data").handlers
    before = {h: list(h.filters) for h in handlers}
    try:
        cli.quiet_ray_data()
        console = [h for h in handlers if h.name == "console"]
        session_log = [h for h in handlers if h.name == "file"]
        assert console and session_log, [(h.name, type(h).__name__) for h in handlers]

        def record(name: str, level: int, message: str) -> logging.LogRecord:
            return logging.LogRecord(name, level, __file__, 1, message, None, None)

        info = record("ray.data._internal.execution.streaming_executor", logging.INFO, "Starting execution of Dataset")
        warning = record("ray.data.dataset", logging.WARNING, "a warning")
        progress = record("ray.data._internal.progress.logging_progress", logging.INFO, "MapBatches(Embedder): 3/8")
        for h in console:
            assert not h.filter(info) and h.filter(warning) and h.filter(progress)
        for h in session_log:
            assert h.filter(info) and h.filter(warning) and h.filter(progress)
    finally:
        for h, filters in before.items():
            h.filters[:] = filters


# --- help ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_help_gives_every_option_a_line_and_its_default(command: str) -> None:
    parser = importlib.import_module(f"workflows.{command}").build_parser()
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings} has no help line"
        takes_value = action.nargs != 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if takes_value and not action.required:
            assert "default" in action.help, f"{command} {action.option_strings} does not say its default"
    assert any("--verbose" in a.option_strings for a in parser._actions)


# --- each command's bad inputs ------------------------------------------------------


def test_ingest_bad_inputs(tmp_path, capsys) -> None:
    code, err = _call("ingest", ["--source", str(tmp_path / "nope"), "--dest", str(tmp_path / "out")], capsys)
    assert code == 2
    _one_clear_line(err, str(tmp_path / "nope"))
    with pytest.raises(SystemExit) as usage:
        _call("ingest", ["--source", str(tmp_path), "--split-fractions", "0.5,0.6,0.1"], capsys)
    assert usage.value.code == 2


def test_train_bad_inputs(tmp_path, capsys) -> None:
    code, err = _call("train", ["--data", str(tmp_path / "nope"), "--storage-path", str(tmp_path / "runs")], capsys)
    assert code == 2
    _one_clear_line(err, str(tmp_path / "nope"))
    code, err = _call("train", ["--set", "training.epochz=3"], capsys)
    assert code == 2
    _one_clear_line(err, "epochz")
    code, err = _call("train", ["--set", "training.batch_size=0"], capsys)
    assert code == 2
    _one_clear_line(err, "batch_size")


def test_tune_bad_inputs(tmp_path, capsys) -> None:
    code, err = _call("tune", ["--data", str(tmp_path / "nope"), "--storage-path", str(tmp_path / "runs")], capsys)
    assert code == 2
    _one_clear_line(err, str(tmp_path / "nope"))
    space = tmp_path / "space.yaml"
    space.write_text("optim.lrr: {loguniform: [0.001, 0.1]}\n")
    code, err = _call("tune", ["--space", str(space), "--data", str(tmp_path / "nope")], capsys)
    assert code == 2
    _one_clear_line(err, "lrr")


def test_evaluate_bad_inputs(tmp_path, capsys) -> None:
    code, err = _call("evaluate", ["--data", str(tmp_path / "nope"), "--no-mlflow"], capsys)
    assert code == 2
    _one_clear_line(err, str(tmp_path / "nope"))


@pytest.mark.integration
def test_evaluate_too_many_ways_is_a_clear_error(small_shards, capsys) -> None:
    code, err = _call("evaluate", ["--data", small_shards, "--n-way", "500", "--no-mlflow"], capsys)
    assert code == 2
    _one_clear_line(err, "n_way=500", "--n-way")


def test_predict_bad_inputs(tmp_path, capsys) -> None:
    (tmp_path / "query").mkdir()
    code, err = _call("predict", ["--model", str(tmp_path / "no-model"), "--support", str(tmp_path / "nope"),
                                  "--query", str(tmp_path / "query")], capsys)
    assert code == 2
    _one_clear_line(err, str(tmp_path / "nope"))


def test_predict_refuses_a_model_file_carrying_code(tmp_path, capsys) -> None:
    from PIL import Image
    from test_checkpoint import crafted_checkpoint

    marker = tmp_path / "pwned"
    crafted_checkpoint(tmp_path / "model", marker)
    for folder in ("support/a", "support/b", "query"):
        (tmp_path / folder).mkdir(parents=True)
        Image.new("RGB", (20, 20), (len(folder) * 9, 0, 0)).save(tmp_path / folder / "x.png")
    code, err = _call("predict", ["--model", str(tmp_path / "model"), "--support", str(tmp_path / "support"),
                                  "--query", str(tmp_path / "query")], capsys)
    assert code == 2
    _one_clear_line(err, "was not loaded")
    assert not marker.exists()


def test_embed_bad_inputs(tmp_path, capsys) -> None:
    code, err = _call("embed", ["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "nope"),
                                "--output", str(tmp_path / "gallery")], capsys)
    assert code == 2
    _one_clear_line(err)


def test_the_entrypoint_itself_prints_no_traceback(tmp_path) -> None:
    """``python -m`` runs the module as __main__: its errors must still be the ones cli knows."""
    done = subprocess.run([sys.executable, "-m", "workflows.evaluate", "--data", str(tmp_path / "nope"),
                           "--no-mlflow"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    _one_clear_line(done.stderr, str(tmp_path / "nope"))
