"""``python -m workflows.ingest``: any labelled image collection -> Parquet shards + manifest, in Ray tasks.

Sources (``--source``; see ``workflows/sources.py``):

* a folder per class, ``ROOT/CLASS/*`` (no flag needed); a folder per group
  above it with ``--groups``; or pre-split ``ROOT/train/``, ``ROOT/val/``,
  ``ROOT/test/``;
* a table (``.csv``, ``.tsv`` or ``.parquet``, local or ``s3://``) of image path
  and label, e.g. Kaggle's whale ``train.csv``; ``--image-column``,
  ``--label-column`` and optional ``--group-column``, ``--source-column``,
  ``--split-column``; images under ``--images-root`` (a folder or ``s3://``
  prefix; default: the table's folder); ``--unknown-label new_whale`` keeps
  such rows but never makes them a class;
* Omniglot: a folder with the two official archives, one archive, or
  ``official`` (downloaded, checksums verified, cached), with Lake's splits.

Any image format Pillow reads, any size and colour mode; the format is found
from the content, never the file name. Every image is read, fully decoded and
checksummed in Ray tasks, one task per shard, each writing its own shard, so
memory holds one shard per task whatever the size of the collection.

Bad input (an unreadable, truncated or empty image; a row naming a missing file
or without a label; an image listed twice; a label that cannot be a file name):
by default ingest stops with an error that names each bad file or row (up to
``--max-problems``), writes no manifest and leaves the destination as it was.
``--skip-bad`` leaves them out instead, lists them in the manifest and says how
many. Nothing is dropped silently.

Splits: a split column or pre-split folders are used as given (``--split-as val=test``
reads one under another name); a missing test split is carved out of a given validation
split, a missing validation (or test) split out of train, by class; otherwise a seeded
split by class, or by group where there are enough groups. No class is ever in two splits.

Destination (``--dest``): a local directory or ``s3://bucket/prefix``::

    DEST/train/<run>-00000.parquet        whole groups, or whole classes, per shard
    DEST/validation/...
    DEST/test/...
    DEST/manifest.json                     written last

Re-running on the same input finds the manifest and does nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from siamese_core.config import NEW_CLASSES
from workflows import cli, download, storage
from workflows.shards import (MANIFEST_NAME, SPLITS, DataSet, DatasetError, Manifest, content_checksum_of,
                              read_manifest_at, schema)
from workflows.sources import (SPLIT_NAMES, Entry, Listing, Problem, SourceError, add_source_arguments,
                               omniglot_problems, open_source, source_table_options)
from workflows.storage import Location, StorageError

DEFAULT_DEST = "./data/shards"
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
MIN_HELD_OUT_CLASSES = 20
"""A seeded split gives validation and test at least this many classes (or a fifth each), for 20-way trials."""
MIN_GROUPS_TO_SPLIT_BY_GROUP = 5


class IngestError(RuntimeError):
    """Ingest cannot proceed; the message names the file or URI and what to fix."""


@dataclass(frozen=True)
class IngestResult:
    manifest: Manifest
    skipped: bool  # True: the destination already held this input; nothing was written


# --------------------------------------------------------------------------- splits


def _held_out(n: int, fraction: float, explicit: bool) -> int:
    if explicit:
        return int(round(fraction * n))
    return max(int(round(fraction * n)), min(MIN_HELD_OUT_CLASSES, n // 5))


def _split_names(names: list[str], fractions: tuple[float, float, float], seed: int, explicit: bool,
                 only: tuple[str, ...] = SPLITS) -> dict[str, str]:
    """A seeded assignment of names (classes or groups) to the splits in ``only``.

    ``only`` is every split (nothing given), or the donor split and those carved from it:
    ("validation", "test") halves a given validation split; ("train", "validation") or
    ("train", "test") takes the missing one from a given train split at its fraction.
    """
    order = np.random.default_rng([seed, 0x5011]).permutation(len(names))
    shuffled = [names[i] for i in order]
    if only == ("validation", "test"):
        cut = len(shuffled) // 2
        if cut == 0:
            raise IngestError(f"the given validation split has {len(names)} class(es), too few to carve a test "
                              "split from; give a test split (folder or split column), or more classes")
        return {n: ("validation" if i < cut else "test") for i, n in enumerate(shuffled)}
    n_val = _held_out(len(names), fractions[1], explicit) if "validation" in only else 0
    n_test = _held_out(len(names), fractions[2], explicit) if "test" in only else 0
    empty = [s for s, n in (("validation", n_val), ("test", n_test)) if s in only and n == 0]
    if empty:
        raise IngestError(f"the split fractions {','.join(map(str, fractions))} give {' and '.join(empty)} no class "
                          f"(or group) of {len(names)}: give more classes, or raise its share with --split-fractions")
    if n_val + n_test >= len(names):
        raise IngestError(f"{len(names)} classes (or groups) cannot be split into train, validation and test; "
                          "give more classes, or split them yourself (pre-split folders or a split column)")
    out = {}
    for i, name in enumerate(shuffled):
        out[name] = "validation" if i < n_val else "test" if i < n_val + n_test else "train"
    return out


def rename_splits(listing: Listing, split_as: Mapping[str, str]) -> None:
    """Read the source's splits under other names (``--split-as val=test``), in place.

    Why: sets are often published as train/ and val/ only; keeping their val/ for the final
    test means validation is carved from train instead, so selecting epochs and thresholds
    never touches the individuals the test reports on.
    """
    if not split_as:
        return
    given = {e.split for e in listing.entries}
    absent = sorted(s for s in split_as if s not in given)
    if absent:
        raise IngestError(f"--split-as names {absent}, which {listing.description.get('uri')} does not give "
                          f"(its splits: {sorted(s for s in given if s) or 'none'})")
    listing.entries = [e if e.split not in split_as else Entry(**{**e.__dict__, "split": split_as[e.split]})
                       for e in listing.entries]


def parse_split_as(texts: list[str]) -> dict[str, str]:
    """``["val=test"]`` -> ``{"validation": "test"}``, each side one of the split names ingest reads."""
    out: dict[str, str] = {}
    for text in texts:
        given, _, wanted = text.partition("=")
        names = [SPLIT_NAMES.get(n.strip().lower()) for n in (given, wanted)]
        if not _ or None in names:
            raise IngestError(f"--split-as takes FOLDER=SPLIT with split names among {sorted(set(SPLIT_NAMES))}, "
                              f"got {text!r}")
        if out.get(names[0], names[1]) != names[1]:
            raise IngestError(f"--split-as reads {names[0]} as both {out[names[0]]} and {names[1]}; give one")
        out[names[0]] = names[1]
    return out


def assign_splits(listing: Listing, fractions: tuple[float, float, float], seed: int,
                  explicit: bool) -> tuple[list[Entry], dict, list[Problem]]:
    """Every entry with a split, the rule used (for the manifest), and problems (a class in two splits)."""
    entries = listing.entries
    unknown = listing.unknown_label
    known = [e for e in entries if e.label != unknown]
    given = {e.split for e in known}
    problems: list[Problem] = []
    if given and None not in given:
        splits_of = defaultdict(set)
        for e in known:
            splits_of[e.label].add(e.split)
        for label, splits in sorted(splits_of.items()):
            if len(splits) > 1:
                problems.append(Problem(f"class {label!r}", f"is in more than one split ({', '.join(sorted(splits))});"
                                                           " a class must be in one split only"))
        missing = [s for s in ("validation", "test") if s not in given]
        rule: dict[str, Any] = {"rule": "given"}
        if "train" not in given:
            raise IngestError(f"{listing.description.get('uri')}: the given splits ({sorted(given)}) have no train "
                              "split")
        if missing:
            donor = "validation" if "validation" in given else "train"
            donor_classes = sorted({e.label for e in known if e.split == donor})
            carve = _split_names(donor_classes, fractions, seed, explicit,
                                 only=("validation", "test") if donor == "validation" else (donor, *missing))
            entries = [e if e.split != donor or e.label == unknown else
                       Entry(**{**e.__dict__, "split": carve[e.label]}) for e in entries]
            rule = {"rule": "given", "carved": {s: f"seeded by class from {donor}" for s in missing}, "seed": seed}
    elif given == {None}:
        by_group = listing.has_group and len({e.group for e in known}) >= MIN_GROUPS_TO_SPLIT_BY_GROUP
        key = (lambda e: e.group) if by_group else (lambda e: e.label)
        names = sorted({key(e) for e in known})
        split_of = _split_names(names, fractions, seed, explicit)
        entries = [e if e.label == unknown else Entry(**{**e.__dict__, "split": split_of[key(e)]}) for e in entries]
        rule = {"rule": f"seeded by {'group' if by_group else 'class'}", "fractions": list(fractions),
                "seed": seed}
    else:
        raise IngestError("some rows have a split and some do not; give every row a split, or none")
    # Unknown individuals (new_whale) are never trained on; without a split of their own they go to the
    # held-out splits, half each, to be recognised as new there.
    rng = np.random.default_rng([seed, 0x0E1E])
    entries = [e if e.label != unknown or e.split is not None else
               Entry(**{**e.__dict__, "split": "validation" if rng.random() < 0.5 else "test"}) for e in entries]
    return entries, rule, problems


# --------------------------------------------------------------------------- shards


def plan_shards(entries: list[Entry], listing: Listing, shard_mb: float, seed: int) -> list[tuple[str, list[Entry]]]:
    """``(split, entries)`` per shard: one group per shard, or whole groups/classes up to ``shard_mb``.

    Within a shard, rows are sorted by (group, label, source, image id). Groups go in sorted
    order; classes without groups in a seeded random order, so each shard holds a random
    subset of the classes (the pair stage draws "different" partners within a shard).
    """
    limit = max(1, int(shard_mb * 2**20))
    plan: list[tuple[str, list[Entry]]] = []
    for split in SPLITS:
        rows = [e for e in entries if e.split == split]
        if not rows:
            continue
        units: dict[str, list[Entry]] = defaultdict(list)
        for e in rows:
            units[e.group if listing.has_group else e.label].append(e)
        names = sorted(units)
        if not listing.has_group:
            names = [names[i] for i in np.random.default_rng([seed, 0x5A4D]).permutation(len(names))]
        current: list[Entry] = []
        size = 0
        for name in names:
            unit = units[name]
            unit_size = sum(max(0, e.size) for e in unit)
            if current and (listing.one_shard_per_group or size + unit_size > limit):
                plan.append((split, current))
                current, size = [], 0
            current += unit
            size += unit_size
        if current:
            plan.append((split, current))
    return [(split, sorted(rows, key=lambda e: (e.group or "", e.label, e.source or "", e.image_id)))
            for split, rows in plan]


def listing_checksum(entries: Sequence[Entry], options: Mapping[str, Any]) -> str:
    """What identifies this input without reading it: ids, labels, splits, sizes, versions, and the options."""
    h = hashlib.sha256(json.dumps(dict(options), sort_keys=True, default=str).encode())
    for e in sorted(entries, key=lambda e: e.image_id):
        h.update(f"{e.image_id}\t{e.label}\t{e.group}\t{e.source}\t{e.split}\t{e.size}\t{e.version}\n".encode())
    return "sha256:" + h.hexdigest()


def write_shard(reader: Any, entries: list[Entry], fs: Any, path: str, table_schema: pa.Schema,
                with_stats: bool, keep_good: bool) -> dict[str, Any]:
    """A Ray task: read, fully decode and checksum a shard's images, then write the good ones.

    Returns the shard's summary (its rows, classes, groups, digests, image modes and sizes,
    pixel statistics for the training split) and its problems. With problems and not
    ``keep_good``, nothing is written: the run fails anyway.
    """
    import pyarrow.parquet as pq

    from siamese_core.images import CorruptImageError, is_gray, open_image, pixel_statistics

    good: list[tuple[Entry, bytes]] = []
    problems: list[Problem] = []
    digests: list[tuple[str, str]] = []
    gray = color = 0
    sizes: list[tuple[int, int]] = []
    stats: dict[str, np.ndarray] = {}
    for entry in entries:
        try:
            data = reader.read(entry.where)
        except FileNotFoundError:
            problems.append(Problem(entry.image_id, "names a missing file"))
            continue
        except OSError as exc:
            problems.append(Problem(entry.image_id, f"cannot be read ({exc})"))
            continue
        try:
            img = open_image(data, entry.image_id)
            if min(img.size) < 1:
                raise CorruptImageError(f"image {entry.image_id} has no pixels")
        except CorruptImageError as exc:
            problems.append(Problem(entry.image_id, str(exc).replace(f" {entry.image_id}", "")))
            continue
        if is_gray(img):
            gray += 1
        else:
            color += 1
        sizes.append(img.size)
        if with_stats:
            for name, value in pixel_statistics(img).items():
                stats[name] = stats[name] + value if name in stats else value
        good.append((entry, data))
        digests.append((entry.image_id, hashlib.sha256(data).hexdigest()))
    summary: dict[str, Any] = {"path": path, "rows": 0, "problems": problems, "digests": digests,
                               "labels": sorted({e.label for e, _ in good}),
                               "groups": sorted({e.group for e, _ in good if e.group is not None}),
                               "sources": sorted({e.source for e, _ in good if e.source is not None}),
                               "gray": gray, "color": color, "sizes": sizes, "stats": stats}
    if not good or (problems and not keep_good):
        return summary
    columns: dict[str, list] = {"image_id": [e.image_id for e, _ in good], "image": [d for _, d in good],
                                "label": [e.label for e, _ in good], "split": [e.split for e, _ in good]}
    if "group" in table_schema.names:
        columns["group"] = [e.group for e, _ in good]
    if "source" in table_schema.names:
        columns["source"] = [e.source for e, _ in good]
    for f in table_schema:
        if f.name not in columns:
            columns[f.name] = [dict(e.extra).get(f.name) for e, _ in good]
    table = pa.table({f.name: pa.array(columns[f.name], f.type) for f in table_schema}, schema=table_schema)
    pq.write_table(table, path, filesystem=fs, compression="snappy")
    written = pq.read_metadata(path, filesystem=fs).num_rows
    if written != table.num_rows:
        raise OSError(f"{path}: wrote {table.num_rows} rows but {written} read back")
    summary["rows"] = written
    return summary


def run_shard_tasks(reader: Any, plan: list[tuple[str, list[Entry]]], loc: Location, token: str,
                    table_schema: pa.Schema, keep_good: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One Ray task per planned shard, in parallel, with a progress line; their summaries in plan order."""
    import ray

    from workflows.progress import Progress

    task = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=[OSError])(write_shard)
    fs = storage.patient(loc.fs)
    if loc.fs.type_name != "s3":
        for split in {s for s, _ in plan}:
            loc.fs.create_dir(loc.join(split), recursive=True)
    futures = {task.remote(reader, rows, fs, loc.join(split, f"{token}-{i:05d}.parquet"), table_schema,
                           split == "train", keep_good): i for i, (split, rows) in enumerate(plan)}
    total = sum(len(rows) for _, rows in plan)
    progress = Progress("ingest: images read and checked", total, stream=sys.stderr)
    results: dict[int, dict[str, Any]] = {}
    bad = 0
    pending = list(futures)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=5.0)
        for ref in ready:
            summary = ray.get(ref)
            results[futures[ref]] = summary
            bad += len(summary["problems"])
            progress.advance(len(plan[futures[ref]][1]), note=f"{bad} bad" if bad else "")
    progress.close()
    return [results[i] for i in range(len(plan))]


