"""The Omniglot adapter: the raw archives' layout, what their names mean, and Lake's splits.

Kept in the core (no Ray, no storage) so ingest, tests and a plain-PyTorch user
(the GPU benchmark) read the official archives the same way. In the project's
data model an alphabet is a *group*, a character a *class* and a drawer a
*source* (:func:`fields`); the paper's preprocessing (grayscale, ink = 1) is
:data:`siamese_core.config.PAPER_PREPROCESS`.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .config import PAPER_PREPROCESS, PreprocessConfig
from .images import LabelledImages

ARCHIVES: tuple[str, str] = ("images_background", "images_evaluation")

LAKE_TEST_ALPHABETS: tuple[str, ...] = (
    "Atlantean", "Ge_ez", "Glagolitic", "Gurmukhi", "Kannada", "Malayalam", "Manipuri",
    "Old_Church_Slavonic_(Cyrillic)", "Tengwar", "Tibetan",
)
"""Lake's 10 test alphabets (from the evaluation set). Never select anything on them."""

SPLITS: tuple[str, ...] = ("train", "validation", "test")

EXPECTED_COUNTS: dict[str, dict[str, int]] = {
    "images_background": {"images": 19_280, "characters": 964, "alphabets": 30},
    "images_evaluation": {"images": 13_180, "characters": 659, "alphabets": 20},
}

IMAGE_SIZE = 105

OMNIGLOT_NEW_CLASSES = "rot90"
"""A character turned is another character, so each training character is trained in 4
orientations (``siamese_core.config.PairConfig.new_classes``; the data set's word, in its
manifest): chosen on validation over the characters as they are and over 8 orientations with
mirrors (benchmarks/RESULTS.md, "New classes from turns")."""

_NAME = re.compile(
    r"^(?P<archive>images_background|images_evaluation)/(?P<alphabet>[^/]+)/"
    r"(?P<character_name>character\d+)/(?P<character>\d{4})_(?P<drawer>\d{2})\.png$"
)


class OmniglotSourceError(RuntimeError):
    """The raw source is missing, unreadable or not laid out like Omniglot."""


def split_of(alphabet: str, background: bool) -> str:
    """Koch's splits after Lake: background -> train; evaluation -> test or validation."""
    if background:
        return "train"
    return "test" if alphabet in LAKE_TEST_ALPHABETS else "validation"


@dataclass(frozen=True)
class RawImage:
    """One Omniglot image with the labels its path encodes."""

    path: str
    alphabet: str
    character_name: str
    character: int
    drawer: int
    background: bool
    png: bytes

    @property
    def split(self) -> str:
        return split_of(self.alphabet, self.background)


def parse_path(path: str) -> dict[str, object] | None:
    """Labels from an archive path, or None for entries that are not images."""
    match = _NAME.match(path)
    if match is None:
        return None
    return {
        "alphabet": match["alphabet"],
        "character_name": match["character_name"],
        "character": int(match["character"]),
        "drawer": int(match["drawer"]),
        "background": match["archive"] == "images_background",
    }


def _iter_zip(zip_path: Path) -> Iterator[RawImage]:
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise OmniglotSourceError(f"cannot open Omniglot archive {zip_path}: {exc}") from exc
    with archive:
        for info in sorted(archive.infolist(), key=lambda i: i.filename):
            labels = parse_path(info.filename)
            if labels is None:
                continue
            try:
                png = archive.read(info)
            except (OSError, zipfile.BadZipFile, EOFError) as exc:
                raise OmniglotSourceError(f"cannot read {zip_path}!{info.filename}: {exc}") from exc
            yield RawImage(path=info.filename, png=png, **labels)  # type: ignore[arg-type]


def _iter_folder(root: Path, archive: str) -> Iterator[RawImage]:
    for file in sorted((root / archive).rglob("*.png")):
        rel = file.relative_to(root).as_posix()
        labels = parse_path(rel)
        if labels is None:
            raise OmniglotSourceError(f"unexpected file in Omniglot folder: {file}")
        try:
            png = file.read_bytes()
        except OSError as exc:
            raise OmniglotSourceError(f"cannot read {file}: {exc}") from exc
        yield RawImage(path=rel, png=png, **labels)  # type: ignore[arg-type]


def source_parts(source: Path) -> list[tuple[str, Path]]:
    """The archives or folders a source holds, as (kind, path); kind is 'zip' or 'folder'."""
    source = Path(source)
    if not source.exists():
        raise OmniglotSourceError(f"Omniglot source {source} does not exist")
    if source.is_file():
        return [("zip", source)]
    parts: list[tuple[str, Path]] = []
    for archive in ARCHIVES:
        if (source / f"{archive}.zip").is_file():
            parts.append(("zip", source / f"{archive}.zip"))
        elif (source / archive).is_dir():
            parts.append(("folder", source / archive))
    if not parts:
        raise OmniglotSourceError(
            f"{source} holds neither {ARCHIVES[0]}.zip/{ARCHIVES[1]}.zip nor the extracted folders"
        )
    return parts


def iter_raw_images(source: Path | str) -> Iterator[RawImage]:
    """Every image of a folder (archives or extracted folders) or of one zip, in path order."""
    for kind, path in source_parts(Path(source)):
        if kind == "zip":
            yield from _iter_zip(path)
        else:
            yield from _iter_folder(path.parent, path.name)


def label_of(alphabet: str, character_name: str) -> str:
    """A character's class label: unique over the 50 alphabets, and a valid file name."""
    return f"{alphabet}.{character_name}"


def fields(raw: RawImage) -> dict[str, Any]:
    """One image's row in the project's data model (the shard schema), with Omniglot's own extras."""
    return {"image_id": raw.path, "label": label_of(raw.alphabet, raw.character_name), "group": raw.alphabet,
            "source": f"{raw.drawer:02d}", "split": raw.split,
            "extra": {"character_id": raw.character, "archive": ARCHIVES[0] if raw.background else ARCHIVES[1]}}


def load_split(source: Path | str, split: str, size: int | None = None,
               preprocess: PreprocessConfig = PAPER_PREPROCESS) -> LabelledImages:
    """Decode one split straight from the raw archives (notebooks, the GPU benchmark: no Ray, no shards)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    rows = sorted((r for r in iter_raw_images(source) if r.split == split),
                  key=lambda r: (r.alphabet, r.character, r.drawer))
    return LabelledImages.decode([r.png for r in rows], [label_of(r.alphabet, r.character_name) for r in rows],
                                 [r.path for r in rows], preprocess, size or IMAGE_SIZE,
                                 groups=[r.alphabet for r in rows], sources=[f"{r.drawer:02d}" for r in rows])
