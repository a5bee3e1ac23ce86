"""Where ingest finds images and their labels: a folder tree, a table, or the Omniglot archives.

Each source turns into a :class:`Listing`: one :class:`Entry` per image (its id,
where its bytes are, its label and optional group, source and split), the
problems found while listing (a row without a label, a missing file, an image
listed twice, a label that cannot be a file name), and a picklable reader that
Ray tasks use to fetch the bytes. Nothing here decodes an image: that happens in
ingest's Ray tasks, in parallel.

* **Folders**: ``ROOT/CLASS/*`` (no flag needed), ``ROOT/GROUP/CLASS/*``
  (``groups=True``), or pre-split ``ROOT/train/...``, ``ROOT/val/...``,
  ``ROOT/test/...`` (found by the folder names). A class folder may hold
  subfolders; hidden files and folders are skipped and counted.
* **A table**: a CSV or Parquet file of image path and label, with optional
  group, source and split columns; the images in a local folder or under an
  ``s3://`` prefix; every other column passes through. A configurable label
  (Kaggle's ``new_whale``) marks unknown individuals: kept, never a class.
* **Omniglot**: the two official archives (or their extracted folders), with
  Lake's splits and the exact official counts.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa

from siamese_core import omniglot
from siamese_core.config import PAPER_PREPROCESS

SPLIT_NAMES = {"train": "train", "val": "validation", "validation": "validation", "valid": "validation",
               "dev": "validation", "test": "test"}
"""Folder names and split-column values ingest reads as a split (case-insensitive)."""

_RESERVED = set('/\\<>:"|?*')



class SourceError(RuntimeError):
    """The source cannot be listed at all (missing folder, unreadable table); the message says what to fix."""


@dataclass(frozen=True)
class Problem:
    """One bad file or row: what it is and why."""

    item: str
    reason: str

    def __str__(self) -> str:
        return f"{self.item}: {self.reason}"


@dataclass(frozen=True)
class Entry:
    """One image to ingest: its stable id, where its bytes are (for the listing's reader), its labels."""

    image_id: str
    where: str
    size: int
    label: str
    group: str | None = None
    source: str | None = None
    split: str | None = None
    extra: tuple[tuple[str, Any], ...] = ()
    version: str = ""  # what identifies these bytes without reading them (mtime, CRC): the listing checksum


class LocalReader:
    """Bytes of local files."""

    def read(self, where: str) -> bytes:
        with open(where, "rb") as f:
            return f.read()


class ZipReader:
    """Bytes of members of local zip archives (``archive!member``); one open archive per process."""

    def __init__(self) -> None:
        self._open: dict[str, zipfile.ZipFile] = {}

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, _state: dict) -> None:
        self._open = {}

    def read(self, where: str) -> bytes:
        archive, member = where.split("!", 1)
        if archive not in self._open:
            self._open[archive] = zipfile.ZipFile(archive)
        return self._open[archive].read(member)


