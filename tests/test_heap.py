"""siamese_core.heap: training steps stop page-faulting their freed memory back in."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Training steps in a thread other than the main one, as a Ray Train worker runs them;
# prints the minor page faults per step after a warm-up.
STEPS_SCRIPT = """
import json, resource, sys, threading
import torch
sys.path.insert(0, {root!r})
from siamese_core.config import MODEL_PRESETS, OptimizerConfig
from siamese_core.heap import keep_freed_memory
from siamese_core.model import SiameseNet
from siamese_core.optim import build_optimizer
from siamese_core.train_step import train_step

kept = keep_freed_memory() if sys.argv[1] == "kept" else None
torch.set_num_threads(2)
torch.manual_seed(0)
out = {{}}

def steps():
    model = SiameseNet(MODEL_PRESETS["cpu-medium"])
    optimizer = build_optimizer(model, OptimizerConfig(lr=0.01))
    g = torch.Generator().manual_seed(0)
    def batch():
        return ((torch.rand(32, 35, 35, generator=g) * 255).to(torch.uint8),
                (torch.rand(32, 35, 35, generator=g) * 255).to(torch.uint8),
                (torch.rand(32, generator=g) > 0.5).float())
    keys = (torch.arange(32), torch.arange(32, 64), torch.arange(32), torch.arange(32, 64))
    for _ in range(30):
        train_step(model, optimizer, *batch(), in_batch_negatives=1.0, keys=keys)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        train_step(model, optimizer, *batch(), in_batch_negatives=1.0, keys=keys)
    out["faults_per_step"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 40

worker = threading.Thread(target=steps)
worker.start()
worker.join()
print(json.dumps({{"kept": kept, **out}}))
"""


def faults_per_step(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", STEPS_SCRIPT.format(root=str(ROOT)), mode],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kept_heap_stops_steady_training_steps_from_page_faulting() -> None:
    assert platform.libc_ver()[0] == "glibc", "these machines run glibc; elsewhere keep_freed_memory returns False"
    default, kept = faults_per_step("default"), faults_per_step("kept")
    assert kept["kept"] is True
    # A step of this net allocates and frees several MB (256 pages each): with glibc's
    # defaults these runs faulted 1,500-5,400 pages back in per step, kept about 55 (the
    # heap still growing now and then).
    assert kept["faults_per_step"] < 250, (kept, default)
    print(f"minor page faults per steady step: glibc defaults {default['faults_per_step']:.0f}, "
          f"kept {kept['faults_per_step']:.1f}")
