"""``python -m workflows.ingest``: raw Omniglot -> Parquet shards + manifest, with Ray Data.

Source (``--source``): a local folder holding ``images_background.zip`` and
``images_evaluation.zip`` (or the extracted folders), one zip file, or an
http(s) base URL serving both archives (default for the official repository:
``--source official``). Downloads are verified against published checksums
(override them with ``--checksum NAME=ALGO:HEX`` or ``--checksums-file`` for a
mirror) and cached locally.

Destination (``--dest``): a local directory or ``s3://bucket/prefix`` on any
S3-compatible store (credentials from the standard AWS environment variables,
endpoint from ``--endpoint-url`` or ``AWS_ENDPOINT_URL``). Layout::

    DEST/train/<run>_<write>_<task>.parquet        one shard per alphabet
    DEST/validation/...
    DEST/test/...
    DEST/manifest.json                              written last

Rows: image_id (stable relative path), alphabet, character (global id,
1..1623), character_name, drawer (1..20), split (train/validation/test) and
image (PNG bytes, unchanged). Every shard holds whole alphabets, so whole
characters: the pair stage finds "same" partners without a global shuffle.

Every image is decoded (in Ray tasks) before anything is written, the counts
must match the official release exactly (``--allow-subset`` relaxes that for
partial sources), and the written shards are read back and checksummed before
the manifest is written. Re-running with the same content finds the manifest
and does nothing. Any failure leaves no manifest and removes the shards this
run wrote (never other files).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import pyarrow as pa

from siamese_core.omniglot import (EXPECTED_COUNTS, IMAGE_SIZE, SPLITS, CorruptImageError,
                                   OmniglotSourceError, RawImage, decode_png, iter_raw_images,
                                   source_parts)
from workflows import download, shards, storage
from workflows.shards import (COLUMNS, FORMAT, FORMAT_VERSION, MANIFEST_NAME, SCHEMA, DatasetError,
                              Manifest, content_checksum_of)
from workflows.storage import Location, StorageError

DEFAULT_DEST = "./data/omniglot-shards"
DRAWERS = 20
_LAST_BACKGROUND_ID = EXPECTED_COUNTS["images_background"]["characters"]  # ids 1..964
_LAST_EVALUATION_ID = _LAST_BACKGROUND_ID + EXPECTED_COUNTS["images_evaluation"]["characters"]  # ..1623


class IngestError(RuntimeError):
    """Ingest cannot proceed; the message names the file or URI and what to fix."""


@dataclass
class SourceData:
    """Everything read from the raw source, grouped by alphabet (one future shard each)."""

    description: dict
    by_alphabet: dict[str, list[RawImage]]
    digests: dict[str, str]  # image_id -> sha256 hex of PNG bytes
    content_checksum: str
    split_of_alphabet: dict[str, str] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return len(self.digests)


# --------------------------------------------------------------------------- source


def resolve_source(source: str, cache_dir: Path | None, checksums: Mapping[str, str],
                   log: Callable[[str], None]) -> tuple[Path, dict]:
    """``--source`` -> a local path to read, plus a description for the manifest."""
    if source == "official":
        source = download.OFFICIAL_BASE_URL
    if download.is_url(source):
        try:
            folder = download.fetch_archives(source, cache_dir, checksums, log=log)
        except download.DownloadError as exc:
            raise IngestError(str(exc)) from exc
        return folder, {"kind": "url", "uri": source.rstrip("/")}
    path = Path(source).expanduser().resolve()
    return path, {"kind": "local", "uri": str(path)}


def read_source(path: Path, description: dict, log: Callable[[str], None]) -> SourceData:
    try:
        parts = source_parts(path)
    except OmniglotSourceError as exc:
        raise IngestError(str(exc)) from exc
    archives = {}
    for kind, part in parts:
        if kind == "zip":
            archives[part.name] = "sha256:" + download.file_digest(part, "sha256")
    description = {**description, "parts": [p.name for _, p in parts]}
    if archives:
        description["archives"] = archives
    by_alphabet: dict[str, list[RawImage]] = defaultdict(list)
    digests: dict[str, str] = {}
    t0 = time.time()
    try:
        for raw in iter_raw_images(path):
            if raw.path in digests:
                raise IngestError(f"duplicate image {raw.path} in {path}")
            digests[raw.path] = hashlib.sha256(raw.png).hexdigest()
            by_alphabet[raw.alphabet].append(raw)
            if len(digests) % 5000 == 0:
                log(f"[ingest] read {len(digests)} images ...")
    except OmniglotSourceError as exc:
        raise IngestError(str(exc)) from exc
    if not digests:
        raise IngestError(f"no Omniglot images found in {path}")
    log(f"[ingest] read {len(digests)} images of {len(by_alphabet)} alphabets from {path} "
        f"in {time.time() - t0:.1f}s")
    data = SourceData(description=description, by_alphabet=dict(by_alphabet), digests=digests,
                      content_checksum=content_checksum_of(digests.items()))
    for alphabet, rows in data.by_alphabet.items():
        splits = {r.split for r in rows}
        if len(splits) != 1:
            raise IngestError(f"alphabet {alphabet} appears in both archives of {path}")
        data.split_of_alphabet[alphabet] = splits.pop()
    return data


def check_counts(data: SourceData, where: str, allow_subset: bool) -> dict:
    """Structural checks (always) and exact official counts (unless allow_subset)."""
    per_archive: dict[str, dict[str, set]] = defaultdict(lambda: {"images": set(), "characters": set(),
                                                                  "alphabets": set()})
    drawers: dict[int, set[int]] = defaultdict(set)
    names: dict[int, tuple[str, str]] = {}
    for alphabet, rows in data.by_alphabet.items():
        for r in rows:
            archive = "images_background" if r.background else "images_evaluation"
            per_archive[archive]["images"].add(r.path)
            per_archive[archive]["characters"].add(r.character)
            per_archive[archive]["alphabets"].add(alphabet)
            key = (r.alphabet, r.character_name)
            if names.setdefault(r.character, key) != key:
                raise IngestError(f"{where}: character id {r.character} is used by both "
                                  f"{'/'.join(names[r.character])} and {'/'.join(key)} ({r.path})")
            if r.drawer in drawers[r.character]:
                raise IngestError(f"{where}: drawer {r.drawer} twice for character {r.character} ({r.path})")
            if not 1 <= r.drawer <= DRAWERS:
                raise IngestError(f"{where}: drawer {r.drawer} out of range 1..{DRAWERS} ({r.path})")
            drawers[r.character].add(r.drawer)
    counts = {a: {k: len(v) for k, v in c.items()} for a, c in per_archive.items()}
    if not allow_subset:
        missing_files = []
        for character, seen in sorted(drawers.items()):
            alphabet, character_name = names[character]
            archive = "images_background" if character <= _LAST_BACKGROUND_ID else "images_evaluation"
            missing_files += [f"{archive}/{alphabet}/{character_name}/{character:04d}_{d:02d}.png"
                              for d in range(1, DRAWERS + 1) if d not in seen]
        if missing_files:
            more = f" and {len(missing_files) - 5} more" if len(missing_files) > 5 else ""
            raise IngestError(f"{where}: missing image(s) {', '.join(missing_files[:5])}{more} "
                              "(pass --allow-subset for a partial source)")
        missing_ids = sorted(set(range(1, _LAST_EVALUATION_ID + 1)) - set(drawers))
        if missing_ids:
            raise IngestError(f"{where}: {len(missing_ids)} character(s) missing entirely, e.g. id "
                              f"{missing_ids[0]:04d} (pass --allow-subset for a partial source)")
        for archive, expected in EXPECTED_COUNTS.items():
            got = counts.get(archive, {"images": 0, "characters": 0, "alphabets": 0})
            if got != expected:
                raise IngestError(f"{where}: {archive} has {got['images']} images / {got['characters']} "
                                  f"characters / {got['alphabets']} alphabets, expected {expected['images']} / "
                                  f"{expected['characters']} / {expected['alphabets']} (pass --allow-subset "
                                  "for a partial source)")
    return counts


# --------------------------------------------------------------------------- tables


def alphabet_table(rows: list[RawImage]) -> pa.Table:
    """One alphabet's rows, sorted by character then drawer."""
    rows = sorted(rows, key=lambda r: (r.character, r.drawer))
    return pa.table({
        "image_id": pa.array([r.path for r in rows], pa.string()),
        "alphabet": pa.array([r.alphabet for r in rows], pa.string()),
        "character": pa.array([r.character for r in rows], pa.int32()),
        "character_name": pa.array([r.character_name for r in rows], pa.string()),
        "drawer": pa.array([r.drawer for r in rows], pa.int8()),
        "split": pa.array([r.split for r in rows], pa.string()),
        "image": pa.array([r.png for r in rows], pa.binary()),
    }, schema=SCHEMA)