class FileSystemReader:
    """Bytes from a pyarrow filesystem (S3, or local through pyarrow)."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def read(self, where: str) -> bytes:
        with self.fs.open_input_stream(where) as src:
            return src.read()


@dataclass
class Listing:
    """Everything ingest needs from a source before it reads any image."""

    name: str
    kind: str
    description: dict
    entries: list[Entry]
    problems: list[Problem]
    reader: Any
    has_group: bool
    has_source: bool
    extra_fields: list[pa.Field] = field(default_factory=list)
    preprocessing: dict = field(default_factory=dict)
    unknown_label: str | None = None
    new_classes: str = "unchanged"  # the manifest's: what a turn or a mirror makes of a class
    ignored: dict[str, int] = field(default_factory=dict)  # reason -> count (hidden files, stray files)
    one_shard_per_group: bool = False

    @property
    def splits_given(self) -> bool:
        return bool(self.entries) and all(e.split is not None for e in self.entries)


def label_problem(label: str | None) -> str | None:
    """Why ``label`` cannot be a class (no label, or not usable as a folder or file name), else None."""
    if label is None or not str(label).strip():
        return "has no label"
    label = str(label)
    if label in (".", ".."):
        return f"label {label!r} cannot be a folder or file name"
    bad = sorted({c for c in label if c in _RESERVED or ord(c) < 32})
    if bad:
        return f"label {label!r} cannot be a folder or file name (it contains {''.join(bad)!r})"
    if len(label.encode()) > 255:
        return f"label {label[:40]!r}... is longer than 255 bytes, too long for a file name"
    if label != label.strip():
        return f"label {label!r} starts or ends with spaces"
    return None


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_files(folder: Path, root: Path, ignored: dict[str, int]) -> list[Path]:
    """Every non-hidden regular file below ``folder``, sorted; hidden ones counted in ``ignored``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        hidden_dirs = [d for d in dirnames if _hidden(d)]
        if hidden_dirs:
            ignored["hidden folders"] = ignored.get("hidden folders", 0) + len(hidden_dirs)
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for name in sorted(filenames):
            if _hidden(name):
                ignored["hidden files"] = ignored.get("hidden files", 0) + 1
            else:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _subfolders(folder: Path, root: Path, ignored: dict[str, int], what: str) -> list[Path]:
    """The non-hidden subfolders of ``folder``; files beside them are counted as not in a class folder."""
    out = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if _hidden(entry.name):
            ignored["hidden files" if entry.is_file() else "hidden folders"] = \
                ignored.get("hidden files" if entry.is_file() else "hidden folders", 0) + 1
        elif entry.is_dir():
            out.append(entry)
        else:
            key = f"files outside a {what} folder"
            ignored[key] = ignored.get(key, 0) + 1
    return out


def list_folder(root: Path | str, groups: bool = False) -> Listing:
    """A folder per class (``ROOT/CLASS/*``), with ``groups`` a folder per group above it, maybe pre-split."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise SourceError(f"source folder {root} does not exist or is not a folder")
    ignored: dict[str, int] = {}
    scanned: dict[tuple[Path, str], list[Path]] = {}

    def subfolders(folder: Path, what: str) -> list[Path]:  # each folder is scanned (and counted) once
        if (folder, what) not in scanned:
            scanned[(folder, what)] = _subfolders(folder, root, ignored, what)
        return scanned[(folder, what)]

    top = subfolders(root, "group" if groups else "class")
    presplit = bool(top) and all(d.name.lower() in SPLIT_NAMES for d in top) and \
        any(SPLIT_NAMES[d.name.lower()] == "train" for d in top)
    tops = [(SPLIT_NAMES[d.name.lower()], d) for d in top] if presplit else [(None, root)]
    if presplit and len({s for s, _ in tops}) != len(tops):
        raise SourceError(f"{root} has two folders for one split ({', '.join(d.name for _, d in tops)})")
    entries: list[Entry] = []
    problems: list[Problem] = []
    for split, base in tops:
        levels = [(gdir.name, gdir) for gdir in subfolders(base, "group")] if groups else [(None, base)]
        for group, gdir in levels:
            if group is not None and (why := label_problem(group)):
                problems.append(Problem(gdir.relative_to(root).as_posix(), f"group {why.removeprefix('label ')}"))
                continue
            for cdir in subfolders(gdir, "class"):
                label = f"{group}.{cdir.name}" if group is not None else cdir.name
                why = label_problem(cdir.name)
                files = _walk_files(cdir, root, ignored)
                if why:
                    problems.append(Problem(cdir.relative_to(root).as_posix(), why))
                    continue
                for path in files:
                    stat = path.stat()
                    entries.append(Entry(image_id=path.relative_to(root).as_posix(), where=str(path),
                                         size=stat.st_size, label=label, group=group, split=split,
                                         version=str(stat.st_mtime_ns)))
    if not entries and not problems:
        raise SourceError(f"{root} holds no images in class folders (expected ROOT/CLASS/IMAGE"
                          f"{', ROOT/GROUP/CLASS/IMAGE with --groups' if not groups else ''}, "
                          "or ROOT/train/CLASS/IMAGE, ROOT/val/..., ROOT/test/...)")
    return Listing(name=root.name, kind="folder",
                   description={"kind": "folder", "uri": str(root), "groups": groups, "presplit": presplit},
                   entries=entries, problems=problems, reader=LocalReader(), has_group=groups, has_source=False,
                   ignored=ignored)


IMAGE_COLUMN_NAMES = ("image", "path", "file", "filename", "file_name", "image_path")
LABEL_COLUMN_NAMES = ("label", "class", "id", "identity", "individual")


def _pick_column(names: Sequence[str], asked: str | None, candidates: Sequence[str], what: str, flag: str,
                 where: str) -> str:
    if asked is not None:
        if asked not in names:
            raise SourceError(f"{where} has no column {asked!r} ({flag}); its columns are {list(names)}")
        return asked
    lower = {n.lower(): n for n in names}
    for c in candidates:
        if c in lower:
            return lower[c]
    raise SourceError(f"{where}: which column holds the {what}? Name it with {flag}; the columns are {list(names)}")


def _read_table(uri: str, endpoint_url: str | None) -> tuple[pa.Table, Any, str]:
    """The table at a local path or s3:// URI, its filesystem, and its folder."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from workflows import storage

    loc = storage.locate(uri, endpoint_url)
    suffix = posixpath.splitext(loc.path)[1].lower()
    try:
        if suffix == ".parquet":
            table = pq.read_table(loc.path, filesystem=loc.fs)
        elif suffix in (".csv", ".tsv", ".txt"):
            with loc.fs.open_input_stream(loc.path) as src:
                opts = pcsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
                # Every column as text first: ids like "0001" must not turn into numbers.
                table = pcsv.read_csv(src, parse_options=opts,
                                      convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
        else:
            raise SourceError(f"{uri}: a table source must be a .csv, .tsv or .parquet file")
    except FileNotFoundError as exc:
        raise SourceError(f"table {uri} does not exist") from exc
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, OSError) and loc.is_s3:
            raise SourceError(str(storage.explain(exc, uri, loc.fs))) from exc
        raise SourceError(f"cannot read table {uri}: {exc}") from exc
    return table, loc, posixpath.dirname(loc.path)