# --------------------------------------------------------------------------- destination


def _existing_shard_files(loc: Location) -> list[str]:
    files: list[str] = []
    for split in SPLITS:
        files += [f for f in storage.list_files(loc.fs, loc.join(split)) if f.endswith(".parquet")]
    return files


@dataclass(frozen=True)
class DestinationState:
    """What ``--dest`` already holds: a manifest for this input, or a problem to clear."""

    current: Manifest | None  # the manifest already describes this input: nothing to do
    problem: str | None  # another/damaged data set or stray shards: needs --overwrite
    stale_files: tuple[str, ...] = ()


def inspect_destination(loc: Location, checksum: str) -> DestinationState:
    """Look at ``--dest`` without changing it."""
    old: Manifest | None = None
    problem = None
    if storage.exists(loc.fs, loc.join(MANIFEST_NAME)):
        try:
            old = read_manifest_at(loc)
        except DatasetError as exc:
            problem = str(exc)
    if old is not None and old.listing_checksum == checksum:
        missing = [s.path for s in old.shards if not storage.exists(loc.fs, loc.join(s.path))]
        if not missing:
            return DestinationState(current=old, problem=None)
        problem = f"{loc.uri} has a manifest but its shard {missing[0]} is missing"
    elif old is not None:
        problem = f"{loc.uri} already holds another data set ({old.name}, {old.counts.get('images')} images)"
    leftovers = tuple(_existing_shard_files(loc))
    if problem is None and leftovers:
        problem = (f"{loc.uri} has no manifest but already contains shard files such as "
                   f"{loc.uri_of(leftovers[0][len(loc.path) + 1:])} (an interrupted ingest?)")
    return DestinationState(current=None, problem=problem, stale_files=leftovers)


