"""The raw Omniglot layout: where images live, what their names mean, and the splits.

Kept in the core (no Ray, no storage) so ingest, tests and a plain-PyTorch user
read the official archives the same way. Images decode to float32 in [0, 1]
with ink = 1.0 and background = 0.0, so that zero padding in the affine
distortions matches the background.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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

_NAME = re.compile(
    r"^(?P<archive>images_background|images_evaluation)/(?P<alphabet>[^/]+)/"
    r"(?P<character_name>character\d+)/(?P<character>\d{4})_(?P<drawer>\d{2})\.png$"
)


class OmniglotSourceError(RuntimeError):
    """The raw source is missing, unreadable or not laid out like Omniglot."""


class CorruptImageError(OmniglotSourceError):
    """An image file cannot be decoded; the message names the file."""


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
                raise CorruptImageError(f"cannot read {zip_path}!{info.filename}: {exc}") from exc
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
            raise CorruptImageError(f"cannot read {file}: {exc}") from exc
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


def decode_image(data: bytes, path: str = "<bytes>", size: int | None = None) -> np.ndarray:
    """Image bytes (any format PIL reads) -> float32 ``[H, W]`` in [0, 1], ink = 1.

    The network's preprocessing, shared by ingest, training, evaluation and
    prediction: EXIF orientation applied; transparent pixels composited onto
    white (so a transparent background counts as paper, not ink); converted to
    8-bit grayscale (ITU-R 601 luma for colour images); resized to
    ``size`` x ``size`` with bilinear filtering when given (the aspect ratio is
    not kept, as for Omniglot's square images); inverted so dark strokes on a
    light background become ink = 1.0 on background = 0.0. The first frame of
    an animated file is used. Raises :class:`CorruptImageError` naming ``path``
    when the bytes cannot be decoded.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            gray = _to_gray(img)
    except UnidentifiedImageError as exc:
        raise CorruptImageError(f"corrupt image {path}: not in any image format PIL can read") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise CorruptImageError(f"corrupt image {path}: {exc}") from exc
    except Image.DecompressionBombError as exc:
        raise CorruptImageError(f"image {path} is too large to decode: {exc}") from exc
    if size is not None and gray.size != (size, size):
        gray = gray.resize((size, size), Image.BILINEAR)
    return 1.0 - np.asarray(gray, dtype=np.float32) / 255.0


def _to_gray(img: Image.Image) -> Image.Image:
    """8-bit grayscale; alpha composited onto white; 16/32-bit images scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        peak = float(values.max(initial=0.0))
        if img.mode.startswith("I;16") or peak > 255.0:
            top = 65535.0
        elif img.mode == "F" and peak <= 1.0:
            top = 1.0
        else:
            top = 255.0
        return Image.fromarray(np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info) \
            or (img.mode in ("L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("L")
    return img.convert("L")


def decode_png(png: bytes, path: str = "<bytes>", size: int | None = None) -> np.ndarray:
    """Same as :func:`decode_image` (kept under its historical name; it reads any format)."""
    return decode_image(png, path=path, size=size)


def quantize(image: np.ndarray) -> np.ndarray:
    """Float ink image in [0, 1] -> uint8 0..255, as stored for training and evaluation."""
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


@dataclass(frozen=True)
class OmniglotArrays:
    """Decoded images of one split with their labels, row-aligned."""

    images: np.ndarray  # uint8 [N, H, W], ink = 255 scaled back to 1 by ``as_float``
    alphabet: np.ndarray  # str [N]
    character: np.ndarray  # int32 [N], global character id
    drawer: np.ndarray  # int8 [N]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def as_float(self) -> np.ndarray:
        """float32 [N, 1, H, W] in [0, 1], ink = 1."""
        return (self.images.astype(np.float32) / 255.0)[:, None]


def arrays_from_rows(pngs: Sequence[bytes], alphabet: Sequence[str], character: Sequence[int],
                     drawer: Sequence[int], paths: Sequence[str] | None = None,
                     size: int | None = None) -> OmniglotArrays:
    """Decode PNG rows (from raw files or Parquet shards) into row-aligned arrays."""
    names = paths if paths is not None else [f"row {i}" for i in range(len(pngs))]
    images = np.stack([
        quantize(decode_image(png, path=name, size=size))
        for png, name in zip(pngs, names)
    ]) if len(pngs) else np.zeros((0, size or IMAGE_SIZE, size or IMAGE_SIZE), np.uint8)
    return OmniglotArrays(
        images=images,
        alphabet=np.asarray(alphabet, dtype=str),
        character=np.asarray(character, dtype=np.int32),
        drawer=np.asarray(drawer, dtype=np.int8),
    )


def load_split(source: Path | str, split: str, size: int | None = None) -> OmniglotArrays:
    """Decode one split straight from the raw source (tests, notebooks, GPU checks)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    rows = [r for r in iter_raw_images(source) if r.split == split]
    return arrays_from_rows([r.png for r in rows], [r.alphabet for r in rows],
                            [r.character for r in rows], [r.drawer for r in rows],
                            paths=[r.path for r in rows], size=size)