def list_table(uri: str, image_column: str | None = None, label_column: str | None = None,
               group_column: str | None = None, source_column: str | None = None, split_column: str | None = None,
               images_root: str | None = None, unknown_label: str | None = None,
               endpoint_url: str | None = None) -> Listing:
    """A CSV or Parquet table of image path and label (e.g. Kaggle's whale ``train.csv``: ``Image,Id``)."""
    from workflows import storage

    table, loc, folder = _read_table(uri, endpoint_url)
    names = table.column_names
    image_col = _pick_column(names, image_column, IMAGE_COLUMN_NAMES, "image paths", "--image-column", uri)
    label_col = _pick_column(names, label_column, LABEL_COLUMN_NAMES, "labels", "--label-column", uri)
    optional = {"group": group_column, "source": source_column, "split": split_column}
    for flag, col in optional.items():
        if col is not None and col not in names:
            raise SourceError(f"{uri} has no column {col!r} (--{flag}-column); its columns are {names}")
    used = {image_col, label_col, *[c for c in optional.values() if c]}
    extra_fields = [table.schema.field(n) for n in names if n not in used and n not in ("image", "image_id")]
    root_loc = storage.locate(images_root, endpoint_url) if images_root else loc
    root_path = root_loc.path if images_root else folder
    columns = {n: table.column(n).to_pylist() for n in names}
    problems: list[Problem] = []
    entries: list[Entry] = []
    first_row: dict[str, int] = {}
    paths = []
    for i in range(table.num_rows):
        raw_path = columns[image_col][i]
        item = f"row {i + 2} of {posixpath.basename(loc.path)}"  # +2: a header line, then rows from 1
        if raw_path is None or not str(raw_path).strip():
            problems.append(Problem(item, "has no image path"))
            paths.append(None)
            continue
        raw_path = str(raw_path).strip()
        if raw_path in first_row:
            problems.append(Problem(f"{item} ({raw_path})", f"lists an image listed twice (first at row "
                                                           f"{first_row[raw_path] + 2})"))
            paths.append(None)
            continue
        first_row[raw_path] = i
        label = columns[label_col][i]
        label = None if label is None else str(label).strip()
        why = None if unknown_label is not None and label == unknown_label else label_problem(label)
        if why:
            problems.append(Problem(f"{item} ({raw_path})", why))
            paths.append(None)
            continue
        split = None
        if split_column:
            value = columns[split_column][i]
            split = SPLIT_NAMES.get(str(value).strip().lower()) if value is not None else None
            if split is None:
                problems.append(Problem(f"{item} ({raw_path})", f"split {value!r} is not one of "
                                                               f"{sorted(set(SPLIT_NAMES))}"))
                paths.append(None)
                continue
        path = raw_path if "://" in raw_path else (raw_path if raw_path.startswith("/") else
                                                   posixpath.join(root_path, raw_path))
        if "://" in raw_path:
            path = storage.locate(raw_path, endpoint_url).path
        paths.append(path)
        group = columns[group_column][i] if group_column else None
        source = columns[source_column][i] if source_column else None
        for what, value in (("group", group), ("source", source)):
            if optional[what] and (value is None or not str(value).strip()):
                problems.append(Problem(f"{item} ({raw_path})", f"has no {what}"))
        entries.append(Entry(image_id=raw_path, where=path, size=-1, label=label or "",
                             group=None if group is None else str(group).strip(),
                             source=None if source is None else str(source).strip(), split=split,
                             extra=tuple((f.name, columns[f.name][i]) for f in extra_fields)))
    entries, missing = _with_sizes(entries, root_loc.fs)
    problems += missing
    return Listing(name=posixpath.splitext(posixpath.basename(loc.path))[0], kind="table",
                   description={"kind": "table", "uri": uri, "images_root": images_root or posixpath.dirname(uri) + "/",
                                "image_column": image_col, "label_column": label_col, **{
                                    f"{k}_column": v for k, v in optional.items() if v}},
                   entries=entries, problems=problems, reader=FileSystemReader(root_loc.fs),
                   has_group=group_column is not None, has_source=source_column is not None,
                   extra_fields=extra_fields, unknown_label=unknown_label)