def _run_files(loc: Location, token: str) -> list[str]:
    return [f for f in _existing_shard_files(loc) if f.rsplit("/", 1)[-1].startswith(f"{token}-")]


def _restore(loc: Location, token: str | None, created_dirs: list[str], log: Callable[[str], None]) -> None:
    """Remove what this run wrote (its shards, the folders it created); never hides the original error."""
    try:
        written = _run_files(loc, token) if token else []
        if written:
            log(f"[ingest] removing the {len(written)} shard file(s) this run wrote")
        storage.delete_files(loc.fs, written)
        for path in reversed(created_dirs):
            try:
                if not storage.list_files(loc.fs, path):
                    loc.fs.delete_dir(path)
            except OSError:
                pass
    except Exception as exc:  # e.g. the endpoint went away mid-write
        log(f"[ingest] could not remove this run's shards ({token}-*) under {loc.uri}: {exc}")


# --------------------------------------------------------------------------- manifest


def preprocessing_defaults(listing: Listing, summaries: list[dict[str, Any]], invert: bool | None) -> dict:
    """The data set's preprocessing defaults: given by the adapter (Omniglot), or read off the images."""
    if listing.preprocessing:
        return dict(listing.preprocessing)
    gray = sum(s["gray"] for s in summaries)
    color = sum(s["color"] for s in summaries)
    square = all(w == h for s in summaries for w, h in s["sizes"])
    totals: dict[str, np.ndarray] = {}
    for s in summaries:
        for name, value in s["stats"].items():
            totals[name] = totals[name] + value if name in totals else value
    mean, std = {}, {}
    for name, (count, total, squares) in ((n, tuple(v)) for n, v in totals.items()):
        m = total / np.maximum(count, 1)
        mean[name] = [round(float(x), 6) for x in m]
        std[name] = [round(float(max(x, 1e-3)), 6) for x in np.sqrt(np.maximum(squares / np.maximum(count, 1) - m * m,
                                                                               0))]
    return {"color": "gray" if color == 0 and gray > 0 else "rgb", "fit": "stretch" if square else "pad",
            "invert": bool(invert) if invert is not None else False, "mean": mean, "std": std}


