"""The benchmarks run and print their figures: the GPU benchmark's CPU smoke mode (no Ray, no GPU needed), the layout comparison."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_quick_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--device", "cpu", "--quick",
         "--threads", "1", "--source", "synthetic", "--json", str(out)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    steps = [l for l in lines if l.startswith("step ")]
    assert {tuple(l.split(":")[0].split()[1:]) for l in steps} == {
        ("fp32", "contiguous"), ("fp32", "channels_last"), ("bf16", "contiguous"), ("bf16", "channels_last")}
    for line in steps:
        assert re.fullmatch(r"step (fp32|bf16) (contiguous|channels_last): \d+ pairs/s \([\d.]+ ms/step\)", line)
    assert any(re.match(r"data: \d+ pairs/s per core \(\d+ training pairs/s per core with 8 copies\)", l)
               for l in lines), proc.stdout
    assert any(re.match(r"feed: best step \S+ \S+ \d+ pairs/s needs [\d.]+ CPU cores", l) for l in lines), proc.stdout
    figures = json.loads(out.read_text())
    assert figures["preset"] == "cpu-small" and len(figures["steps"]) == 4
    assert figures["data"]["pairs"] > 0 and figures["cores_needed"] > 0


def test_gpu_bench_imports_no_ray() -> None:
    """It must run on a bare GPU machine: no Ray, MLflow or workflows imports."""
    code = ("import sys, runpy; sys.argv = ['gpu_bench.py', '--help']\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'workflows')]\n"
            "assert not bad, bad\n") % str(ROOT / "benchmarks" / "gpu_bench.py")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_gpu_session_script_parses_and_its_variants_are_valid_recipes() -> None:
    """A device lease is short: the prepared script must not fail on a typo in a variant."""
    from siamese_core.config import DEMO_DEFAULTS, apply_overrides

    script = ROOT / "benchmarks" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    listing = subprocess.run(
        ["bash", "-c", f'source <(sed -n "/^FIXED=/,/^if/p" {script}); echo "$FIXED"; '
                       'for v in "${VARIANTS[@]}" "${ADAM_VARIANTS[@]}"; do echo "$v"; done'],
        capture_output=True, text=True, check=True).stdout.splitlines()
    fixed, variants = listing[0], listing[1:]
    assert len(variants) >= 2 and variants[0].startswith("base|")
    for line in variants:
        tag, epochs, extra = line.split("|")
        overrides = dict(kv.split("=", 1) for kv in f"{fixed} training.epochs={epochs} {extra}".split())
        recipe = apply_overrides(DEMO_DEFAULTS, overrides)  # raises ConfigError on a bad key or value
        assert recipe.training.epochs == int(epochs), tag


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
    from cpu_demo_search import WIDE_VALIDATION, load
    from siamese_core.fit import VALIDATION_SEED, evaluate_oneshot, oneshot_trials

    torch.set_num_threads(1)
    val = load(omniglot_dir, "validation", 35, None)
    trials = oneshot_trials(val, WIDE_VALIDATION, VALIDATION_SEED)
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
