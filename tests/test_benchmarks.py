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
