"""Encoded images -> the network's input, and a split's decoded images with their labels.

One decoder (:func:`decode_image`) serves ingest's checks, the pair stage, evaluation,
``predict`` and the served model, so a model sees the same pixels wherever it runs. It
follows the model's :class:`~siamese_core.config.PreprocessConfig`; the per-channel
normalisation is the network's own first step (``SiameseNet.features``), so the arrays
here stay uint8, four times smaller than floats on their way through Ray.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import PAPER_PREPROCESS, PreprocessConfig


class CorruptImageError(ValueError):
    """Bytes that are not a whole image in a format Pillow reads; the message names the file."""


def open_image(data: bytes, path: str = "<bytes>") -> Image.Image:
    """The decoded image (first frame, EXIF orientation applied); CorruptImageError naming ``path``.

    The format is found from the content, never the file name: a JPEG named ``.png`` decodes.
    Truncated files fail here, because every pixel is decoded (``load``).
    """
    if not data:
        raise CorruptImageError(f"empty image file {path}")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return ImageOps.exif_transpose(img)
    except UnidentifiedImageError as exc:
        raise CorruptImageError(f"corrupt image {path}: not in any image format Pillow can read") from exc
    except Image.DecompressionBombError as exc:
        raise CorruptImageError(f"image {path} is too large to decode: {exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise CorruptImageError(f"corrupt image {path}: {exc}") from exc


def decode_image(data: bytes, preprocess: PreprocessConfig = PAPER_PREPROCESS, size: int | None = None,
                 path: str = "<bytes>") -> np.ndarray:
    """Image bytes -> uint8 ``[C, S, S]`` (``C`` 1 or 3) as ``preprocess`` says, at ``size`` (None: native).

    Transparent pixels are composited onto white, so a transparent background counts as
    paper; 16/32-bit images are scaled, not clipped. ``fit``: "stretch" resizes to a square
    (aspect not kept, as for Omniglot's square images), "pad" scales the longer side to
    ``size`` and pads the rest with background, "crop" scales the shorter side and cuts the
    centre. Resizing is bilinear. ``invert`` then maps dark-on-light to 255-on-0.
    """
    preprocess = preprocess if preprocess.is_resolved else preprocess.resolved()
    img = open_image(data, path)
    img = _to_rgb(img) if preprocess.color == "rgb" else _to_gray(img)
    if size is not None:
        img = _fit(img, size, preprocess.fit, background=255 if preprocess.invert else 0)
    pixels = np.asarray(img, dtype=np.uint8)
    pixels = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
    return np.ascontiguousarray(255 - pixels if preprocess.invert else pixels)


def image_size(data: bytes, path: str = "<bytes>") -> tuple[int, int]:
    """``(width, height)`` without decoding the pixels (ingest's statistics)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CorruptImageError(f"corrupt image {path}: {exc}") from exc


def _fit(img: Image.Image, size: int, fit: str, background: int) -> Image.Image:
    width, height = img.size
    if fit == "stretch" or width == height:
        return img if img.size == (size, size) else img.resize((size, size), Image.BILINEAR)
    if fit == "pad":
        scale = size / max(width, height)
        inner = (max(1, round(width * scale)), max(1, round(height * scale)))
        canvas = Image.new(img.mode, (size, size), (background,) * len(img.getbands()) if img.mode == "RGB"
                           else background)
        canvas.paste(img.resize(inner, Image.BILINEAR), ((size - inner[0]) // 2, (size - inner[1]) // 2))
        return canvas
    scale = size / min(width, height)  # "crop"
    inner = (max(size, round(width * scale)), max(size, round(height * scale)))
    left, top = (inner[0] - size) // 2, (inner[1] - size) // 2
    return img.resize(inner, Image.BILINEAR).crop((left, top, left + size, top + size))


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info)


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)


def _high_bit_depth_to_gray(img: Image.Image) -> Image.Image:
    values = np.asarray(img, dtype=np.float64)
    peak = float(values.max(initial=0.0))
    if img.mode.startswith("I;16") or peak > 255.0:
        top = 65535.0
    elif img.mode == "F" and peak <= 1.0:
        top = 1.0
    else:
        top = 255.0
    return Image.fromarray(np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8))


def _to_gray(img: Image.Image) -> Image.Image:
    """8-bit grayscale (ITU-R 601 luma for colour images)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_bit_depth_to_gray(img)
    if _has_alpha(img):
        return _on_white(img).convert("L")
    return img.convert("L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_bit_depth_to_gray(img).convert("RGB")
    if _has_alpha(img):
        return _on_white(img).convert("RGB")
    return img.convert("RGB")


def pixel_statistics(img: Image.Image, thumbnail: int = 64) -> dict[str, np.ndarray]:
    """Per-channel pixel sums of an image in [0, 1], as stored (not inverted): "rgb" and "gray".

    Ingest adds these up over the training split for the data set's normalisation defaults
    (``PreprocessConfig.resolved``); each entry is ``[count, sum, sum of squares]`` per channel,
    taken on a thumbnail of at most ``thumbnail`` px, which is plenty for a mean and a spread.
    """
    img = img.copy()
    img.thumbnail((thumbnail, thumbnail))
    out = {}
    for color, converted in (("rgb", _to_rgb(img)), ("gray", _to_gray(img))):
        x = np.asarray(converted, dtype=np.float64) / 255.0
        x = x.reshape(-1, 1) if x.ndim == 2 else x.reshape(-1, 3)
        out[color] = np.stack([np.full(x.shape[1], x.shape[0], dtype=np.float64), x.sum(0), (x * x).sum(0)])
    return out


def is_gray(img: Image.Image) -> bool:
    """True when an image has no colour: a gray mode, or colour channels that are equal everywhere."""
    if img.mode in ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return True
    small = img.copy()
    small.thumbnail((64, 64))
    rgb = np.asarray(_to_rgb(small), dtype=np.int16)
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def class_codes(labels: Sequence[str] | np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """Integer codes of string labels (index into the sorted distinct labels) and those labels."""
    names, codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    return codes.astype(np.int64), tuple(str(n) for n in names)


@dataclass(frozen=True)
class LabelledImages:
    """Decoded images of one split with their labels, row-aligned.

    ``label`` indexes ``classes``; ``group`` (the classes that are compared with each other,
    like Omniglot's alphabets) and ``source`` (what made the image, like its drawer) are
    None where the data set has none. ``shard`` is the index of the stored shard each row
    came from, when it was loaded from shards: the pair stage's unit where there are no groups.
    """

    images: np.ndarray  # uint8 [N, C, S, S]
    label: np.ndarray  # int64 [N], index into ``classes``
    classes: tuple[str, ...]
    image_id: np.ndarray  # str [N]
    group: np.ndarray | None = None  # str [N]
    source: np.ndarray | None = None  # str [N]
    shard: np.ndarray | None = None  # int64 [N]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def label_names(self) -> np.ndarray:
        """Each row's class name."""
        return np.asarray(self.classes, dtype=object)[self.label] if len(self.classes) else np.zeros(0, object)

    def as_float(self) -> np.ndarray:
        """float32 ``[N, C, S, S]`` in [0, 1]."""
        return self.images.astype(np.float32) / 255.0

    def take(self, rows: np.ndarray) -> "LabelledImages":
        """The given rows (labels keep their codes and class list)."""
        rows = np.asarray(rows, dtype=np.int64)
        pick = (lambda a: None if a is None else a[rows])
        return LabelledImages(images=self.images[rows], label=self.label[rows], classes=self.classes,
                              image_id=self.image_id[rows], group=pick(self.group), source=pick(self.source),
                              shard=pick(self.shard))

    @staticmethod
    def decode(images: Sequence[bytes], labels: Sequence[str], image_ids: Sequence[str],
               preprocess: PreprocessConfig, size: int, groups: Sequence[str] | None = None,
               sources: Sequence[str] | None = None, shards: Sequence[int] | None = None) -> "LabelledImages":
        """Decode encoded images (from raw files or shards) with the model's preprocessing."""
        preprocess = preprocess if preprocess.is_resolved else preprocess.resolved()
        ids = np.asarray(image_ids, dtype=str)
        out = np.zeros((len(images), preprocess.channels, size, size), dtype=np.uint8)
        for i, data in enumerate(images):
            out[i] = decode_image(data, preprocess, size, path=str(ids[i]))
        label, classes = class_codes(labels)
        as_str = (lambda a: None if a is None else np.asarray(a, dtype=str))
        return LabelledImages(images=out, label=label, classes=classes, image_id=ids, group=as_str(groups),
                              source=as_str(sources), shard=None if shards is None else np.asarray(shards, np.int64))
