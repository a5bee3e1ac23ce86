"""The training display: one line per epoch, and a restart said once."""

from __future__ import annotations

import io
import time

from workflows.progress import EpochProgress


def _row(epoch: int, **extra: float) -> dict:
    return {"epoch": float(epoch), "train_loss": 0.5, "val_oneshot_accuracy": 0.6, "elapsed_seconds": 10.0 * (epoch + 1),
            "best_val_oneshot_accuracy": 0.6, "best_epoch": float(epoch), **extra}


def test_each_epoch_is_one_line_and_a_restore_is_said_once() -> None:
    out = io.StringIO()  # not a terminal: a line per epoch
    before = time.time() - 60.0
    display = EpochProgress(epochs=6, budget_s=100.0, stream=out)
    now = time.time()
    display.show(_row(0, restored_from_epoch=4.0, restored_at=before))  # an earlier process's restart: not news
    display.show(_row(0))  # polled again before the next epoch: nothing new
    display.show(_row(1))
    display.show(_row(2, restored_from_epoch=1.0, restored_at=now + 1))  # the workers came back from epoch 1's
    display.show(_row(3, restored_from_epoch=1.0, restored_at=now + 1))  # MLflow's latest value stays: not again
    display.show(_row(4, restored_from_epoch=3.0, restored_at=now + 5))  # a second restart
    display.show(_row(5, restored_from_epoch=3.0, restored_at=now + 9))  # a third, from the same checkpoint
    display.close()
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines if line.startswith("training: epoch")] == [
        f"training: epoch {e} ({e + 1}/6)" for e in range(6)]
    restarts = [line for line in lines if "restarted" in line]
    assert restarts == ["training: workers restarted from the checkpoint of epoch 1",
                        "training: workers restarted from the checkpoint of epoch 3",
                        "training: workers restarted from the checkpoint of epoch 3"]
    assert lines.index(restarts[0]) < lines.index(next(x for x in lines if x.startswith("training: epoch 2")))


def test_rows_without_validation_are_not_shown() -> None:
    out = io.StringIO()
    display = EpochProgress(epochs=3, budget_s=None, stream=out)
    display.show({"epoch": 0.0, "train_loss": 0.4})  # a partial row while MLflow is being written
    display.show({})
    assert out.getvalue() == ""
