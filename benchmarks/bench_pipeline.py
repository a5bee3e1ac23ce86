"""Pipeline overhead and pair-stage memory: Ray Data + Ray Train vs a plain PyTorch loop.

Part 1 (overhead). The same model, batch size, torch threads, pairs per epoch
and distorted copies, trained side by side in one run:

* plain: a fresh process (beside the same Ray processes, but without the
  driver's Ray threads), the training split decoded once into memory (not
  timed), each epoch ``siamese_core.loop.TrainingLoop.train_epoch`` over
  ``MemoryPairs`` (what ``siamese_core.loop.fit`` does);
* pipeline: ``workflows.data.training_pairs`` (shard paths -> pair-stage
  tasks that read, decode and pair them) feeding one Ray Train ``TorchTrainer`` worker whose
  ``TrainingLoop.train_epoch`` reads the ``EpochStream``, as ``workflows.train`` does
  (the same chunks, steps and distortions); no validation or checkpoints.

Only the training part of each epoch is timed on both sides. Each side also counts its
process's CPU time in the kernel and minor page faults (``ProcessUsage``): with
glibc's adaptive malloc (``--glibc-malloc``, i.e. ``training.keep_freed_memory=False``
on both sides) the Train worker faulted its freed tensor memory back in at every step. During the pipeline's
steady epochs the benchmark also samples every process's CPU time (``CpuShares``) and
prints how many of the cores went to the Train worker, the pair stage, Ray's other
processes and everything else. The plain loop
runs before and after the pipeline (the mean is the reference), which cancels
slow drift in a shared machine's speed. For the pipeline the benchmark also
splits each epoch into time-to-first-batch (epoch 0: Ray Data starting, the
first shards read and decoded; later epochs: whatever the pass started during
the epoch before has not hidden), time blocked waiting for later batches, and
time in training steps.

``--interleave`` instead alternates the two inside the one Train worker, on one
model: a plain epoch (the loop above, over the split decoded in the worker), then
a pipeline epoch whose pass starts only then (no look-ahead, so the pair stage
does not run during the plain epoch; its start-up wait is counted, and also shown
apart). Epochs seconds apart share the machine's speed, which drifts by 10-20%
between runs minutes apart; the cost of Ray Train's own processes is on both sides.

``--alternate`` keeps the plain loop in its own fresh process, as in part 1, but
alternates its epochs with the pipeline's (turn files hand over between the two
processes, so only one trains at a time): a plain epoch, then a pipeline epoch
whose pass starts only then, and so on. This cancels the drift like
``--interleave`` while the plain loop stays outside Ray's worker; Ray's
processes are alive beside both sides. One host only (the files are local).
With ``--look-ahead`` the pipeline streams as the training job does: each
next epoch's pass runs during the epoch (``EpochStream``), and before handing
the turn over the worker waits for whatever of it is left (counted in its
epoch), so no pair-stage work runs in the plain loop's turn. The waiting side
polls for its turn every ``--turn-poll-ms`` (50): at 5 ms, the poll of a
waiting process at nice 0 slowed a Train worker at Ray's nice 15 beside it
(benchmarks/RESULTS.md). Both modes also print each side's process CPU time
per epoch, by thread.

Part 2 (``--memory``). Writes synthetic training shards (copies of the real
alphabets under new names, one shard per alphabet, the shard schema and a
valid manifest) at 1x and ``--scale``x the training split's 19,280 images under
/tmp, streams each through ``training_pairs`` (iterated fully, discarded;
pairs per epoch scaled with the data so each shard gets the same work) and
polls the peak RSS of the pair-stage actor process(es) and of the read tasks,
and the object store's peak use.

    .venv/bin/python benchmarks/bench_pipeline.py                  # overhead, cpu-small
    .venv/bin/python benchmarks/bench_pipeline.py --memory         # + memory 1x vs 10x
    .venv/bin/python benchmarks/bench_pipeline.py --interleave     # plain/pipeline epochs alternating
    .venv/bin/python benchmarks/bench_pipeline.py --alternate      # the same, plain loop in its own process
    .venv/bin/python benchmarks/bench_pipeline.py --memory --no-overhead --cache-mb 64

The pair stage keeps decoded shards between epochs up to ``data.decoded_cache_mb``
per process, so its peak memory is bounded by that cap plus one shard, whatever the
data size: the memory check streams two epochs and prints the growth from 1x to the
larger set next to the cap.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


# --------------------------------------------------------------------------- config

def job_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Overrides of the demo recipe: the preset's model, the pairs, threads, batch size."""
    from siamese_core.config import MODEL_PRESETS

    model = dataclasses.asdict(MODEL_PRESETS[args.preset])
    overrides: dict[str, Any] = {f"model.{k}": v for k, v in model.items()}
    overrides.update({
        "data.uri": str(Path(args.data).resolve()),
        "pairs.pairs_per_epoch": args.pairs, "pairs.distorted_copies": args.copies,
        "training.threads": args.threads, "training.batch_size": args.batch,
        "training.epochs": args.epochs, "training.seed": args.seed,
        "cluster.workers": 1,
    })
    if args.shuffle_buffer is not None:
        overrides["data.shuffle_buffer_pairs"] = args.shuffle_buffer
    if args.cache_mb is not None:
        overrides["data.decoded_cache_mb"] = args.cache_mb
    if args.in_batch_negatives is not None:
        overrides["training.in_batch_negatives"] = args.in_batch_negatives
    if args.glibc_malloc:
        overrides["training.keep_freed_memory"] = False
    return overrides


# --------------------------------------------------------------------------- plain loop

def plain_setup(cfg: Any, images: Any) -> Any:
    """The plain loop's pairs: the pair stage's draw over the decoded split, chunked as the stream is."""
    from siamese_core.loop import MemoryPairs

    return MemoryPairs(images, cfg.recipe, cfg.data.chunk_pairs)