def build_manifest(listing: Listing, plan: list[tuple[str, list[Entry]]], summaries: list[dict[str, Any]],
                   loc: Location, listing_sum: str, split_rule: dict, rejected: list[Problem],
                   invert: bool | None) -> Manifest:
    shards, digests = [], []
    per_split: dict[str, dict[str, set]] = {s: {"images": set(), "classes": set(), "groups": set(), "sources": set()}
                                            for s in SPLITS}
    unknown = listing.unknown_label
    for (split, _), summary in zip(plan, summaries):
        digests += summary["digests"]
        if summary["rows"] == 0:
            continue
        classes = [label for label in summary["labels"] if label != unknown]
        shards.append({"path": summary["path"][len(loc.path) + 1:], "split": split, "rows": summary["rows"],
                       "classes": len(classes), "groups": summary["groups"]})
        stats = per_split[split]
        stats["images"].update(i for i, _ in summary["digests"])
        stats["classes"].update(classes)
        stats["groups"].update(summary["groups"])
        stats["sources"].update(summary["sources"])
    splits = {s: {"images": len(v["images"]), "classes": len(v["classes"]), "groups": len(v["groups"]),
                  **({"group_names": sorted(v["groups"])} if listing.has_group else {}),
                  **({"source_names": sorted(v["sources"])} if listing.has_source and len(v["sources"]) <= 1000
                     else {})}
              for s, v in per_split.items()}
    sizes = [wh for s in summaries for wh in s["sizes"]]
    widths, heights = (np.asarray([w for w, _ in sizes]), np.asarray([h for _, h in sizes])) if sizes else ([0], [0])
    rows_by_label = Counter(e.label for _, rows in plan for e in rows)
    return Manifest(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), name=listing.name,
        source=listing.description, content_checksum=content_checksum_of(digests), listing_checksum=listing_sum,
        counts={"images": len(digests), "classes": sum(v["classes"] for v in splits.values()),
                "groups": sum(v["groups"] for v in splits.values()),
                "single_image_classes": sum(1 for label, n in rows_by_label.items() if n == 1 and label != unknown),
                **({"unknown_label_images": rows_by_label.get(unknown, 0)} if unknown else {}),
                **({"ignored": dict(listing.ignored)} if listing.ignored else {})},
        splits=splits, shards=sorted(shards, key=lambda s: s["path"]),
        columns={"group": listing.has_group, "source": listing.has_source,
                 "extra": [f.name for f in listing.extra_fields]},
        preprocessing=preprocessing_defaults(listing, summaries, invert),
        image_sizes={"min": [int(np.min(widths)), int(np.min(heights))],
                     "max": [int(np.max(widths)), int(np.max(heights))],
                     "median": [int(np.median(widths)), int(np.median(heights))]},
        split_rule=split_rule, rejected=[{"item": p.item, "reason": p.reason} for p in rejected],
        unknown_label=unknown, new_classes=listing.new_classes,
    )


