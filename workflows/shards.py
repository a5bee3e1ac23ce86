"""Reading the shards that ``workflows.ingest`` writes; nothing is read without a valid manifest.

- :func:`read_manifest` -- the dataset's manifest (refuses a missing or invalid one).
- :func:`load_split_table` -- one split as a ``pyarrow.Table`` (plain pyarrow, no Ray).
- :func:`read_split_dataset` -- one split as a ``ray.data.Dataset`` (for training).
- :func:`verify` -- re-read every shard and check counts and the content checksum.

Only the shard files the manifest lists are read, never "whatever is in the
folder", so leftovers of an interrupted run can never leak into a split.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import pyarrow as pa

from workflows import storage
from workflows.storage import Location, StorageError

FORMAT = "siamese-oneshot/omniglot-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "validation", "test")

SCHEMA = pa.schema([
    ("image_id", pa.string()),        # stable id: the path in the official archive
    ("alphabet", pa.string()),
    ("character", pa.int32()),        # global character id 1..1623 (from the file name)
    ("character_name", pa.string()),  # "character01", ... within the alphabet
    ("drawer", pa.int8()),            # 1..20
    ("split", pa.string()),           # train / validation / test
    ("image", pa.binary()),           # the PNG bytes, unchanged
])
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)


class DatasetError(RuntimeError):
    """A dataset is missing, unfinished or damaged; the message names the URI."""


def content_checksum_of(digests: Iterable[tuple[str, str]]) -> str:
    """sha256 over ``image_id<TAB>sha256(png)<LF>`` lines sorted by image_id."""
    h = hashlib.sha256()
    for image_id, digest in sorted(digests):
        h.update(f"{image_id}\t{digest}\n".encode())
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class Shard:
    path: str  # relative to the dataset root, e.g. "train/run-..._000000.parquet"
    split: str
    rows: int
    characters: int
    alphabets: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    format: str
    format_version: int
    created: str
    source: dict
    content_checksum: str
    counts: dict
    splits: dict  # split -> {"images", "characters", "alphabets", "alphabet_names"}
    shards: list
    columns: list
    subset: bool = False
    uri: str = field(default="", compare=False)  # where it was read from (not stored)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", [s if isinstance(s, Shard) else Shard(
            path=s["path"], split=s["split"], rows=int(s["rows"]), characters=int(s["characters"]),
            alphabets=tuple(s["alphabets"])) for s in self.shards])

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("uri")
        data["shards"] = [{**asdict(s), "alphabets": list(s.alphabets)} for s in self.shards]
        return data

    def shards_of(self, split: str) -> list[Shard]:
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; choose one of {SPLITS}")
        return [s for s in self.shards if s.split == split]

    def num_images(self, split: str | None = None) -> int:
        return self.counts["images"] if split is None else int(self.splits[split]["images"])

    @staticmethod
    def from_json(data: Any, uri: str = "") -> "Manifest":
        where = uri or "manifest"
        if not isinstance(data, dict):
            raise DatasetError(f"{where}: not a JSON object")
        if data.get("format") != FORMAT:
            raise DatasetError(f"{where}: format {data.get('format')!r} is not {FORMAT!r}")
        if data.get("format_version") != FORMAT_VERSION:
            raise DatasetError(f"{where}: format_version {data.get('format_version')!r} is not "
                               f"{FORMAT_VERSION}; re-run workflows.ingest with --overwrite")
        required = ("created", "source", "content_checksum", "counts", "splits", "shards", "columns")
        missing = [k for k in required if k not in data]
        if missing:
            raise DatasetError(f"{where}: missing keys {missing}")
        try:
            manifest = Manifest(**{k: data[k] for k in required + ("format", "format_version")},
                                subset=bool(data.get("subset", False)), uri=uri)
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{where}: malformed shard list ({exc})") from exc
        if not str(manifest.content_checksum).startswith("sha256:"):
            raise DatasetError(f"{where}: bad content_checksum {manifest.content_checksum!r}")
        if sorted(manifest.splits) != sorted(SPLITS):
            raise DatasetError(f"{where}: splits {sorted(manifest.splits)} are not {sorted(SPLITS)}")
        for split in SPLITS:
            rows = sum(s.rows for s in manifest.shards_of(split))
            if rows != manifest.splits[split].get("images"):
                raise DatasetError(f"{where}: {split} shards hold {rows} rows but the manifest "
                                   f"counts {manifest.splits[split].get('images')} images")
        if sum(s.rows for s in manifest.shards) != manifest.counts.get("images"):
            raise DatasetError(f"{where}: shard rows do not add up to counts.images")
        if any(s.path.startswith("/") or ".." in s.path.split("/") for s in manifest.shards):
            raise DatasetError(f"{where}: shard paths must be relative to the dataset")
        return manifest


def read_manifest_at(loc: Location) -> Manifest:
    manifest_uri = loc.uri_of(MANIFEST_NAME)
    path = loc.join(MANIFEST_NAME)
    try:
        if not storage.exists(loc.fs, path):
            raise DatasetError(f"{loc.uri} is not a finished dataset: {manifest_uri} does not exist "
                               "(run `python -m workflows.ingest --dest URI` first; an interrupted "
                               "ingest leaves no manifest)")
        raw = storage.read_bytes(loc.fs, path)
    except OSError as exc:
        raise storage.explain(exc, manifest_uri, loc.fs) from exc
    try:
        import json

        data = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"{manifest_uri}: not valid JSON ({exc})") from exc
    return Manifest.from_json(data, uri=loc.uri)


def read_manifest(uri: str, endpoint_url: str | None = None) -> Manifest:
    """The manifest of the dataset at ``uri``; DatasetError if missing or invalid."""
    loc = storage.locate(uri, endpoint_url)
    storage.check_bucket(loc.fs, loc.path, loc.uri)  # clear errors for bucket/credentials/endpoint
    return read_manifest_at(loc)


def _split_paths(loc: Location, manifest: Manifest, split: str) -> list[Shard]:
    shards = manifest.shards_of(split)
    if not shards:
        raise DatasetError(f"{loc.uri}: split {split!r} has no shards")
    return shards


def load_split_table(uri: str, split: str, endpoint_url: str | None = None,
                     columns: Sequence[str] | None = None) -> pa.Table:
    """One split as a single pyarrow Table (rows of each shard in order), without Ray."""
    import pyarrow.parquet as pq

    loc = storage.locate(uri, endpoint_url)
    manifest = read_manifest(uri, endpoint_url)
    cols = list(columns) if columns is not None else list(COLUMNS)
    unknown = sorted(set(cols) - set(COLUMNS))
    if unknown:
        raise DatasetError(f"unknown columns {unknown}; available: {list(COLUMNS)}")
    tables = []
    for shard in _split_paths(loc, manifest, split):
        try:
            table = pq.read_table(loc.join(shard.path), columns=cols, filesystem=loc.fs)
        except FileNotFoundError as exc:
            raise DatasetError(f"{loc.uri_of(shard.path)} is listed in the manifest but missing") from exc
        except OSError as exc:
            raise storage.explain(exc, loc.uri_of(shard.path), loc.fs) from exc
        if table.num_rows != shard.rows:
            raise DatasetError(f"{loc.uri_of(shard.path)} has {table.num_rows} rows, manifest says {shard.rows}")
        tables.append(table.replace_schema_metadata(None))
    return pa.concat_tables(tables)


def split_files(uri: str, split: str, endpoint_url: str | None = None) -> tuple[Location, list[str]]:
    """The filesystem location and full paths of a split's shards (for custom readers)."""
    loc = storage.locate(uri, endpoint_url)
    manifest = read_manifest(uri, endpoint_url)
    return loc, [loc.join(s.path) for s in _split_paths(loc, manifest, split)]