def timed_epoch(loop: Any, epoch: int, chunks: Any) -> dict[str, Any]:
    """``loop.train_epoch`` over ``chunks``, timed whole, with this process's CPU time and faults."""
    usage = ProcessUsage()
    t0, c0 = time.perf_counter(), time.process_time()
    trained = loop.train_epoch(epoch, chunks)
    return {"epoch": epoch, "train_seconds": time.perf_counter() - t0, "rows": trained["pairs"],
            "cpu_seconds": time.process_time() - c0, **usage.since()}


def plain_epoch(pairs: Any, loop: Any, epoch: int) -> dict[str, float]:
    """One epoch of the plain loop (what ``siamese_core.loop.fit`` does), training steps only."""
    return timed_epoch(loop, epoch, pairs(epoch))


class ProcessUsage:
    """This process's kernel CPU time and minor page faults since it was made.

    Why: a process whose freed tensor memory is unmapped faults it back in at every
    step, which shows as kernel time (``training.keep_freed_memory``, ``--glibc-malloc``).
    """

    def __init__(self) -> None:
        self.start = resource.getrusage(resource.RUSAGE_SELF)
        self.start_threads = thread_cpu()

    def since(self) -> dict[str, Any]:
        now = resource.getrusage(resource.RUSAGE_SELF)
        threads = thread_cpu()
        by_name: dict[str, float] = {}
        for tid, (name, cpu) in threads.items():
            by_name[name] = by_name.get(name, 0.0) + cpu - self.start_threads.get(tid, (name, 0.0))[1]
        return {"sys_seconds": now.ru_stime - self.start.ru_stime,
                "minor_faults": float(now.ru_minflt - self.start.ru_minflt), "threads_cpu": by_name}


def thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds of each of this process's threads, by thread id: (name, seconds).

    The main thread is named "main"; threads named as the process, "pool": torch's
    intra-op threads and, in a Ray Train worker, the thread that runs the training loop.
    Why: it tells the steps' CPU time from Ray's own threads in the same process."""
    tick, pid = os.sysconf("SC_CLK_TCK"), os.getpid()
    main_comm = Path(f"/proc/{pid}/comm").read_text().strip()
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        utime, stime = stat[stat.rindex(")") + 2:].split()[11:13]
        tid = int(task.name)
        name = "main" if tid == pid else "pool" if comm == main_comm else comm
        out[tid] = (name, (int(utime) + int(stime)) / tick)
    return out


def plain_loop(cfg: Any, device: Any = "cpu", model: Any = None) -> Any:
    """The one training loop with its model and optimizer, built as the Train worker builds them."""
    import torch

    from siamese_core.heap import keep_freed_memory
    from siamese_core.loop import TrainingLoop, new_model
    from siamese_core.model import place_model
    from siamese_core.optim import build_optimizer

    torch.set_num_threads(cfg.training.threads)
    if cfg.training.keep_freed_memory:
        keep_freed_memory()
    if model is None:
        model = place_model(new_model(cfg.model, cfg.training.seed, cfg.training.fan_in_scaled), device,
                            cfg.cluster.channels_last)
    optimizer = build_optimizer(getattr(model, "module", model), cfg.optim)
    return TrainingLoop(cfg.recipe, model, optimizer, device)


def print_plain_epoch(label: str, result: dict[str, float]) -> None:
    rows, seconds = result["rows"], result["train_seconds"]
    print(f"  plain[{label}] epoch {int(result['epoch'])}: {rows} pairs in {seconds:.2f}s = "
          f"{rows / seconds:.0f} pairs/s", flush=True)


def plain_epochs(cfg: Any, images: Any, epochs: int, label: str) -> list[dict[str, float]]:
    """The plain single-process loop; per epoch: training seconds and rows (pairs incl. copies)."""
    loop = plain_loop(cfg)
    pairs = plain_setup(cfg, images)
    out = []
    for epoch in range(epochs):
        out.append(plain_epoch(pairs, loop, epoch))
        print_plain_epoch(label, out[-1])
    return out


class Turns:
    """Hand-over files between the plain loop's process and the Train worker, so that their
    epochs alternate (``--alternate``).

    Why files: the two processes share nothing else (one is the driver's spawned child,
    the other a Ray actor), and both run on this host. The waiting side polls every
    ``poll_s``, outside the timed epochs, so a turn starts up to that late; each poll wakes
    a process beside the one training. Either side, or the driver, posts ``abort`` when it
    fails, so the other stops waiting with an error instead of hanging.
    """

    def __init__(self, directory: str, timeout_s: float = 900.0, poll_s: float = 0.05) -> None:
        self.directory, self.timeout_s, self.poll_s = Path(directory), timeout_s, poll_s

    def post(self, name: str) -> None:
        tmp = self.directory / f".{name}.tmp"
        tmp.write_text(str(time.time()))
        os.replace(tmp, self.directory / name)

    def wait(self, name: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not (self.directory / name).exists():
            if (self.directory / "abort").exists():
                raise RuntimeError(f"the other side of --alternate failed while this one waited for {name!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"--alternate: no {name!r} in {self.directory} after {self.timeout_s:.0f}s; "
                                   "the other side stopped (see its output above)")
            time.sleep(self.poll_s)


def plain_alternating(cfg: Any, images: Any, epochs: int, turn_dir: str, poll_s: float) -> list[dict[str, float]]:
    """:func:`plain_epochs`, each epoch waiting for the Train worker's epoch before it (``--alternate``)."""
    turns = Turns(turn_dir, poll_s=poll_s)
    try:
        loop = plain_loop(cfg)
        pairs = plain_setup(cfg, images)
        out = []
        for epoch in range(epochs):
            turns.wait("pipeline-ready" if epoch == 0 else f"pipeline-{epoch - 1}")
            out.append({**plain_epoch(pairs, loop, epoch), "side": "plain"})
            print_plain_epoch("alternating", out[-1])
            turns.post(f"plain-{epoch}")
        return out
    except BaseException:
        turns.post("abort")
        raise