def _with_sizes(entries: list[Entry], fs: Any) -> tuple[list[Entry], list[Problem]]:
    """Each entry's size and version from one batched metadata call; rows naming a missing file are problems."""
    import pyarrow.fs as pafs

    found, problems = [], []
    for start in range(0, len(entries), 1000):
        batch = entries[start:start + 1000]
        infos = fs.get_file_info([e.where for e in batch])
        for entry, info in zip(batch, infos):
            if info.type != pafs.FileType.File:
                problems.append(Problem(entry.image_id, "names a missing file" if info.type == pafs.FileType.NotFound
                                        else "is not a file"))
                continue
            version = str(info.mtime_ns) if info.mtime_ns is not None else ""
            found.append(Entry(**{**entry.__dict__, "size": int(info.size or 0), "version": version}))
    return found, problems


def list_omniglot(path: Path) -> Listing:
    """The Omniglot archives (or their extracted folders), with Lake's splits."""
    try:
        parts = omniglot.source_parts(path)
    except omniglot.OmniglotSourceError as exc:
        raise SourceError(str(exc)) from exc
    entries: list[Entry] = []
    reader: Any = LocalReader()
    archives = {}
    for kind, part in parts:
        if kind == "zip":
            reader = ZipReader()
            archives[part.name] = "sha256:" + _file_digest(part)
            try:
                with zipfile.ZipFile(part) as archive:
                    infos = sorted(archive.infolist(), key=lambda i: i.filename)
            except (OSError, zipfile.BadZipFile) as exc:
                raise SourceError(f"cannot open Omniglot archive {part}: {exc}") from exc
            for info in infos:
                if omniglot.parse_path(info.filename) is None:
                    continue
                raw = omniglot.RawImage(path=info.filename, png=b"", **omniglot.parse_path(info.filename))  # type: ignore[arg-type]
                entries.append(_omniglot_entry(raw, f"{part}!{info.filename}", info.file_size, str(info.CRC)))
        else:
            for file in sorted((part.parent / part.name).rglob("*.png")):
                rel = file.relative_to(part.parent).as_posix()
                labels = omniglot.parse_path(rel)
                if labels is None:
                    raise SourceError(f"unexpected file in Omniglot folder: {file}")
                stat = file.stat()
                entries.append(_omniglot_entry(omniglot.RawImage(path=rel, png=b"", **labels),  # type: ignore[arg-type]
                                               str(file), stat.st_size, str(stat.st_mtime_ns)))
    if any(kind == "zip" for kind, _ in parts) and any(kind == "folder" for kind, _ in parts):
        raise SourceError(f"{path} mixes an archive and an extracted folder; keep one form")
    description = {"kind": "omniglot", "uri": str(path), "parts": [p.name for _, p in parts]}
    if archives:
        description["archives"] = archives
    return Listing(name="omniglot", kind="omniglot", description=description, entries=entries, problems=[],
                   reader=reader, has_group=True, has_source=True,
                   extra_fields=[pa.field("character_id", pa.int32()), pa.field("archive", pa.string())],
                   preprocessing={"color": PAPER_PREPROCESS.color, "fit": PAPER_PREPROCESS.fit,
                                  "invert": PAPER_PREPROCESS.invert, "mean": [], "std": []},
                   new_classes=omniglot.OMNIGLOT_NEW_CLASSES, one_shard_per_group=True)