def read_split_dataset(uri: str, split: str, endpoint_url: str | None = None,
                       columns: Sequence[str] | None = None, **read_args: Any):
    """One split as a ``ray.data.Dataset`` over exactly the shards the manifest lists.

    The filesystem object is passed explicitly, so Ray workers need no S3
    environment of their own. Extra keyword arguments go to ``ray.data.read_parquet``.
    """
    import ray.data

    loc, paths = split_files(uri, split, endpoint_url)
    ds = ray.data.read_parquet(paths, filesystem=loc.fs, **read_args)
    return ds.select_columns(list(columns)) if columns is not None else ds


def verify(uri: str, endpoint_url: str | None = None) -> Manifest:
    """Re-read every shard: schema, row counts, splits, whole characters, content checksum."""
    import pyarrow.parquet as pq

    loc = storage.locate(uri, endpoint_url)
    manifest = read_manifest(uri, endpoint_url)
    digests: list[tuple[str, str]] = []
    owner: dict[int, str] = {}
    for shard in manifest.shards:
        where = loc.uri_of(shard.path)
        try:
            table = pq.read_table(loc.join(shard.path), filesystem=loc.fs)
        except FileNotFoundError as exc:
            raise DatasetError(f"{where} is listed in the manifest but missing") from exc
        except OSError as exc:
            raise storage.explain(exc, where, loc.fs) from exc
        if table.schema.remove_metadata() != SCHEMA:
            raise DatasetError(f"{where}: schema {table.schema} differs from {SCHEMA}")
        if table.num_rows != shard.rows:
            raise DatasetError(f"{where}: {table.num_rows} rows, manifest says {shard.rows}")
        if set(table.column("split").to_pylist()) - {shard.split}:
            raise DatasetError(f"{where}: holds rows of another split than {shard.split}")
        for c in set(table.column("character").to_pylist()):
            if owner.setdefault(c, shard.path) != shard.path:
                raise DatasetError(f"character {c} is split across {owner[c]} and {shard.path}")
        digests += [(i, hashlib.sha256(png).hexdigest()) for i, png in
                    zip(table.column("image_id").to_pylist(), table.column("image").to_pylist())]
    if len({i for i, _ in digests}) != len(digests):
        raise DatasetError(f"{loc.uri}: duplicate image ids across shards")
    checksum = content_checksum_of(digests)
    if checksum != manifest.content_checksum:
        raise DatasetError(f"{loc.uri}: content checksum {checksum} does not match the manifest's "
                           f"{manifest.content_checksum}")
    return manifest


__all__ = [
    "COLUMNS", "DatasetError", "FORMAT", "FORMAT_VERSION", "MANIFEST_NAME", "Manifest", "SCHEMA",
    "Shard", "StorageError", "content_checksum_of", "load_split_table", "read_manifest",
    "read_manifest_at", "read_split_dataset", "split_files", "verify",
]