def validate_table(table: pa.Table) -> list[str]:
    """Problems with the table's images (decode failures, wrong size); empty when all are fine."""
    problems = []
    ids = table.column("image_id").to_pylist()
    for image_id, png in zip(ids, table.column("image").to_pylist()):
        try:
            pixels = decode_png(png, path=image_id)
        except CorruptImageError as exc:
            problems.append(str(exc))
            continue
        if pixels.shape != (IMAGE_SIZE, IMAGE_SIZE):
            problems.append(f"image {image_id} is {pixels.shape[1]}x{pixels.shape[0]}, "
                            f"expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    return problems


def validate_on_ray(refs: dict[str, "object"], source: str, log: Callable[[str], None]) -> None:
    """Decode every image in Ray tasks (one per alphabet); raise naming the bad files."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=0)(validate_table)
    t0 = time.time()
    futures = {alphabet: remote.remote(ref) for alphabet, ref in refs.items()}
    problems = [p for alphabet in sorted(futures) for p in ray.get(futures[alphabet])]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise IngestError(f"{len(problems)} bad image(s) in {source}: " + "; ".join(problems[:5]) + more)
    log(f"[ingest] decoded and checked every image in {time.time() - t0:.1f}s")


# --------------------------------------------------------------------------- destination


def _existing_shard_files(loc: Location) -> list[str]:
    files: list[str] = []
    for split in SPLITS:
        files += [f for f in storage.list_files(loc.fs, loc.join(split)) if f.endswith(".parquet")]
    return files


@dataclass(frozen=True)
class DestinationState:
    """What ``--dest`` already holds: a manifest for this content, or a problem to clear."""

    current: Manifest | None  # the manifest already describes this content: nothing to do
    problem: str | None  # another/damaged dataset or stray shards: needs --overwrite
    stale_files: tuple[str, ...] = ()


def inspect_destination(loc: Location, data: SourceData) -> DestinationState:
    """Look at ``--dest`` without changing it."""
    manifest_path = loc.join(MANIFEST_NAME)
    old: Manifest | None = None
    problem = None
    if storage.exists(loc.fs, manifest_path):
        try:
            old = shards.read_manifest_at(loc)
        except DatasetError as exc:
            problem = str(exc)
    if old is not None and old.content_checksum == data.content_checksum:
        missing = [s.path for s in old.shards if not storage.exists(loc.fs, loc.join(s.path))]
        if not missing:
            return DestinationState(current=old, problem=None)
        problem = f"{loc.uri} has a manifest but its shard {missing[0]} is missing"
    elif old is not None:
        problem = (f"{loc.uri} already holds a different dataset (content {old.content_checksum}, "
                   f"source has {data.content_checksum})")
    leftovers = tuple(_existing_shard_files(loc))
    if problem is None and leftovers:
        problem = (f"{loc.uri} has no manifest but already contains shard files such as "
                   f"{loc.uri_of(leftovers[0][len(loc.path) + 1:])} (an interrupted ingest?)")
    return DestinationState(current=None, problem=problem, stale_files=leftovers)


def clear_destination(loc: Location, state: DestinationState, log: Callable[[str], None]) -> None:
    """For --overwrite: remove the old manifest first, then the old shards (only *.parquet
    files under the split folders; nothing else is touched)."""
    log(f"[ingest] --overwrite: {state.problem}; removing the old manifest and "
        f"{len(state.stale_files)} shard file(s)")
    storage.delete_files(loc.fs, [loc.join(MANIFEST_NAME)])
    storage.delete_files(loc.fs, list(state.stale_files))


def _quiet_ray_data() -> None:
    """Our own progress lines are enough; keep Ray Data's per-operator logs at WARNING."""
    import logging

    import ray.data  # noqa: F401  (importing it configures its loggers; adjust afterwards)

    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _run_filenames(token: str):
    """Shard names carry this run's token, so a failed run deletes only its own files."""
    from ray.data.datasource import FilenameProvider

    return FilenameProvider(dataset_uuid=token, file_format="parquet")


def write_shards(loc: Location, refs_by_split: dict[str, list], token: str,
                 log: Callable[[str], None]) -> None:
    import ray.data

    for split in SPLITS:
        refs = refs_by_split.get(split)
        if not refs:
            continue
        t0 = time.time()
        ds = ray.data.from_arrow_refs(refs)
        ds.write_parquet(loc.join(split), filesystem=loc.fs, filename_provider=_run_filenames(token),
                         compression="snappy")
        log(f"[ingest] wrote {split}: {len(refs)} alphabet shard(s) in {time.time() - t0:.1f}s")


def run_files(loc: Location, token: str) -> list[str]:
    return [f for f in _existing_shard_files(loc) if f.rsplit("/", 1)[-1].startswith(f"{token}_")]


def build_manifest(loc: Location, data: SourceData, files: list[str], counts: dict,
                   allow_subset: bool) -> Manifest:
    """Read back the written shards: row counts, whole characters, content checksum."""
    import pyarrow.parquet as pq

    shard_entries = []
    owner: dict[int, str] = {}
    digests: dict[str, str] = {}
    split_stats: dict[str, dict[str, set]] = {s: {"images": set(), "characters": set(), "alphabets": set()}
                                              for s in SPLITS}
    for path in files:
        rel = path[len(loc.path) + 1:]
        table = pq.read_table(path, filesystem=loc.fs, columns=list(COLUMNS))
        split = rel.split("/", 1)[0]
        if table.schema.remove_metadata() != SCHEMA:
            raise IngestError(f"{loc.uri_of(rel)}: unexpected schema {table.schema}")
        if set(table.column("split").to_pylist()) != {split}:
            raise IngestError(f"{loc.uri_of(rel)}: rows of another split in the {split} folder")
        characters = set(table.column("character").to_pylist())
        for c in characters:
            if c in owner:
                raise IngestError(f"character {c} is split across shards {owner[c]} and {rel}")
            owner[c] = rel
        alphabets = sorted(set(table.column("alphabet").to_pylist()))
        for image_id, png in zip(table.column("image_id").to_pylist(), table.column("image").to_pylist()):
            digests[image_id] = hashlib.sha256(png).hexdigest()
        stats = split_stats[split]
        stats["images"].update(table.column("image_id").to_pylist())
        stats["characters"].update(characters)
        stats["alphabets"].update(alphabets)
        shard_entries.append({"path": rel, "split": split, "rows": table.num_rows,
                              "characters": len(characters), "alphabets": alphabets})
    if digests != data.digests:
        missing = sorted(set(data.digests) - set(digests))
        raise IngestError(f"shards written to {loc.uri} do not match the source "
                          f"({len(digests)} rows read back, {len(data.digests)} expected"
                          f"{f', e.g. {missing[0]} missing' if missing else ''})")
    checksum = content_checksum_of(digests.items())
    splits = {s: {"images": len(v["images"]), "characters": len(v["characters"]),
                  "alphabets": len(v["alphabets"]), "alphabet_names": sorted(v["alphabets"])}
              for s, v in split_stats.items()}
    return Manifest(
        format=FORMAT, format_version=FORMAT_VERSION,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        source=data.description, content_checksum=checksum,
        counts={"images": len(digests), "characters": len(owner),
                "alphabets": sum(s["alphabets"] for s in splits.values()), "archives": counts},
        splits=splits, shards=sorted(shard_entries, key=lambda s: s["path"]),
        columns=list(COLUMNS), subset=allow_subset,
    )


def _remove_run_files(loc: Location, token: str, log: Callable[[str], None]) -> None:
    """Best-effort removal of this run's shards; never hides the original error."""
    try:
        written = run_files(loc, token)
        log(f"[ingest] failed; removing the {len(written)} shard file(s) this run wrote")
        storage.delete_files(loc.fs, written)
    except Exception as exc:  # e.g. the endpoint went away mid-write
        log(f"[ingest] could not remove this run's shards ({token}_*) under {loc.uri}: {exc}")


# --------------------------------------------------------------------------- entry points


@dataclass(frozen=True)
class IngestResult:
    manifest: Manifest
    skipped: bool  # True: the destination already held this content; nothing was written


def ingest(source: str, dest: str = DEFAULT_DEST, endpoint_url: str | None = None,
           overwrite: bool = False, allow_subset: bool = False, cache_dir: Path | None = None,
           checksums: Mapping[str, str] | None = None,
           log: Callable[[str], None] = print) -> IngestResult:
    """Library entry point of the CLI; raises IngestError / StorageError on failure."""
    from workflows.ray_setup import ray_session

    t_start = time.time()
    loc = storage.locate(dest, endpoint_url)
    log(f"[ingest] destination {loc.uri} ({loc.fs.type_name})")
    storage.check_writable(loc.fs, loc.path, loc.uri)

    path, description = resolve_source(source, cache_dir, checksums or {}, log)
    data = read_source(path, description, log)
    counts = check_counts(data, str(path), allow_subset)

    state = inspect_destination(loc, data)
    if state.current is not None:
        log(f"[ingest] {loc.uri_of(MANIFEST_NAME)} already describes this content "
            f"({state.current.content_checksum}); nothing to do")
        return IngestResult(state.current, skipped=True)
    if state.problem is not None and not overwrite:
        raise IngestError(f"{state.problem}; pass --overwrite to replace it, or choose another --dest")

    token = f"run-{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    with ray_session():
        import ray

        _quiet_ray_data()

        refs = {a: ray.put(alphabet_table(rows)) for a, rows in sorted(data.by_alphabet.items())}
        validate_on_ray(refs, str(path), log)
        if state.problem is not None:
            clear_destination(loc, state, log)
        refs_by_split: dict[str, list] = defaultdict(list)
        for alphabet, ref in refs.items():
            refs_by_split[data.split_of_alphabet[alphabet]].append(ref)
        try:
            write_shards(loc, refs_by_split, token, log)
            manifest = build_manifest(loc, data, run_files(loc, token), counts, allow_subset)
            storage.write_json(loc.fs, loc.join(MANIFEST_NAME), manifest.to_json())
        except BaseException as exc:
            _remove_run_files(loc, token, log)
            if isinstance(exc, OSError):
                raise storage.explain(exc, loc.uri, loc.fs) from exc
            if isinstance(exc, Exception) and not isinstance(exc, (IngestError, StorageError, DatasetError)):
                raise IngestError(f"writing shards to {loc.uri} failed: {type(exc).__name__}: {exc}") from exc
            raise
    log(f"[ingest] done in {time.time() - t_start:.1f}s: {manifest.counts['images']} images, "
        f"{manifest.counts['characters']} characters, "
        + ", ".join(f"{s} {v['images']}" for s, v in manifest.splits.items())
        + f"; manifest {loc.uri_of(MANIFEST_NAME)}")
    return IngestResult(manifest, skipped=False)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workflows.ingest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True,
                        help="local folder or zip with the raw archives, an http(s) base URL serving "
                             "images_background.zip and images_evaluation.zip, or 'official'")
    parser.add_argument("--dest", default=DEFAULT_DEST,
                        help=f"local directory or s3://bucket/prefix (default {DEFAULT_DEST})")
    parser.add_argument("--endpoint-url", default=None,
                        help="S3 endpoint, e.g. http://127.0.0.1:9000 (default: AWS_ENDPOINT_URL_S3 / "
                             "AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a different or damaged dataset at --dest")
    parser.add_argument("--allow-subset", action="store_true",
                        help="accept a partial source (skip the exact official counts)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"where downloads are kept (default {download.default_cache_dir()})")
    parser.add_argument("--checksum", action="append", default=[], metavar="NAME=ALGO:HEX",
                        help="expected digest of a downloaded archive (repeatable), overriding the "
                             "official one, e.g. images_background.zip=sha256:<hex>")
    parser.add_argument("--checksums-file", type=Path, default=None,
                        help="expected digests in sha256sum/md5sum format, for a mirror")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        checksums: dict[str, str] = {}
        if args.checksums_file:
            checksums.update({k: v for k, v in download.read_checksum_file(args.checksums_file).items()
                              if k in download.ARCHIVE_FILES})
        checksums.update(dict(download.parse_checksum_option(o) for o in args.checksum))
        ingest(args.source, args.dest, endpoint_url=args.endpoint_url, overwrite=args.overwrite,
               allow_subset=args.allow_subset, cache_dir=args.cache_dir, checksums=checksums)
    except (IngestError, StorageError, DatasetError, download.DownloadError, OmniglotSourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