def _omniglot_entry(raw: omniglot.RawImage, where: str, size: int, version: str) -> Entry:
    f = omniglot.fields(raw)
    return Entry(image_id=f["image_id"], where=where, size=size, label=f["label"], group=f["group"],
                 source=f["source"], split=f["split"], extra=tuple(f["extra"].items()), version=version)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_omniglot(path: Path) -> bool:
    """True for a folder holding the Omniglot archives (or their extracted folders), or one archive."""
    if path.is_file():
        return path.name in (f"{a}.zip" for a in omniglot.ARCHIVES)
    return path.is_dir() and any((path / f"{a}.zip").is_file() or (path / a).is_dir() for a in omniglot.ARCHIVES)


def omniglot_problems(listing: Listing, allow_subset: bool) -> list[str]:
    """Omniglot's structure (always) and its exact official counts (unless ``allow_subset``)."""
    from collections import defaultdict

    errors: list[str] = []
    drawers: dict[int, set[int]] = defaultdict(set)
    names: dict[int, tuple[str, str]] = {}
    per_archive: dict[str, dict[str, set]] = defaultdict(lambda: {"images": set(), "characters": set(),
                                                                  "alphabets": set()})
    for e in listing.entries:
        extra = dict(e.extra)
        character, drawer = int(extra["character_id"]), int(e.source or 0)
        key = (e.group or "", e.label)
        if names.setdefault(character, key) != key:
            errors.append(f"character id {character} is used by both {names[character][1]} and {e.label} "
                          f"({e.image_id})")
        if drawer in drawers[character]:
            errors.append(f"drawer {drawer} twice for character {character} ({e.image_id})")
        if not 1 <= drawer <= 20:
            errors.append(f"drawer {drawer} out of range 1..20 ({e.image_id})")
        drawers[character].add(drawer)
        archive = per_archive[str(extra["archive"])]
        archive["images"].add(e.image_id)
        archive["characters"].add(character)
        archive["alphabets"].add(e.group)
    if errors or allow_subset:
        return errors
    missing = []
    for character, seen in sorted(drawers.items()):
        group, label = names[character]
        archive = omniglot.ARCHIVES[0] if character <= omniglot.EXPECTED_COUNTS[omniglot.ARCHIVES[0]]["characters"] \
            else omniglot.ARCHIVES[1]
        missing += [f"{archive}/{group}/{label.split('.', 1)[1]}/{character:04d}_{d:02d}.png"
                    for d in range(1, 21) if d not in seen]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        return [f"missing image(s) {', '.join(missing[:5])}{more} (pass --allow-subset for a partial source)"]
    last = sum(c["characters"] for c in omniglot.EXPECTED_COUNTS.values())
    absent = sorted(set(range(1, last + 1)) - set(drawers))
    if absent:
        return [f"{len(absent)} character(s) missing entirely, e.g. id {absent[0]:04d} "
                "(pass --allow-subset for a partial source)"]
    for archive, expected in omniglot.EXPECTED_COUNTS.items():
        got = {k: len(v) for k, v in per_archive.get(archive, {"images": set(), "characters": set(),
                                                                "alphabets": set()}).items()}
        if got != expected:
            return [f"{archive} has {got['images']} images / {got['characters']} characters / {got['alphabets']} "
                    f"alphabets, expected {expected['images']} / {expected['characters']} / {expected['alphabets']} "
                    "(pass --allow-subset for a partial source)"]
    return []