# --------------------------------------------------------------------------- entry point


class BadInputError(IngestError):
    """Bad images or rows: ingest wrote nothing and left the destination as it was."""

    nothing_changed = True  # exit 2 (workflows.cli) even when found while reading the images


def _problem_error(problems: list[Problem], where: str, limit: int) -> IngestError:
    shown = "\n  ".join(str(p) for p in problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return BadInputError(f"{len(problems)} bad file(s) or row(s) in {where}; nothing was written:\n  {shown}{more}\n"
                       "Fix or remove them, or pass --skip-bad to leave them out (they are then listed in the "
                       "manifest).")


def ingest(source: str, dest: str = DEFAULT_DEST, *, endpoint_url: str | None = None, overwrite: bool = False,
           skip_bad: bool = False, allow_subset: bool = False, cache_dir: Path | None = None,
           checksums: Mapping[str, str] | None = None, kind: str = "auto", groups: bool = False,
           table_options: Mapping[str, Any] | None = None, fractions: tuple[float, float, float] | None = None,
           split_seed: int = 0, shard_mb: float = 64.0, invert: bool | None = None, max_problems: int = 20,
           split_as: Mapping[str, str] | None = None, new_classes: str | None = None,
           log: Callable[[str], None] = print) -> IngestResult:
    """Library entry point of the CLI; raises IngestError / StorageError / DatasetError on failure."""
    from workflows.ray_setup import ray_session

    t_start = time.time()
    loc = storage.locate(dest, endpoint_url)
    log(f"[ingest] destination {loc.uri} ({loc.fs.type_name})")
    created_dirs = [] if loc.is_s3 or storage.exists(loc.fs, loc.path) else [loc.path]
    storage.check_writable(loc.fs, loc.path, loc.uri)
    try:
        listing = open_source(source, kind=kind, groups=groups, endpoint_url=endpoint_url,
                              table_options=dict(table_options or {}),
                              fetch_omniglot=lambda url: download.fetch_archives(
                                  download.OFFICIAL_BASE_URL if url == "official" else url, cache_dir,
                                  checksums or {}, log=log))
    except (SourceError, download.DownloadError):
        _restore(loc, None, created_dirs, log)
        raise
    log(f"[ingest] {listing.kind} source {listing.description.get('uri')}: {len(listing.entries)} images listed"
        + (f" ({', '.join(f'{n} {k}' for k, n in sorted(listing.ignored.items()))} skipped)"
           if listing.ignored else ""))
    if listing.kind == "omniglot":
        structural = omniglot_problems(listing, allow_subset)
        if structural:
            _restore(loc, None, created_dirs, log)
            raise IngestError(f"{listing.description.get('uri')}: " + "; ".join(structural[:5]))
    try:
        rename_splits(listing, split_as or {})
    except IngestError:
        _restore(loc, None, created_dirs, log)
        raise
    explicit = fractions is not None
    try:
        entries, split_rule, split_problems = assign_splits(listing, fractions or DEFAULT_FRACTIONS, split_seed,
                                                            explicit)
    except IngestError:
        _restore(loc, None, created_dirs, log)
        raise
    problems = listing.problems + split_problems
    if split_problems and skip_bad:  # a class in two splits cannot be left out row by row
        _restore(loc, None, created_dirs, log)
        raise _problem_error(split_problems, str(listing.description.get("uri")), max_problems)
    if new_classes is not None:
        listing.new_classes = new_classes
    options = {"kind": listing.kind, "groups": groups, "skip_bad": skip_bad, "shard_mb": shard_mb,
               "invert": invert, "split": split_rule, "unknown_label": listing.unknown_label,
               **({"split_as": dict(split_as)} if split_as else {}),
               **({"new_classes": new_classes} if new_classes is not None else {})}
    checksum = listing_checksum(entries, options)
    if problems and not skip_bad:
        _restore(loc, None, created_dirs, log)
        raise _problem_error(problems, str(listing.description.get("uri")), max_problems)
    state = inspect_destination(loc, checksum)
    if state.current is not None:
        if state.current.new_classes != listing.new_classes:  # a manifest from before the source said it
            manifest = dataclasses.replace(state.current, new_classes=listing.new_classes)
            storage.write_json(loc.fs, loc.join(MANIFEST_NAME), manifest.to_json())
            log(f"[ingest] {loc.uri_of(MANIFEST_NAME)} already describes this input; recorded its "
                f"new_classes={listing.new_classes}")
            return IngestResult(manifest, skipped=True)
        log(f"[ingest] {loc.uri_of(MANIFEST_NAME)} already describes this input; nothing to do")
        return IngestResult(state.current, skipped=True)
    if state.problem is not None and not overwrite:
        raise IngestError(f"{state.problem}; pass --overwrite to replace it, or choose another --dest")

    plan = plan_shards(entries, listing, shard_mb, split_seed)
    table_schema = schema(listing.has_group, listing.has_source, listing.extra_fields)
    token = f"run-{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    new_dirs = [loc.join(s) for s in SPLITS if not loc.is_s3 and not storage.exists(loc.fs, loc.join(s))]
    cli.started_work()
    with ray_session():
        try:
            summaries = run_shard_tasks(listing.reader, plan, loc, token, table_schema, skip_bad, log)
            problems += [p for s in summaries for p in s["problems"]]
            if problems and not skip_bad:
                raise _problem_error(problems, str(listing.description.get("uri")), max_problems)
            manifest = build_manifest(listing, plan, summaries, loc, checksum, split_rule, problems, invert)
            if manifest.counts["images"] == 0:
                raise IngestError(f"no readable image in {listing.description.get('uri')}")
            if state.problem is not None:  # only now: bad input above leaves the old data set as it was
                log(f"[ingest] --overwrite: {state.problem}; removing the old manifest and "
                    f"{len(state.stale_files)} shard file(s)")
                storage.delete_files(loc.fs, [loc.join(MANIFEST_NAME)])
                storage.delete_files(loc.fs, list(state.stale_files))
            storage.write_json(loc.fs, loc.join(MANIFEST_NAME), manifest.to_json())
        except BaseException as exc:
            _restore(loc, token, created_dirs + new_dirs, log)
            if isinstance(exc, OSError):
                raise storage.explain(exc, loc.uri, loc.fs) from exc
            if isinstance(exc, Exception) and not isinstance(exc, (IngestError, StorageError, DatasetError)):
                raise IngestError(f"writing shards to {loc.uri} failed: {type(exc).__name__}: {exc}") from exc
            raise
    if problems:
        log(f"[ingest] left out {len(problems)} bad file(s) or row(s) (--skip-bad); they are listed in the "
            f"manifest under 'rejected'")
    splits = ", ".join(f"{s} {v['images']} images / {v['classes']} classes" for s, v in manifest.splits.items())
    log(f"[ingest] done in {time.time() - t_start:.1f}s: {manifest.counts['images']} images, "
        f"{manifest.counts['classes']} classes ({splits}); manifest {loc.uri_of(MANIFEST_NAME)}")
    return IngestResult(manifest, skipped=False)


def _parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--split-fractions takes TRAIN,VALIDATION,TEST, got {text!r}") from exc
    if len(values) != 3 or any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(f"--split-fractions takes three fractions that add up to 1, got {text!r}")
    return values  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workflows.ingest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True,
                        help="a folder of class folders, a .csv/.tsv/.parquet table (local or s3://), a folder "
                             "with the Omniglot archives, 'official', or an http(s) base URL serving them")
    parser.add_argument("--dest", default=DEFAULT_DEST, help="local directory or s3://bucket/prefix (default: %(default)s)")
    add_source_arguments(parser, "--source")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out bad images and rows (listed in the manifest) instead of stopping")
    parser.add_argument("--max-problems", type=int, default=20, help="bad files or rows named in the error "
                                                                     "(default: %(default)s)")
    parser.add_argument("--split-fractions", type=_parse_fractions, default=None, metavar="TRAIN,VAL,TEST",
                        help="fractions of classes (or groups) for a seeded split (default 0.7,0.15,0.15, with at "
                             f"least {MIN_HELD_OUT_CLASSES} classes or a fifth each for validation and test)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the split (default: %(default)s)")
    parser.add_argument("--split-as", action="append", default=[], metavar="FOLDER=SPLIT",
                        help="read a given split under another name, e.g. val=test to keep a published val/ "
                             "for the final test and carve validation from train (repeatable; default: none)")
    parser.add_argument("--invert", action=argparse.BooleanOptionalAction, default=None,
                        help="record that dark strokes on a light background are the content (signatures, "
                             "handwriting), so models invert the pixels (default: no, as for photographs)")
    parser.add_argument("--new-classes", choices=sorted(NEW_CLASSES), default=None,
                        help="record that a turned (rot90) or also mirrored (dihedral) image is another class, as "
                             "for characters and symbols, so training makes more classes from each "
                             "(pairs.new_classes; default: Omniglot's rot90, else unchanged)")
    parser.add_argument("--shard-mb", type=float, default=64.0,
                        help="shard size for classes without groups, in MB of image files (default: %(default)s)")
    parser.add_argument("--endpoint-url", default=None,
                        help="S3 endpoint, e.g. http://127.0.0.1:9000 (default: AWS_ENDPOINT_URL_S3 / "
                             "AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--overwrite", action="store_true", help="replace a different or damaged data set at --dest")
    parser.add_argument("--allow-subset", action="store_true",
                        help="Omniglot: accept a partial source (skip the exact official counts)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"where downloads are kept (default {download.default_cache_dir()})")
    parser.add_argument("--checksum", action="append", default=[], metavar="NAME=ALGO:HEX",
                        help="expected digest of a downloaded archive (repeatable), overriding the official one (default: the official digests)")
    parser.add_argument("--checksums-file", type=Path, default=None,
                        help="expected digests in sha256sum/md5sum format, for a mirror (default: none)")
    cli.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli.run(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cli.configure_console(args.verbose)
    checksums: dict[str, str] = {}
    if args.checksums_file:
        checksums.update({k: v for k, v in download.read_checksum_file(args.checksums_file).items()
                          if k in download.ARCHIVE_FILES})
    checksums.update(dict(download.parse_checksum_option(o) for o in args.checksum))
    table_options = source_table_options(args)
    ingest(args.source, args.dest, endpoint_url=args.endpoint_url, overwrite=args.overwrite,
           skip_bad=args.skip_bad, allow_subset=args.allow_subset, cache_dir=args.cache_dir,
           checksums=checksums, kind=args.kind, groups=args.groups, table_options=table_options,
           fractions=args.split_fractions, split_seed=args.split_seed, shard_mb=args.shard_mb,
           invert=args.invert, max_problems=args.max_problems, split_as=parse_split_as(args.split_as),
           new_classes=args.new_classes)
    return 0


if __name__ == "__main__":
    # through the package module, so the errors raised are the classes workflows.cli knows
    from workflows.ingest import main as entry

    sys.exit(entry())