def plain_in_fresh_process(cfg: Any, images: Any, epochs: int, label: str) -> list[dict[str, float]]:
    """:func:`plain_epochs` in a new process beside the same Ray processes.

    Why: ``trainer.fit()`` leaves Ray Data and Train threads in the driver process,
    which slowed a plain loop run there afterwards by 10-20% (GIL), and so made the
    reference look slower than it is.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(plain_epochs, cfg, images, epochs, label).result()


# --------------------------------------------------------------------------- pipeline loop

class TimedChunks:
    """The epoch's chunks as the loop pulls them, with the wait for the first and for the later ones."""

    def __init__(self, chunks: Any, started: float) -> None:
        self.chunks, self.started = iter(chunks), started
        self.first: float | None = None
        self.wait = 0.0

    def __iter__(self) -> Any:
        while True:
            tw = time.perf_counter()
            chunk = next(self.chunks, None)
            now = time.perf_counter()
            if self.first is None:
                self.first = now - self.started
            else:
                self.wait += now - tw
            if chunk is None:
                return
            yield chunk


def pipeline_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """``workflows.train``'s worker without validation or checkpoints: the one loop's epochs, instrumented."""
    import ray.train
    import ray.train.torch

    from siamese_core.loop import new_model
    from siamese_core.model import place_model
    from workflows import config as job_config
    from workflows.data import worker_stream

    cfg = job_config.build(loop_config["recipe"], overrides=loop_config["overrides"])
    device = ray.train.torch.get_device()
    loop = plain_loop(cfg, device, ray.train.torch.prepare_model(place_model(
        new_model(cfg.model, cfg.training.seed, cfg.training.fan_in_scaled), device, cfg.cluster.channels_last)))
    shard = ray.train.get_dataset_shard("train")
    interleave = loop_config.get("interleave")
    turns = (Turns(loop_config["alternate"]["turn_dir"], poll_s=loop_config["alternate"]["poll_s"])
             if loop_config.get("alternate") else None)
    if interleave:
        dataset = loop_config["dataset"]
        pairs = plain_setup(cfg, dataset.load_images("train", cfg.model.input_size, cfg.model.preprocess))
    look_ahead = bool(turns is not None and loop_config["alternate"].get("look_ahead"))
    if turns is None or look_ahead:
        stream = worker_stream(shard, cfg, loop_config["epoch_clock"])
    if turns is not None:
        turns.post("pipeline-ready")
    history: list[dict[str, float]] = []
    for epoch in range(cfg.training.epochs):
        if interleave:
            history.append({**plain_epoch(pairs, loop, epoch), "side": "plain"})
        elif turns is not None:
            turns.wait(f"plain-{epoch}")
        if interleave or (turns is not None and not look_ahead):
            # A plain epoch first (here, on the same model, or in the plain loop's process), then
            # a pipeline epoch whose pass starts only now (no look-ahead: the next pass's pair stage
            # would otherwise run during the plain epoch and slow it); its start-up wait is
            # recorded as first_batch_s.
            stream = worker_stream(shard, cfg, loop_config["epoch_clock"], end_epoch=epoch + 1)
        t0 = time.perf_counter()
        chunks = TimedChunks(stream.epoch(epoch), t0)
        result = timed_epoch(loop, epoch, chunks)
        handover = 0.0
        if look_ahead:
            # As in the job, the next epoch's pass ran during this one's steps; whatever of it is
            # left is waited for here and counted, so no pair-stage work runs in the plain turn.
            th = time.perf_counter()
            if not stream.wait_prepared(timeout_s=600.0):
                raise RuntimeError("--look-ahead: the next epoch's pass did not fit in data.prefetch_chunks "
                                   "chunks within 600 s; lower --pairs or raise data.prefetch_chunks")
            handover = time.perf_counter() - th
        seconds = time.perf_counter() - t0
        first = chunks.first or 0.0
        history.append({**result, "train_seconds": seconds, "first_batch_s": first, "handover_wait_s": handover,
                        "wait_s": chunks.wait, "step_s": seconds - first - chunks.wait - handover,
                        "side": "pipeline", "pid": os.getpid(),
                        "wall_end": time.time(), "wall_start": time.time() - seconds})
        # Ray Train (v2) keeps only checkpointed reports in the Result: hand the figures over in a file.
        Path(loop_config["history_path"]).write_text(json.dumps(history))
        if turns is not None:
            turns.post(f"pipeline-{epoch}")
        ray.train.report({"epoch": epoch})


def pipeline_epochs(cfg: Any, overrides: dict[str, Any], dataset: Any, storage_dir: str,
                    interleave: dict[str, Any] | None = None,
                    alternate: dict[str, Any] | None = None) -> tuple[list[dict[str, float]], float]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from workflows.data import start_epoch_clock, training_pairs

    clock = start_epoch_clock()
    pairs = training_pairs(dataset, cfg.pairs, cfg.model, cfg.training.seed,
                           clock=clock, negatives=cfg.training.negatives, num_cpus=cfg.data.pair_stage_cpus,
                           read_cpus=cfg.data.read_cpus, concurrency=cfg.data.pair_stage_concurrency,
                           cache_mb=cfg.data.decoded_cache_mb, shards_per_task=cfg.data.shards_per_task)
    trainer = TorchTrainer(
        pipeline_loop_per_worker,
        train_loop_config={"recipe": "demo", "overrides": overrides, "epoch_clock": clock, "dataset": dataset,
                           "history_path": str(Path(storage_dir) / "history.json"), "interleave": interleave,
                           "alternate": alternate},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False,
                                               resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}),
        run_config=ray.train.RunConfig(name="bench-pipeline", storage_path=storage_dir),
        datasets={"train": pairs})
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.error:
        raise result.error
    epochs = json.loads((Path(storage_dir) / "history.json").read_text())
    for e in epochs:
        if e["side"] == "plain":
            print(f"  plain (in the worker) epoch {int(e['epoch'])}: {int(e['rows'])} pairs in "
                  f"{e['train_seconds']:.2f}s = {e['rows'] / e['train_seconds']:.0f} pairs/s", flush=True)
            continue
        print(f"  pipeline epoch {int(e['epoch'])}: {int(e['rows'])} pairs in {e['train_seconds']:.2f}s = "
              f"{e['rows'] / e['train_seconds']:.0f} pairs/s (first batch {e['first_batch_s']:.2f}s, "
              f"later waits {e['wait_s']:.2f}s, steps {e['step_s']:.2f}s"
              + (f", next pass's rest {e['handover_wait_s']:.2f}s" if e.get("handover_wait_s") else "") + ")",
              flush=True)
    return epochs, wall


