"""A data set written by ``workflows.ingest``: its manifest, its shards, and one handle to read them.

Open a data set once with :meth:`DataSet.open` (its location, filesystem and
manifest, one round trip to the store) and pass the handle down: the pair
stage, the Train workers, evaluation and Tune trials ask it for shard paths,
tables and decoded images instead of reading the manifest again. The handle
pickles, so Ray ships it to workers as it is.

Only the shard files the manifest lists are read, never "whatever is in the
folder", so leftovers of an interrupted run can never leak into a split.

The data model, for any labelled image collection: every row has a stable
``image_id``, the encoded ``image`` bytes (unchanged), its class ``label`` and
its ``split``; optionally a ``group`` (classes compared with each other, like
Omniglot's alphabets) and a ``source`` (what made the image: a drawer, a
camera); and the source's own extra columns, passed through. A shard holds
whole groups where there are groups, else whole classes, so the pair stage
finds "same" partners without a global shuffle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa

from siamese_core.config import PreprocessConfig
from siamese_core.images import LabelledImages
from workflows import storage
from workflows.storage import Location, StorageError

FORMAT = "siamese-oneshot/shards"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "validation", "test")
OPTIONAL_COLUMNS = ("group", "source")

REQUIRED_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),  # stable: the path in the source
    pa.field("image", pa.binary(), nullable=False),  # the encoded bytes, unchanged
    pa.field("label", pa.string(), nullable=False),  # the class; or the data set's unknown label
    pa.field("split", pa.string(), nullable=False),  # train / validation / test
]


def schema(has_group: bool, has_source: bool, extra: Sequence[pa.Field] = ()) -> pa.Schema:
    """The shard schema: the required columns, the optional ones the data set has, then its extras."""
    fields = list(REQUIRED_FIELDS)
    if has_group:
        fields.append(pa.field("group", pa.string(), nullable=False))
    if has_source:
        fields.append(pa.field("source", pa.string(), nullable=False))
    return pa.schema(fields + list(extra))


class DatasetError(RuntimeError):
    """A data set is missing, unfinished or damaged; the message names the URI."""


def content_checksum_of(digests: Iterable[tuple[str, str]]) -> str:
    """sha256 over ``image_id<TAB>sha256(image)<LF>`` lines sorted by image_id."""
    h = hashlib.sha256()
    for image_id, digest in sorted(digests):
        h.update(f"{image_id}\t{digest}\n".encode())
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class Shard:
    path: str  # relative to the data set root, e.g. "train/run-..._00003.parquet"
    split: str
    rows: int
    classes: int
    groups: tuple[str, ...] = ()  # the groups it holds (whole), where the data set has groups


@dataclass(frozen=True)
class Manifest:
    """What ingest wrote: counts, splits, shards, columns, preprocessing defaults, what it left out."""

    created: str
    name: str
    source: dict
    content_checksum: str
    listing_checksum: str
    counts: dict
    splits: dict  # split -> {"images", "classes", "groups", "group_names"}
    shards: list
    columns: dict  # {"group": bool, "source": bool, "extra": [names]}
    preprocessing: dict  # the data set's defaults for siamese_core.config.PreprocessConfig
    image_sizes: dict = field(default_factory=dict)
    split_rule: dict = field(default_factory=dict)
    rejected: list = field(default_factory=list)  # [{"item": ..., "reason": ...}] left out with --skip-bad
    unknown_label: str | None = None
    new_classes: str = "unchanged"  # the default of siamese_core.config.PairConfig.new_classes for this data
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    uri: str = field(default="", compare=False)  # where it was read from (not stored)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", [s if isinstance(s, Shard) else Shard(
            path=s["path"], split=s["split"], rows=int(s["rows"]), classes=int(s["classes"]),
            groups=tuple(s.get("groups", ()))) for s in self.shards])

    @property
    def has_group(self) -> bool:
        return bool(self.columns.get("group"))

    @property
    def has_source(self) -> bool:
        return bool(self.columns.get("source"))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("uri")
        data["shards"] = [{**asdict(s), "groups": list(s.groups)} for s in self.shards]
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
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise DatasetError(f"{where}: format {data.get('format')!r} version {data.get('format_version')!r} is "
                               f"not {FORMAT!r} version {FORMAT_VERSION}; re-run workflows.ingest with --overwrite")
        required = ("created", "name", "source", "content_checksum", "listing_checksum", "counts", "splits",
                    "shards", "columns", "preprocessing")
        missing = [k for k in required if k not in data]
        if missing:
            raise DatasetError(f"{where}: missing keys {missing}")
        optional = ("image_sizes", "split_rule", "rejected", "unknown_label", "new_classes")
        try:
            manifest = Manifest(**{k: data[k] for k in required}, **{k: data[k] for k in optional if k in data},
                                uri=uri)
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
            raise DatasetError(f"{where}: shard paths must be relative to the data set")
        return manifest


def read_manifest_at(loc: Location) -> Manifest:
    """The manifest under ``loc`` (one read); DatasetError if it is missing or invalid."""
    manifest_uri = loc.uri_of(MANIFEST_NAME)
    path = loc.join(MANIFEST_NAME)
    try:
        if not storage.exists(loc.fs, path):
            raise DatasetError(f"{loc.uri} is not a finished data set: {manifest_uri} does not exist "
                               "(run `python -m workflows.ingest --source ... --dest URI` first; an interrupted "
                               "ingest leaves no manifest)")
        raw = storage.read_bytes(loc.fs, path)
    except OSError as exc:
        raise storage.explain(exc, manifest_uri, loc.fs) from exc
    try:
        data = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"{manifest_uri}: not valid JSON ({exc})") from exc
    return Manifest.from_json(data, uri=loc.uri)


@dataclass(frozen=True)
class DataSet:
    """An ingested data set, opened once: where it is, its filesystem, its manifest."""

    loc: Location
    manifest: Manifest

    @staticmethod
    def open(uri: str, endpoint_url: str | None = None) -> "DataSet":
        """Resolve ``uri``, check the bucket (clear errors for bucket, credentials, endpoint), read the manifest."""
        loc = storage.locate(uri, endpoint_url)
        storage.check_bucket(loc.fs, loc.path, loc.uri)
        return DataSet(loc, read_manifest_at(loc))

    @property
    def uri(self) -> str:
        return self.loc.uri

    @property
    def name(self) -> str:
        return self.manifest.name

    def shard_paths(self, split: str) -> list[str]:
        """Full paths of a split's shards, in the manifest's order; DatasetError when it has none."""
        shards = self.manifest.shards_of(split)
        if not shards:
            raise DatasetError(f"{self.uri}: split {split!r} has no shards")
        return [self.loc.join(s.path) for s in shards]

    def columns(self, extra: bool = False) -> list[str]:
        """The columns this data set's shards have (the extras only when asked for)."""
        cols = [f.name for f in REQUIRED_FIELDS] + [c for c in OPTIONAL_COLUMNS if self.manifest.columns.get(c)]
        return cols + (list(self.manifest.columns.get("extra", [])) if extra else [])

    def read_shard(self, path: str, columns: Sequence[str] | None = None) -> pa.Table:
        """One shard (a full path from :meth:`shard_paths`) as a table, its row count checked."""
        import pyarrow.parquet as pq

        rel = path[len(self.loc.path) + 1:]
        where = self.loc.uri_of(rel)
        expected = next((s.rows for s in self.manifest.shards if s.path == rel), None)
        try:
            table = pq.read_table(path, columns=list(columns) if columns is not None else None, filesystem=self.loc.fs)
        except FileNotFoundError as exc:
            raise DatasetError(f"{where} is listed in the manifest but missing") from exc
        except OSError as exc:
            raise storage.explain(exc, where, self.loc.fs) from exc
        if expected is not None and table.num_rows != expected:
            raise DatasetError(f"{where} has {table.num_rows} rows, the manifest says {expected}")
        return table.replace_schema_metadata(None)

    def read_table(self, split: str, columns: Sequence[str] | None = None, with_shard: bool = False) -> pa.Table:
        """One split as a single pyarrow Table (the shards' rows in order), without Ray.

        ``with_shard`` adds a ``shard`` column: each row's shard index within the split.
        """
        cols = list(columns) if columns is not None else self.columns(extra=True)
        unknown = sorted(set(cols) - set(self.columns(extra=True)))
        if unknown:
            raise DatasetError(f"{self.uri} has no columns {unknown}; it has {self.columns(extra=True)}")
        tables = []
        for index, path in enumerate(self.shard_paths(split)):
            table = self.read_shard(path, cols)
            if with_shard:
                table = table.append_column("shard", pa.array(np.full(table.num_rows, index, np.int64)))
            tables.append(table)
        return pa.concat_tables(tables)

    def load_images(self, split: str, size: int, preprocess: PreprocessConfig,
                    include_unknown: bool = False) -> LabelledImages:
        """One split decoded as a model sees it (its input ``size`` and ``preprocess``), with labels.

        Rows with the data set's unknown label (``new_whale``) are no class, so they are left out
        unless asked for.
        """
        cols = ["image", "image_id", "label"] + [c for c in OPTIONAL_COLUMNS if self.manifest.columns.get(c)]
        table = self.read_table(split, cols, with_shard=True)
        if not include_unknown and self.manifest.unknown_label is not None:
            import pyarrow.compute as pc

            table = table.filter(pc.not_equal(table.column("label"), self.manifest.unknown_label))
        data = table.to_pydict()
        return LabelledImages.decode(data["image"], data["label"], data["image_id"],
                                     preprocess.resolved(self.manifest.preprocessing), size,
                                     groups=data.get("group"), sources=data.get("source"), shards=data["shard"])

    def ray_dataset(self, split: str, columns: Sequence[str] | None = None, **read_args: Any) -> Any:
        """One split as a ``ray.data.Dataset`` over exactly the shards the manifest lists.

        The filesystem object is passed explicitly, so Ray workers need no S3 environment of their own.
        """
        import ray.data

        ds = ray.data.read_parquet(self.shard_paths(split), filesystem=self.loc.fs, **read_args)
        return ds.select_columns(list(columns)) if columns is not None else ds

    def class_count(self, split: str) -> int:
        return int(self.manifest.splits[split]["classes"])

    def group_count(self, split: str) -> int:
        return int(self.manifest.splits[split].get("groups", 0))

    def verify(self) -> Manifest:
        """Re-read every shard: schema, row counts, splits, whole classes and groups, content checksum."""
        digests: list[tuple[str, str]] = []
        owner: dict[str, str] = {}
        group_owner: dict[str, str] = {}
        for shard in self.manifest.shards:
            where = self.loc.uri_of(shard.path)
            table = self.read_shard(self.loc.join(shard.path))
            missing = sorted(set(self.columns(extra=True)) - set(table.column_names))
            if missing:
                raise DatasetError(f"{where}: columns {missing} are missing")
            if set(table.column("split").to_pylist()) - {shard.split}:
                raise DatasetError(f"{where}: holds rows of another split than {shard.split}")
            for label in set(table.column("label").to_pylist()) - {self.manifest.unknown_label}:
                if owner.setdefault(label, shard.path) != shard.path:
                    raise DatasetError(f"class {label!r} is split across {owner[label]} and {shard.path}")
            if self.manifest.has_group:
                for group in set(table.column("group").to_pylist()):
                    if group_owner.setdefault(group, shard.path) != shard.path:
                        raise DatasetError(f"group {group!r} is split across {group_owner[group]} and {shard.path}")
            digests += [(i, hashlib.sha256(data).hexdigest()) for i, data in
                        zip(table.column("image_id").to_pylist(), table.column("image").to_pylist())]
        if len({i for i, _ in digests}) != len(digests):
            raise DatasetError(f"{self.uri}: duplicate image ids across shards")
        checksum = content_checksum_of(digests)
        if checksum != self.manifest.content_checksum:
            raise DatasetError(f"{self.uri}: content checksum {checksum} does not match the manifest's "
                               f"{self.manifest.content_checksum}")
        return self.manifest


__all__ = [
    "DataSet", "DatasetError", "FORMAT", "FORMAT_VERSION", "MANIFEST_NAME", "Manifest", "OPTIONAL_COLUMNS",
    "REQUIRED_FIELDS", "SPLITS", "Shard", "StorageError", "content_checksum_of", "read_manifest_at", "schema",
]
