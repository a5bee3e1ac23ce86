"""The benchmarks run and print their figures: the GPU benchmark's CPU smoke mode (no Ray, no GPU needed), the layout comparison."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from siamese_core.omniglot import OMNIGLOT_NEW_CLASSES

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_paper_runs_every_part_in_its_dry_run(omniglot_dir: Path, tmp_path: Path) -> None:
    """The prepared GPU check, scaled down on CPU: step, loop, feed, training with its time log, test once."""
    out = tmp_path / "gpu_paper.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_paper.py"), "--dry-run", "--device", "cpu",
         "--source", str(omniglot_dir), "--json", str(out), "--deadline-s", "200"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    steps = [l for l in lines if l.startswith("step ")]
    assert len(steps) == 3 and all(re.search(r": \d+ rows/s, [\d.]+ ms/step, [\d.]+ TFLOP/s", l) for l in steps)
    assert any(re.match(r"loop: \d+ rows in [\d.]+s = \d+ rows/s, [\d.]+ of its own step", l) for l in lines)
    assert any(re.match(r"feed: .* needs [\d.]+ cores of pair stage", l) for l in lines)
    [budget] = [float(m[1]) for l in lines if (m := re.match(r"train: budget (\d+)s \((\d+)s left of the 200s", l))]
    assert 0 < budget <= 20  # the recipe's budget, or what the deadline leaves
    figures = json.loads(out.read_text())
    assert figures["script_seconds"] < 200 + 30 and figures["train_seconds"] < budget + 15
    for key in ("device", "torch", "step_rows_per_s", "loop_rows_per_s", "mfu", "train_seconds",
                "val_oneshot_accuracy", "test_oneshot_accuracy", "recipe"):
        assert key in figures, key
    assert figures["recipe"] == "paper-gpu" and figures["dry_run"] is True
    assert figures["test_trials"] == 80 and 0.0 <= figures["test_oneshot_accuracy"] <= 1.0
    # the time-to-accuracy log: one point per epoch, in wall-clock order
    times = [t for t, _ in figures["time_to_accuracy"]]
    assert len(times) == figures["epochs"] >= 1 and times == sorted(times)
    # the FLOPs are counted from the layers: the koch network's are about 11 GFLOP per training row
    from siamese_core.config import MODEL_PRESETS
    from siamese_core.model import training_flops_per_pair

    assert 10.8e9 < training_flops_per_pair(MODEL_PRESETS["koch"]) < 11.0e9


def test_gpu_paper_imports_no_ray() -> None:
    """It must run on a bare GPU machine: no Ray, MLflow or workflows imports."""
    code = ("import sys, runpy; sys.argv = ['gpu_paper.py', '--help']\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'workflows', 'pyarrow')]\n"
            "assert not bad, bad\n") % str(ROOT / "benchmarks" / "gpu_paper.py")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.integration
def test_recipe_search_trains_and_scores_on_ingested_shards(small_shards: str, tmp_path: Path) -> None:
    results = tmp_path / "search.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "recipe_search.py"), "--data", small_shards, "--test",
         "--set", "training.epochs=1", "pairs.pairs_per_epoch=256", "training.threads=1", "--tag", "smoke",
         "--results", str(results)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["tag"] == "smoke" and row["epochs_run"] == 1 and row["test_trials"] == 80
    assert row["wide_trials"] == 2 * 8 * 20  # 2 validation alphabets x 8 runs x 20 queries
    assert 0.0 <= row["val_pixel_nn_wide"] <= 1.0 and 0.0 <= row["test_pixel_nn"] <= 1.0
    assert row["recipe"]["model"]["preprocess"]["invert"] is True  # the data set's preprocessing, resolved
    assert row["recipe"]["pairs"]["new_classes"] == OMNIGLOT_NEW_CLASSES  # ... and its new classes


def test_layout_comparison_prints_both_rates_and_their_ratio() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_model_presets.py"), "--compare-layouts",
         "--candidates", "cpu-small", "--batch", "8", "--steps", "2", "--rounds", "2", "--threads", "1",
         "--no-distort", "--in-batch-negatives", "1"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = [l for l in proc.stdout.splitlines() if l.startswith("cpu-small:")]
    m = re.fullmatch(r"cpu-small: contiguous (\d+) pairs/s, channels_last (\d+) pairs/s, ratio ([\d.]+)", line)
    assert m, proc.stdout
    assert float(m[3]) == pytest.approx(int(m[2]) / int(m[1]), abs=0.02)


def test_compare_views_scores_each_checkpoint_with_each_view_set(omniglot_dir: Path, tmp_path: Path) -> None:
    """A run folder stands for its best checkpoint; the figures match evaluate_oneshot on the same trials."""
    import torch

    from siamese_core import checkpoint
    from siamese_core.model import build_model, with_test_time_shift

    run = tmp_path / "run"
    nets = {}
    for name, epoch, seed in (("checkpoint_a", 3, 1), ("checkpoint_b", 5, 2)):  # b is the run's best epoch
        (run / name).mkdir(parents=True)
        nets[name] = with_test_time_shift(build_model("cpu-small", seed=seed), 3, "square")
        checkpoint.save(run / name, nets[name], epoch=epoch)
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": "checkpoint_a", "metrics": {"epoch": 3, "best_epoch": 5}},
        {"checkpoint_dir_name": "checkpoint_b", "metrics": {"epoch": 5, "best_epoch": 5}}]}))
    figures = tmp_path / "views.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare_views.py"), str(run), str(run / "checkpoint_a"),
         "--views", "cross:0", "square:1", "--source", str(omniglot_dir), "--threads", "1", "--json", str(figures)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 checkpoint(s), 1600 validation trials; cross:0 = 1 views, square:1 = 9 views" in proc.stdout
    table = json.loads(figures.read_text())["checkpoints"]
    assert list(table) == [str(run / "checkpoint_b"), str(run / "checkpoint_a")]
    assert any(line.startswith("square:1 - cross:0: mean ") for line in proc.stdout.splitlines())

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from recipe_search import load, wide_validation

    from siamese_core.config import TrainingRecipe
    from siamese_core.evaluation import VALIDATION_SEED, episodes, evaluate_oneshot

    torch.set_num_threads(1)
    recipe = TrainingRecipe(model=nets["checkpoint_b"].config)
    val, _ = load(None, omniglot_dir, "validation", recipe, None)
    trials = episodes(val, wide_validation(recipe.evaluation, True), VALIDATION_SEED, validation=False)
    assert sum(len(r.queries) for r in trials) == 1600
    best = nets["checkpoint_b"]
    assert table[str(run / "checkpoint_b")]["cross:0"] == evaluate_oneshot(with_test_time_shift(best, 0), val, trials).accuracy
    assert table[str(run / "checkpoint_b")]["square:1"] == evaluate_oneshot(with_test_time_shift(best, 1), val, trials).accuracy


MODE_FLAGS = {"interleaved": ["--interleave"], "alternating": ["--alternate"],
              "alternating-look-ahead": ["--alternate", "--look-ahead"], "overhead": []}


@pytest.mark.integration
@pytest.mark.parametrize("mode", sorted(MODE_FLAGS))
def test_pipeline_benchmark_reports_both_rates_and_their_ratio(mode: str, small_shards: str, ray_cluster,
                                                                tmp_path: Path) -> None:
    """bench_pipeline.py runs end to end on real shards (through the session's Ray, as a client)
    and its ratio is the pipeline's pairs/s over the plain loop's, as printed and as written."""
    import os

    figures = tmp_path / "pipeline.json"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_pipeline.py"), "--data", small_shards,
         "--preset", "cpu-small", "--pairs", "256", "--copies", "0", "--batch", "32", "--threads", "1",
         "--epochs", "2", "--json", str(figures), *MODE_FLAGS[mode]],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    written = json.loads(figures.read_text())
    assert written["keep_freed_memory"] is True  # the recipe's setting, on both sides
    result = written[mode.removesuffix("-look-ahead")]
    assert result["plain_pairs_per_s"] > 0 and result["pipeline_pairs_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["pipeline_pairs_per_s"] / result["plain_pairs_per_s"])
    for side in ("plain", "pipeline"):  # each process's own rusage, as shares and rates
        assert 0 <= result[f"{side}_kernel_share"] < 1 and result[f"{side}_faults_per_cpu_s"] >= 0
    if mode != "overhead":
        # epoch 1 of each side (epoch 0 is the warm-up): the same rows, whole batches of 32, at most 256
        [rows] = result["plain_rows"]
        assert result["pipeline_rows"] == [rows] and 0 < rows <= 256 and rows % 32 == 0
        for side in ("plain", "pipeline"):  # each side's process CPU per epoch, and by thread
            assert result[f"{side}_cpu_s_per_epoch"] > 0 and 0 < result[f"{side}_cores"]
            assert sum(result[f"{side}_threads_cpu_s_per_epoch"].values()) > 0
        if mode == "alternating-look-ahead":
            # epoch 1's pass ran during epoch 0 as in the job: queued before epoch 1 asked for it
            assert result["look_ahead"] is True and result["handover_wait_s_per_epoch"] >= 0
            assert result["start_wait_s_per_epoch"] < 0.1  # its chunks were queued: no start-up to wait for
            assert "its rest waited for at the epoch's end" in proc.stdout
        else:
            assert result["look_ahead"] is False
        m = re.search(r"pipeline epochs : +\d+ pairs/s, ratio ([\d.]+)", proc.stdout)
    else:
        m = re.search(r"ratio +: +([\d.]+) +\(target >= 0.95\)", proc.stdout)
        assert result["steady_ratio"] == pytest.approx(
            result["pipeline_steady_pairs_per_s"] / result["plain_steady_pairs_per_s"])
    assert m, proc.stdout[-3000:]
    assert float(m[1]) == pytest.approx(result["ratio"], abs=5e-4)