def rate(epochs: list[dict[str, float]]) -> float:
    return sum(e["rows"] for e in epochs) / sum(e["train_seconds"] for e in epochs)


DATA_STAGE_TITLES = ("ShardPairs", "ReadParquet", "MapBatches", "ReadFiles")
"""Process-title fragments of the pair stage's and read's Ray Data tasks."""


class CpuShares(threading.Thread):
    """Samples every process's CPU seconds and title about once a second, to say afterwards
    which processes used the cores during the pipeline's steady epochs.

    Why: the pipeline's steps run slower than the plain loop's although no batch is waited
    for; this shows whether the cores went to the pair stage or to Ray's own processes.
    """

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self.titles: dict[int, set[str]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil  # Ray ships it (ray/thirdparty_files) and puts it on the path

        while not self.stop.is_set():
            snap: dict[int, tuple[str, float]] = {}
            for proc in psutil.process_iter(["cmdline", "cpu_times"]):
                try:
                    title = " ".join(proc.info["cmdline"] or []).strip()[:100]
                    times = proc.info["cpu_times"]
                    if times is None:
                        continue
                    snap[proc.pid] = (title, times.user + times.system)
                    self.titles.setdefault(proc.pid, set()).add(title)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.samples.append((time.time(), snap))
            self.stop.wait(self.interval)

    def group(self, pid: int, trainer_pid: int) -> str:
        titles = " | ".join(sorted(self.titles.get(pid, ())))
        if pid == trainer_pid:
            return "Train worker"
        if pid == os.getpid():
            return "benchmark driver"
        if any(marker in titles for marker in DATA_STAGE_TITLES):
            return "pair stage + read tasks"
        if "ray::" in titles or "/ray/" in titles or "raylet" in titles or "gcs_server" in titles:
            return "Ray's other processes"
        return "outside Ray"

    def shares(self, start: float, end: float, trainer_pid: int) -> dict[str, Any]:
        """Cores used per group (and per process, top 8) between two wall-clock times."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return {}
        (ta, first), (tb, last) = inside[0], inside[-1]
        seconds = tb - ta
        groups: dict[str, float] = {}
        per_process: dict[str, float] = {}
        for pid, (title, cpu) in last.items():
            used = (cpu - first.get(pid, (title, 0.0))[1]) / seconds
            if used <= 0:
                continue
            name = self.group(pid, trainer_pid)
            groups[name] = groups.get(name, 0.0) + used
            per_process[f"{pid} {title[:60]}"] = used
        top = dict(sorted(per_process.items(), key=lambda kv: -kv[1])[:8])
        ray_processes = sum(1 for pid in last if self.group(pid, trainer_pid) == "Ray's other processes")
        return {"seconds": seconds, "cores": os.cpu_count(), "groups": groups, "top_processes": top,
                "ray_other_process_count": ray_processes}


def print_cpu_shares(shares: dict[str, Any]) -> None:
    if not shares:
        print("cores during steady pipeline epochs: too few samples")
        return
    used = sum(shares["groups"].values())
    parts = ", ".join(f"{name} {cores:.2f}" for name, cores in sorted(shares["groups"].items(), key=lambda kv: -kv[1]))
    print(f"cores during steady pipeline epochs ({shares['seconds']:.0f}s, {shares['cores']} cores): {parts}; "
          f"idle {max(0.0, shares['cores'] - used):.2f} ({shares['ray_other_process_count']} other Ray processes)")
    print("  busiest processes: " + "; ".join(f"{name.split(' ', 1)[1] or name} {cores:.3f}"
                                             for name, cores in shares["top_processes"].items()))


def configure(args: argparse.Namespace) -> tuple[dict[str, Any], Any, Any]:
    """The overrides and job configuration (fitted to the data set, as the job does it), and the data set."""
    from workflows import config as job_config
    from workflows.shards import DataSet
    from workflows.train import fit_to_data

    overrides = job_overrides(args)
    dataset = DataSet.open(overrides["data.uri"])
    cfg, overrides = fit_to_data(job_config.build("demo", overrides=overrides), overrides, dataset)
    return overrides, cfg, dataset


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from workflows.ray_setup import init_ray

    overrides, cfg, dataset = configure(args)
    print(f"== pipeline overhead: preset {args.preset}, {args.pairs} pairs/epoch x (1 + {args.copies} copies), "
          f"shuffle buffer {cfg.data.shuffle_buffer_pairs} pairs, "
          f"batch {args.batch}, {args.threads} torch threads, {args.epochs} epochs, 1 Train worker, "
          f"decoded-shard cache {cfg.data.decoded_cache_mb:g} MB, "
          f"{os.cpu_count()} cores", flush=True)
    t0 = time.perf_counter()
    images = dataset.load_images("train", cfg.model.input_size, cfg.model.preprocess)
    decode_s = time.perf_counter() - t0
    print(f"  plain: decoded {len(images)} train images once in {decode_s:.1f}s (not timed)", flush=True)

    init_ray()  # first, so both loops run beside the same idle Ray processes
    before = plain_in_fresh_process(cfg, images, args.epochs, "before")
    storage_dir = tempfile.mkdtemp(prefix="bench-pipeline-")
    cpu = CpuShares()
    cpu.start()
    try:
        pipe, wall = pipeline_epochs(cfg, overrides, dataset, storage_dir)
        cpu.stop.set()
        after = plain_in_fresh_process(cfg, images, args.epochs, "after")
    finally:
        cpu.stop.set()
        ray.shutdown()
        shutil.rmtree(storage_dir, ignore_errors=True)

    steady = slice(1, None) if args.epochs > 1 else slice(0, None)
    plain_all = statistics.mean([rate(before), rate(after)])
    # The plain loop decodes the split once before its first epoch, the pipeline during its first
    # epoch: counting that decode on both sides compares whole runs.
    plain_run = statistics.mean([sum(e["rows"] for e in side) / (decode_s + sum(e["train_seconds"] for e in side))
                                 for side in (before, after)])
    plain_steady = statistics.mean([rate(before[steady]), rate(after[steady])])
    pipe_all, pipe_steady = rate(pipe), rate(pipe[steady])
    first = [e["first_batch_s"] for e in pipe]
    waits = [e["wait_s"] for e in pipe]
    steps = [e["step_s"] for e in pipe]
    later_first = statistics.mean(first[1:]) if len(first) > 1 else first[0]
    no_restart = sum(e["rows"] for e in pipe[steady]) / sum(e["train_seconds"] - e["first_batch_s"]
                                                            for e in pipe[steady])
    plain_step = plain_steady
    pipe_step = sum(e["rows"] for e in pipe[steady]) / sum(steps[steady])
    shares = cpu.shares(pipe[steady][0]["wall_start"], pipe[-1]["wall_end"], int(pipe[-1]["pid"]))
    plain_cores = (sum(e["cpu_seconds"] for side in (before, after) for e in side[steady])
                   / sum(e["train_seconds"] for side in (before, after) for e in side[steady]))
    summary = {
        "preset": args.preset, "pairs_per_epoch": args.pairs, "copies": args.copies, "threads": args.threads,
        "batch": args.batch, "epochs": args.epochs,
        "plain_pairs_per_s": plain_all, "pipeline_pairs_per_s": pipe_all, "ratio": pipe_all / plain_all,
        "plain_steady_pairs_per_s": plain_steady, "pipeline_steady_pairs_per_s": pipe_steady,
        "steady_ratio": pipe_steady / plain_steady,
        "plain_with_decode_pairs_per_s": plain_run, "run_ratio": pipe_all / plain_run,
        "cache_mb": cfg.data.decoded_cache_mb,
        "plain_before_pairs_per_s": rate(before), "plain_after_pairs_per_s": rate(after),
        "first_epoch_first_batch_s": first[0], "later_epochs_first_batch_s": later_first,
        "later_waits_s_per_epoch": statistics.mean(waits[steady]),
        "pipeline_steady_without_restart_pairs_per_s": no_restart,
        "pipeline_step_only_pairs_per_s": pipe_step, "trainer_fit_wall_s": wall,
        "steady_cpu_shares": shares, "plain_steady_cores": plain_cores,
    }
    print("-- result (training steps only; validation excluded on both sides)")
    print(f"plain loop    : {plain_all:8.0f} pairs/s  (before {rate(before):.0f}, after {rate(after):.0f})")
    print(f"pipeline      : {pipe_all:8.0f} pairs/s")
    print(f"ratio         : {pipe_all / plain_all:8.3f}  (target >= 0.95)")
    print(f"whole run     : {pipe_all / plain_run:8.3f}  (plain's one-time decode of {decode_s:.1f}s counted too: "
          f"{plain_run:.0f} pairs/s)")
    print(f"steady state (epochs {steady.start}..): plain {plain_steady:.0f}, pipeline {pipe_steady:.0f} pairs/s, "
          f"ratio {pipe_steady / plain_steady:.3f}")
    print(f"where the pipeline's time goes: first batch of epoch 0 {first[0]:.2f}s (Ray Data start + actor); "
          f"first batch of later epochs {later_first:.2f}s each (each pass starts during the epoch before); "
          f"later waits {statistics.mean(waits):.2f}s/epoch; steps {statistics.mean(steps):.2f}s/epoch")
    print(f"pipeline steady rate without the per-epoch restart: {no_restart:.0f} pairs/s "
          f"(ratio {no_restart / plain_steady:.3f}); inside train steps only: {pipe_step:.0f} pairs/s "
          f"(ratio {pipe_step / plain_step:.3f}: cores taken from the steps by other processes, below)")
    print_cpu_shares(shares)
    print(f"  the plain loop's process, steady epochs: {plain_cores:.2f} cores")
    report_kernel_use(summary, {"plain": before[steady] + after[steady], "pipeline": pipe[steady]},
                      "  {}, steady epochs")
    print(f"trainer.fit() wall {wall:.1f}s for {args.epochs} epochs "
          f"(sum of timed epochs {sum(e['train_seconds'] for e in pipe):.1f}s)")
    return summary


def side_by_side_setup(args: argparse.Namespace, label: str, layout: str) -> tuple[dict[str, Any], Any, Any]:
    """The overrides, job configuration and data set of ``--interleave`` / ``--alternate``;
    prints the run's header."""
    overrides, cfg, dataset = configure(args)
    print(f"== {label}: preset {args.preset}, {args.pairs} pairs/epoch x (1 + {args.copies} copies), batch "
          f"{args.batch}, {args.threads} torch threads, {args.epochs} x {layout}, {os.cpu_count()} cores",
          flush=True)
    return overrides, cfg, dataset


def interleaved(args: argparse.Namespace) -> dict[str, Any]:
    """Plain and pipeline epochs alternating in the one Train worker, on one model.

    Why: minutes apart, these shared machines' speed drifts by 10-20%, as much as the
    effect measured; epochs side by side cancel that. Both halves run in the same
    process, so this isolates what streaming costs the training steps (Ray Data's
    iterator, the object store, the pass in flight) from the step itself.
    """
    import ray

    from workflows.ray_setup import init_ray

    overrides, cfg, dataset = side_by_side_setup(args, "interleaved",
                                                 "(plain epoch, pipeline epoch) in one Train worker")
    init_ray()
    storage_dir = tempfile.mkdtemp(prefix="bench-pipeline-")
    try:
        history, _ = pipeline_epochs(cfg, overrides, dataset, storage_dir, interleave={"plain": True})
    finally:
        ray.shutdown()
        shutil.rmtree(storage_dir, ignore_errors=True)
    return side_by_side(args, history, "interleaved")


def alternated(args: argparse.Namespace) -> dict[str, Any]:
    """Plain epochs in a fresh process and pipeline epochs in the Train worker, taking turns.

    Why: ``--interleave`` cancels the machine's drift but runs the plain epochs inside the
    Ray worker; this keeps the reference a plain process, as in the overhead runs, while
    its epochs sit seconds from the pipeline's. Ray's processes are alive beside both.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import ray

    from workflows.ray_setup import init_ray

    overrides, cfg, dataset = side_by_side_setup(
        args, "alternating", "(plain epoch in its own process, pipeline epoch in the Train worker)")
    images = dataset.load_images("train", cfg.model.input_size, cfg.model.preprocess)
    init_ray()
    storage_dir = tempfile.mkdtemp(prefix="bench-pipeline-")
    turns = Turns(str(Path(storage_dir) / "turns"))
    turns.directory.mkdir()
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            plain_side = pool.submit(plain_alternating, cfg, images, args.epochs, str(turns.directory),
                                     args.turn_poll_ms / 1000)
            try:
                pipe, _ = pipeline_epochs(cfg, overrides, dataset, storage_dir, alternate={
                    "turn_dir": str(turns.directory), "look_ahead": args.look_ahead,
                    "poll_s": args.turn_poll_ms / 1000})
            except BaseException:
                turns.post("abort")
                raise
            plain = plain_side.result()
    finally:
        ray.shutdown()
        shutil.rmtree(storage_dir, ignore_errors=True)
    return side_by_side(args, plain + pipe, "alternating")


def report_kernel_use(summary: dict[str, Any], sides: dict[str, list[dict[str, Any]]], label: str) -> None:
    """Each side's kernel share of its process's CPU time and minor page faults per CPU-second
    over its epochs: printed (``label`` formatted with "<side> process") and added to ``summary``."""
    for side, epochs in sides.items():
        cpu = sum(e["cpu_seconds"] for e in epochs)
        share, faults = sum(e["sys_seconds"] for e in epochs) / cpu, sum(e["minor_faults"] for e in epochs) / cpu
        summary[f"{side}_kernel_share"], summary[f"{side}_faults_per_cpu_s"] = share, faults
        print(f"{label.format(side + ' process')}: {share:.1%} of its CPU time in the kernel, "
              f"{faults:.0f} minor page faults per CPU-second")


def side_by_side(args: argparse.Namespace, history: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """Rates and ratios of plain and pipeline epochs that alternated (``--interleave``, ``--alternate``)."""
    steady = slice(1, None) if args.epochs > 1 else slice(0, None)
    plain = [e for e in history if e["side"] == "plain"][steady]
    pipe = [e for e in history if e["side"] == "pipeline"][steady]
    plain_rate, pipe_rate = rate(plain), rate(pipe)
    started = sum(e["rows"] for e in pipe) / sum(e["train_seconds"] - e["first_batch_s"] for e in pipe)
    pairwise = [(p["rows"] / p["train_seconds"]) / (q["rows"] / q["train_seconds"]) for p, q in zip(pipe, plain)]
    summary = {"preset": args.preset, "pairs_per_epoch": args.pairs, "copies": args.copies,
               "threads": args.threads, "batch": args.batch, "epochs": args.epochs,
               "plain_pairs_per_s": plain_rate, "pipeline_pairs_per_s": pipe_rate, "ratio": pipe_rate / plain_rate,
               "pipeline_after_start_pairs_per_s": started, "ratio_after_start": started / plain_rate,
               "epoch_ratios": pairwise, "plain_rows": [int(e["rows"]) for e in plain],
               "pipeline_rows": [int(e["rows"]) for e in pipe],
               "start_wait_s_per_epoch": statistics.mean(e["first_batch_s"] for e in pipe),
               "look_ahead": args.look_ahead, "turn_poll_ms": args.turn_poll_ms,
               "handover_wait_s_per_epoch": statistics.mean(e.get("handover_wait_s", 0.0) for e in pipe)}
    print(f"-- {label} result (epochs {steady.start}..{args.epochs - 1}; training only)")
    print(f"plain epochs    : {plain_rate:8.0f} pairs/s")
    passes = (f"each next pass run during the epoch as in the job, its rest waited for at the epoch's end "
              f"and counted ({summary['handover_wait_s_per_epoch']:.2f}s per epoch), first batch "
              f"{summary['start_wait_s_per_epoch']:.2f}s per epoch" if args.look_ahead else
              f"each pass's start-up counted ({summary['start_wait_s_per_epoch']:.2f}s per epoch, which the "
              f"training job's look-ahead hides)")
    print(f"pipeline epochs : {pipe_rate:8.0f} pairs/s, ratio {pipe_rate / plain_rate:.3f} (target >= 0.95); "
          + passes)
    print(f"after the start : {started:8.0f} pairs/s, ratio {started / plain_rate:.3f}")
    print(f"epoch by epoch  : ratios {min(pairwise):.3f}-{max(pairwise):.3f}, "
          f"median {statistics.median(pairwise):.3f}")
    for side, epochs in (("plain", plain), ("pipeline", pipe)):
        cpu, wall = sum(e["cpu_seconds"] for e in epochs), sum(e["train_seconds"] for e in epochs)
        summary[f"{side}_cpu_s_per_epoch"], summary[f"{side}_cores"] = cpu / len(epochs), cpu / wall
        names: dict[str, float] = {}
        for e in epochs:
            for name, seconds in e["threads_cpu"].items():
                names[name] = names.get(name, 0.0) + seconds / len(epochs)
        summary[f"{side}_threads_cpu_s_per_epoch"] = names
    print(f"process CPU     : plain {summary['plain_cpu_s_per_epoch']:.2f}s per epoch "
          f"({summary['plain_cores']:.2f} cores), pipeline's Train worker "
          f"{summary['pipeline_cpu_s_per_epoch']:.2f}s ({summary['pipeline_cores']:.2f} cores)")
    for side in ("plain", "pipeline"):
        names = summary[f"{side}_threads_cpu_s_per_epoch"]
        print(f"{side} threads CPU s/epoch: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                         sorted(names.items(), key=lambda kv: -kv[1]) if v >= 0.005))
    report_kernel_use(summary, {"plain": plain, "pipeline": pipe}, "{:<16}")
    return summary


# --------------------------------------------------------------------------- memory

def write_synthetic(source_uri: str, dest: Path, copies: int) -> int:
    """``copies`` x the training split as shards (one per synthetic group) + a valid manifest."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from workflows import shards

    source = shards.DataSet.open(source_uri)
    table = source.read_table("train", source.columns())
    groups = sorted(set(table.column("group").to_pylist()))
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "train").mkdir(parents=True)
    entries = []
    for k in range(copies):
        for g_i, name in enumerate(groups):
            part = table.filter(pc.equal(table.column("group"), name))
            group = f"syn{k:03d}_{name}"
            part = part.set_column(part.schema.get_field_index("group"), "group",
                                   pa.array([group] * part.num_rows, pa.string()))
            part = part.set_column(part.schema.get_field_index("label"), "label",
                                   pa.array([f"syn{k:03d}_{x}" for x in part.column("label").to_pylist()]))
            part = part.set_column(part.schema.get_field_index("image_id"), "image_id",
                                   pa.array([f"syn{k:03d}/{x}" for x in part.column("image_id").to_pylist()]))
            rel = f"train/syn-{k:03d}-{g_i:02d}.parquet"
            pq.write_table(part, dest / rel, compression="snappy")
            entries.append({"path": rel, "split": "train", "rows": part.num_rows,
                            "classes": len(set(part.column("label").to_pylist())), "groups": [group]})
    images = sum(e["rows"] for e in entries)
    empty = {"images": 0, "classes": 0, "groups": 0}
    manifest = {**{k: v for k, v in source.manifest.to_json().items()}, "name": "synthetic",
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "source": {"synthetic": f"{copies} x the train split of {source_uri}"},
                "content_checksum": "sha256:" + "0" * 64, "listing_checksum": "sha256:" + "0" * 64,
                "counts": {"images": images, "classes": sum(e["classes"] for e in entries), "groups": len(entries)},
                "splits": {"train": {"images": images, "classes": sum(e["classes"] for e in entries),
                                     "groups": len(entries), "group_names": [e["groups"][0] for e in entries]},
                           "validation": empty, "test": empty},
                "shards": entries}
    (dest / shards.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    shards.DataSet.open(str(dest))  # validates
    return images


class PeakPoller(threading.Thread):
    """Polls the RSS of Ray worker processes whose title names a marker, and the object store."""

    def __init__(self, markers: dict[str, str], interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.raylet = raylet_pid()
        self.markers, self.interval = markers, interval
        self.peak_rss: dict[str, dict[int, int]] = {k: {} for k in markers}
        self.peak_store = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            for proc in psutil.process_iter(["cmdline"]):
                try:
                    title = " ".join(proc.info["cmdline"] or [])
                    if not any(marker in title for marker in self.markers.values()):
                        continue
                    if self.raylet is not None and proc.ppid() != self.raylet:
                        continue  # another Ray instance on this machine
                    for key, marker in self.markers.items():
                        if marker in title:
                            rss = proc.memory_info().rss
                            seen = self.peak_rss[key]
                            seen[proc.pid] = max(seen.get(proc.pid, 0), rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            polls = getattr(self, "_polls", 0)
            self._polls = polls + 1
            if polls % 20 == 0:  # the store summary is an RPC: about once a second
                self.peak_store = max(self.peak_store, object_store_used())
            self.stop.wait(self.interval)


def raylet_pid() -> int | None:
    """The pid of this session's raylet (its workers are its children), or None."""
    try:
        from ray._private import ray_constants
        from ray._private.worker import _global_node

        return _global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    except Exception:  # noqa: BLE001
        return None


def object_store_used() -> int:
    """Bytes in this node's plasma store (0 if the API is not available)."""
    import re

    try:
        from ray._private.internal_api import memory_summary

        text = memory_summary(stats_only=True)
    except Exception:  # noqa: BLE001
        return 0
    match = re.search(r"Plasma memory usage (\d+) MiB", text)
    return int(match.group(1)) * 2**20 if match else 0


def stream_once(uri: str, cfg: Any, pairs: int) -> dict[str, Any]:
    from workflows.data import training_pairs
    from workflows.shards import DataSet

    pair_cfg = dataclasses.replace(cfg.pairs, pairs_per_epoch=pairs)
    ds = training_pairs(DataSet.open(uri), pair_cfg, cfg.model, cfg.training.seed,
                        num_cpus=cfg.data.pair_stage_cpus, read_cpus=cfg.data.read_cpus,
                        concurrency=cfg.data.pair_stage_concurrency, cache_mb=cfg.data.decoded_cache_mb,
                        shards_per_task=cfg.data.shards_per_task)
    poller = PeakPoller({"pair_stage": "ShardPairs", "read": "ReadParquet"})
    poller.start()
    t0 = time.perf_counter()
    n = 0
    for _epoch in range(2):  # the second epoch is served from the decoded-shard cache, as far as it holds
        for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
            n += len(batch["same"])
    seconds = time.perf_counter() - t0
    poller.stop.set()
    poller.join()
    stats = ds.stats()
    peak_store_line = next((l.strip() for l in stats.splitlines() if "object store" in l.lower()), "")
    pair_pids = poller.peak_rss["pair_stage"]
    return {"pairs": n, "seconds": seconds,
            "pair_stage_peak_rss_mb": max(pair_pids.values(), default=0) / 2**20,
            "pair_stage_processes": len(pair_pids),
            "read_peak_rss_mb": max(poller.peak_rss["read"].values(), default=0) / 2**20,
            "object_store_peak_mb": poller.peak_store / 2**20, "ray_stats_store_line": peak_store_line}


def memory(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from workflows.ray_setup import init_ray

    _, cfg, _ = configure(args)
    root = Path(args.tmp)
    print(f"== pair-stage memory: synthetic shards under {root}, 1x vs {args.scale}x the train split; "
          f"{args.pairs} pairs per 1x and epoch, 2 epochs (same pairs per shard at every scale); decoded-shard "
          f"cache {cfg.data.decoded_cache_mb:g} MB per pair-stage process", flush=True)
    sizes = {}
    for scale in (1, args.scale):
        t0 = time.perf_counter()
        sizes[scale] = write_synthetic(str(Path(args.data).resolve()), root / f"x{scale}", scale)
        print(f"  wrote {sizes[scale]} images ({scale}x) in {time.perf_counter() - t0:.1f}s", flush=True)
    results = {}
    init_ray()
    try:
        for scale in (1, args.scale):
            r = stream_once(str(root / f"x{scale}"), cfg, args.pairs * scale)
            results[scale] = r
            print(f"  {scale:>3}x: {sizes[scale]} images -> {r['pairs']} pairs in {r['seconds']:.1f}s; "
                  f"pair stage peak RSS {r['pair_stage_peak_rss_mb']:.0f} MB ({r['pair_stage_processes']} "
                  f"process(es)); read tasks peak RSS {r['read_peak_rss_mb']:.0f} MB; object store peak "
                  f"{r['object_store_peak_mb']:.1f} MB", flush=True)
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    one, big = results[1], results[args.scale]
    ratio = big["pair_stage_peak_rss_mb"] / max(one["pair_stage_peak_rss_mb"], 1e-9)
    print("-- result")
    print(f"pair stage peak RSS: 1x {one['pair_stage_peak_rss_mb']:.0f} MB, {args.scale}x "
          f"{big['pair_stage_peak_rss_mb']:.0f} MB, ratio {ratio:.3f} (data ratio {sizes[args.scale] / sizes[1]:.0f}); "
          f"growth {big['pair_stage_peak_rss_mb'] - one['pair_stage_peak_rss_mb']:.0f} MB vs the cache cap "
          f"{cfg.data.decoded_cache_mb:g} MB")
    print(f"object store peak: 1x {one['object_store_peak_mb']:.1f} MB, {args.scale}x {big['object_store_peak_mb']:.1f} MB")
    return {"images": sizes, "results": results, "pair_stage_rss_ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    from siamese_core.config import MODEL_PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "omniglot-shards"))
    parser.add_argument("--preset", default="cpu-small", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--pairs", type=int, default=6000, help="pairs per epoch (before copies)")
    parser.add_argument("--copies", type=int, default=1, help="distorted copies per pair (demo: 1, paper: 8)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shuffle-buffer", type=int, default=None,
                        help="override data.shuffle_buffer_pairs (default: the config's value; 0: none)")
    parser.add_argument("--cache-mb", type=float, default=None,
                        help="data.decoded_cache_mb for the pipeline (default: the config's; 0 decodes every epoch)")
    parser.add_argument("--in-batch-negatives", type=float, default=None,
                        help="training.in_batch_negatives for both loops (default: the demo recipe's)")
    side_by_side_mode = parser.add_mutually_exclusive_group()
    side_by_side_mode.add_argument("--interleave", action="store_true",
                                   help="alternate plain and pipeline epochs in one Train worker "
                                        "(instead of the overhead runs)")
    parser.add_argument("--glibc-malloc", action="store_true",
                        help="leave glibc's adaptive malloc thresholds on both sides "
                             "(training.keep_freed_memory=False; default: the recipe's, kept)")
    side_by_side_mode.add_argument("--alternate", action="store_true",
                                   help="alternate plain epochs (in their own process) with pipeline epochs "
                                        "(instead of the overhead runs)")
    parser.add_argument("--look-ahead", action="store_true",
                        help="with --alternate: the pipeline starts each next epoch's pass during the epoch, "
                             "as the training job does, and waits for its rest before the plain turn "
                             "(counted); default: each pass starts at its turn, its start-up counted")
    parser.add_argument("--turn-poll-ms", type=float, default=50.0,
                        help="with --alternate: how often the waiting side looks for its turn (ms)")
    parser.add_argument("--memory", action="store_true", help="also run the 1x vs --scale memory check")
    parser.add_argument("--no-overhead", action="store_true", help="skip the overhead comparison")
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--tmp", default="/tmp/siamese-bench-shards")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic shards")
    parser.add_argument("--json", help="write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.look_ahead and not args.alternate:
        parser.error("--look-ahead goes with --alternate")
    out: dict[str, Any] = {}
    out["keep_freed_memory"] = not args.glibc_malloc
    print("malloc on both sides: " + ("glibc's adaptive thresholds (--glibc-malloc)" if args.glibc_malloc else
                                      "thresholds fixed by siamese_core.heap (training.keep_freed_memory)"), flush=True)
    if args.interleave:
        out["interleaved"] = interleaved(args)
    elif args.alternate:
        out["alternating"] = alternated(args)
    elif not args.no_overhead:
        out["overhead"] = overhead(args)
    if args.memory:
        out["memory"] = memory(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