TABLE_OPTIONS = ("image_column", "label_column", "group_column", "source_column", "split_column", "images_root",
                 "unknown_label")


def add_source_arguments(parser: Any, flag: str) -> None:
    """The flags that say how to read a raw source (``flag`` names it): one definition for ingest and embed."""
    parser.add_argument("--format", dest="kind", default="auto", choices=["auto", "folder", "table", "omniglot"],
                        help=f"how to read {flag} (default: %(default)s, from what it is)")
    parser.add_argument("--groups", action="store_true",
                        help="folders: ROOT/GROUP/CLASS/IMAGE, classes compared within their group")
    table = parser.add_argument_group("table sources")
    table.add_argument("--image-column", help="column of image paths (default: image, path, file or filename)")
    table.add_argument("--label-column", help="column of labels (default: label, class or id)")
    table.add_argument("--group-column", help="optional column of groups (default: none)")
    table.add_argument("--source-column", help="optional column of sources: camera, session, drawer (default: none)")
    table.add_argument("--split-column", help="optional column of splits: train, val/validation, test "
                                              "(default: none, seeded splits)")
    table.add_argument("--images-root", help="folder or s3:// prefix the image paths are relative to "
                                             "(default: the table's folder)")
    table.add_argument("--unknown-label", help="a label that marks unknown individuals (e.g. new_whale): kept, "
                                               "never made a class (default: none)")


def source_table_options(args: Any) -> dict[str, Any]:
    """The table flags the user gave (``add_source_arguments``), as ``open_source``'s ``table_options``."""
    return {k: getattr(args, k) for k in TABLE_OPTIONS if getattr(args, k, None) is not None}


def open_source(source: str, *, kind: str = "auto", groups: bool = False, endpoint_url: str | None = None,
                table_options: dict[str, Any] | None = None,
                fetch_omniglot: Callable[[str], Path] | None = None) -> Listing:
    """The listing of ``--source``: ``official`` or a URL (the Omniglot archives), a folder, or a table."""
    from workflows import download

    table_options = table_options or {}
    if source == "official" or download.is_url(source):
        if kind not in ("auto", "omniglot"):
            raise SourceError(f"--source {source} is the Omniglot download; it cannot be read as a {kind}")
        if fetch_omniglot is None:
            raise SourceError("downloading needs a cache folder")
        listing = list_omniglot(fetch_omniglot(source))
        listing.description.update({"kind": "omniglot", "uri": download.OFFICIAL_BASE_URL
                                    if source == "official" else source.rstrip("/")})
        return listing
    if "://" in source:
        if kind == "folder":
            raise SourceError(f"{source}: folder sources are local; put the images behind a table instead "
                              "(--images-root s3://... with a CSV of paths and labels)")
        return list_table(source, endpoint_url=endpoint_url, **table_options)
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(f"source {path} does not exist")
    if kind == "omniglot" or (kind == "auto" and is_omniglot(path)):
        return list_omniglot(path.resolve())
    if kind == "table" or (kind == "auto" and path.is_file()):
        return list_table(str(path.resolve()), endpoint_url=endpoint_url, **table_options)
    return list_folder(path, groups=groups)
