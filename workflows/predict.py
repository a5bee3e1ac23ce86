"""``python -m workflows.predict``: new images against a support folder (one-shot) or a gallery (re-identification).

With ``--gallery EMBEDDINGS`` (written by ``workflows.embed``), each query is ranked against
every gallery image by the siamese head and gets its ``--top-k`` best distinct labels: CSV
``query,rank,label,score`` (score: the probability ``p`` of the label's best image). With
``--new-threshold X`` (a probability) or ``auto`` (the threshold chosen on validation and
stored with the model), the label ``new`` is inserted where the scores fall below it: an
individual the gallery has not got. The ranks are exact: a weighted-L1 index (faiss) where
the head's weights allow, else every pair scored in blocks (``siamese_core.retrieval``).

Without ``--gallery``, the one-shot form below.

Give one example image per class (the support set) and a folder of images to
classify (the queries); each query gets the class whose example the trained
siamese network finds most similar. Output is CSV with the header
``query,predicted,score``: the query's path relative to the query folder, the
predicted class, and the network's similarity probability ``p`` (0..1) for
that class.

Support folder layout (the two forms may be mixed):

* ``SUPPORT/NAME.png`` -- one image file per class; the class is the file
  name without its extension (``NAME``);
* ``SUPPORT/NAME/`` -- a subfolder per class; the class is the folder name.
  It normally holds one image. If it holds several (searched recursively),
  all of them are used and the class scores as its *best-matching* image
  (maximum similarity): a query matches a class when it looks like any one
  of its examples, which is the natural reading of "several examples" in a
  nearest-neighbour classifier and leaves one-image classes unchanged.

The query folder is searched recursively; results are sorted by relative path.
Files whose extension is not an image format Pillow reads, and hidden files and
folders (names starting with "."), are skipped. Images may be any size, colour
mode and format (PNG, JPEG, BMP, GIF, TIFF, WebP, ...): each goes through the
model's own preprocessing (:func:`siamese_core.images.decode_image` with the
model's ``config.preprocess``: colour, fit, polarity, size; its normalisation
inside the network), exactly as in training and evaluation. Every image is embedded once (as the
mean over the model's test-time views, ``model.test_time_shift_px``, when it has
them); all query/support pairs are scored from the embeddings.

Exit status 2, with a message naming the file or folder, when a folder is
missing or holds no images, an image cannot be decoded, two support entries
name the same class, or the model cannot be loaded.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

import numpy as np

from siamese_core.config import TEST_TIME_VIEWS, ModelConfig
from siamese_core.images import CorruptImageError, decode_image
from workflows import cli


class PredictError(Exception):
    """A problem with the user's folders or files; the message says which one."""


@dataclass(frozen=True)
class SupportSet:
    """The classes (sorted) and every support image, with the class each belongs to."""

    classes: list[str]
    files: list[Path]
    owner: np.ndarray  # int64 [len(files)], index into ``classes``


@dataclass(frozen=True)
class Prediction:
    query: str  # path relative to the query folder, "/"-separated
    predicted: str
    score: float  # similarity probability for ``predicted``, in [0, 1]


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (".png", ".jpg", ...) of every format Pillow can open."""
    from PIL import Image

    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def list_images(folder: Path, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (by extension, hidden entries skipped), sorted by relative path."""
    extensions = image_extensions()
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    found = [p for p in candidates
             if p.is_file() and p.suffix.lower() in extensions and not _hidden(p, folder)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _check_folder(folder: Path, role: str) -> None:
    if not folder.exists():
        raise PredictError(f"{role} folder {folder} does not exist")
    if not folder.is_dir():
        raise PredictError(f"{role} folder {folder} is not a folder")


def read_support(folder: str | Path) -> SupportSet:
    """The classes of a support folder (see the module docstring for the layout)."""
    folder = Path(folder)
    _check_folder(folder, "support")
    extensions = image_extensions()
    sources: dict[str, Path] = {}  # class -> the file or subfolder that defines it
    members: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            name, files = entry.name, list_images(entry)
            if not files:
                raise PredictError(f"support class folder {entry} holds no images")
        elif entry.is_file() and entry.suffix.lower() in extensions:
            name, files = entry.stem, [entry]
        else:
            continue
        if name in sources:
            raise PredictError(f"support folder {folder} has two entries for class {name!r}: "
                               f"{sources[name].name} and {entry.name}; keep one (or put several "
                               f"examples in one subfolder {name}/)")
        sources[name], members[name] = entry, files
    if not sources:
        raise PredictError(f"support folder {folder} holds no images (one image per class, named by "
                           "class, or one subfolder per class)")
    classes = sorted(sources)
    files = [f for c in classes for f in members[c]]
    owner = np.asarray([i for i, c in enumerate(classes) for _ in members[c]], dtype=np.int64)
    return SupportSet(classes=classes, files=files, owner=owner)


def read_queries(folder: str | Path) -> list[tuple[str, Path]]:
    """``(relative path, file)`` of every query image, sorted by relative path."""
    folder = Path(folder)
    _check_folder(folder, "query")
    files = list_images(folder)
    if not files:
        raise PredictError(f"query folder {folder} holds no images")
    return [(f.relative_to(folder).as_posix(), f) for f in files]


def load_images(files: Sequence[Path], config: ModelConfig) -> np.ndarray:
    """uint8 ``[N, C, S, S]`` images, preprocessed as the model was trained (its ``config.preprocess``)."""
    size = config.input_size
    out = np.zeros((len(files), config.in_channels, size, size), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PredictError(f"cannot read image {path}: {exc.strerror or exc}") from exc
        try:
            out[i] = decode_image(data, config.preprocess, size, path=str(path))
        except CorruptImageError as exc:
            raise PredictError(str(exc)) from exc
    return out


def embed(model: Any, images: np.ndarray, batch_size: int = 256) -> Any:
    """Embeddings ``[N, D]`` of uint8 images, computed once, in batches, without gradients."""
    import torch

    from siamese_core.evaluation import embed_images

    with torch.no_grad():
        return embed_images(model, images, batch_size=batch_size)


def class_logits(model: Any, h_queries: Any, h_support: Any, owner: np.ndarray, n_classes: int) -> Any:
    """Logits ``[Q, C]``: per class, the best (largest) logit over its support images."""
    import torch

    with torch.no_grad():
        pair = model.pairwise_logits(h_queries, h_support)  # [Q, S]
        index = torch.from_numpy(owner).to(pair.device)
        best = torch.full((pair.shape[0], n_classes), float("-inf"), dtype=pair.dtype, device=pair.device)
        return best.scatter_reduce(1, index.expand_as(pair), pair, reduce="amax", include_self=True)


def predict(model: Any, support: SupportSet, queries: Sequence[tuple[str, Path]],
            batch_size: int = 256) -> list[Prediction]:
    """The predicted class and its similarity for every query (ties go to the first class by name)."""
    import torch

    from siamese_core.checkpoint import unwrap

    net = unwrap(model).eval()
    h_support = embed(net, load_images(support.files, net.config), batch_size)
    h_queries = embed(net, load_images([path for _, path in queries], net.config), batch_size)
    logits = class_logits(net, h_queries, h_support, support.owner, len(support.classes))
    best = torch.argmax(logits, dim=1)  # first maximum: deterministic tie-break by class name
    scores = torch.sigmoid(logits.gather(1, best[:, None]).squeeze(1))
    return [Prediction(query=name, predicted=support.classes[int(c)], score=float(s))
            for (name, _), c, s in zip(queries, best.tolist(), scores.tolist())]


def write_csv(predictions: Iterable[Prediction], stream: TextIO) -> None:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["query", "predicted", "score"])
    for p in predictions:
        writer.writerow([p.query, p.predicted, f"{p.score:.6f}"])


def _load_model(spec: str, endpoint_url: str | None, tracking_uri: str | None,
                test_time_shift_px: int | None = None, test_time_views: str | None = None) -> Any:
    from workflows.models import ModelLoadError, load_any

    try:
        return load_any(spec, endpoint_url=endpoint_url, tracking_uri=tracking_uri,
                        test_time_shift_px=test_time_shift_px, test_time_views=test_time_views)
    except ModelLoadError as exc:
        raise PredictError(str(exc)) from exc


def predict_gallery(model: Any, gallery_uri: str, queries: Sequence[tuple[str, Path]], top_k: int,
                    new_threshold: str | None, endpoint_url: str | None = None,
                    batch_size: int = 256) -> list[tuple[str, int, str, float]]:
    """``(query, rank, label, p)`` rows: each query's ``top_k`` labels in the gallery, ``new`` where it belongs."""
    import torch

    from siamese_core.checkpoint import model_digest, unwrap
    from siamese_core.reid import NEW
    from siamese_core.retrieval import head_parameters, insert_new, search_labels
    from workflows.embed import EmbedError, Gallery
    from workflows.storage import StorageError

    net = unwrap(model).eval()
    threshold = None
    if new_threshold is not None:
        if new_threshold == "auto":
            if getattr(net, "new_threshold", None) is None:
                raise PredictError("--new-threshold auto: this model carries no threshold (registered models "
                                   "trained on data without groups do); give a probability, e.g. 0.5")
            p = float(net.new_threshold)
        else:
            try:
                p = float(new_threshold)
            except ValueError as exc:
                raise PredictError(f"--new-threshold takes a probability in (0, 1) or auto, got {new_threshold!r}") \
                    from exc
            if not 0.0 < p < 1.0:
                raise PredictError(f"--new-threshold takes a probability in (0, 1) or auto, got {new_threshold!r}")
        threshold = float(np.log(p / (1.0 - p))) if 0.0 < p < 1.0 else (-np.inf if p <= 0 else np.inf)
    try:
        gallery = Gallery.open(gallery_uri, endpoint_url)
        gallery.check_model(model_digest(net))
    except (EmbedError, StorageError) as exc:
        raise PredictError(str(exc)) from exc
    unknown = gallery.manifest.get("data", {}).get("unknown_label")
    keep = gallery.labels != unknown if unknown else np.ones(len(gallery.labels), bool)
    if not keep.any():
        raise PredictError(f"the gallery {gallery_uri} holds no known individual")
    if NEW in set(gallery.labels[keep].tolist()):
        raise PredictError(f"the gallery has a class named {NEW!r}, the label of new individuals; rename it")
    h = embed(net, load_images([path for _, path in queries], net.config), batch_size).float().cpu().numpy()
    alpha, bias = head_parameters(net)
    with torch.no_grad():
        labels, scores = search_labels(h, lambda: gallery.chunks(keep), gallery.labels, alpha, bias, top_k)
    ranked = insert_new(labels, scores, threshold, NEW, top_k) if threshold is not None else labels.tolist()
    # each label scores its best image, as a probability; "new" scores the threshold itself
    out = []
    for q, ((name, _), labs) in enumerate(zip(queries, ranked)):
        score_of = dict(zip(labels[q].tolist(), scores[q].tolist()))
        for r, label in enumerate(labs, start=1):
            logit = threshold if label == NEW else score_of[label]
            out.append((name, r, str(label), float(1.0 / (1.0 + np.exp(-logit)))))
    return out


def write_ranked_csv(rows: Iterable[tuple[str, int, str, float]], stream: TextIO) -> None:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["query", "rank", "label", "score"])
    for query, rank, label, score in rows:
        writer.writerow([query, rank, label, f"{score:.6f}"])


def main(argv: list[str] | None = None) -> int:
    return cli.run(lambda: _main(argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workflows.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="a checkpoint directory or model.pt (local or s3://), or an MLflow model URI "
                             "(models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/model)")
    against = parser.add_mutually_exclusive_group(required=True)
    against.add_argument("--support", help="folder with one example image per class (one-shot); this or --gallery (default: none)")
    against.add_argument("--gallery", help="embeddings written by workflows.embed (a directory or s3://); this or --support (default: none)")
    parser.add_argument("--query", required=True, help="folder of images to classify (searched recursively)")
    parser.add_argument("--top-k", type=int, default=5, help="--gallery: labels per query (default: %(default)s)")
    parser.add_argument("--new-threshold", default=None, metavar="P|auto",
                        help="--gallery: insert 'new' where the best match's probability falls below P; auto: "
                             "the threshold stored with the model (chosen on validation) (default: none, never 'new')")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// locations (default: AWS_ENDPOINT_URL)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI for models:/ and runs:/ (default: MLFLOW_TRACKING_URI "
                             "or ./mlflow.db)")
    parser.add_argument("--output", default=None, help="write the CSV to this file (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per embedding batch (default: %(default)s)")
    parser.add_argument("--test-time-shift-px", type=int, default=None, metavar="N",
                        help="compare images by their mean embedding over N-pixel shifts (0: one view, as in the "
                             "paper; default: what the model was trained with, model.test_time_shift_px)")
    parser.add_argument("--test-time-views", default=None, choices=TEST_TIME_VIEWS,
                        help="which shifts are views: cross (up, down, left, right: 4N + 1) or square "
                             "(every shift within N px: (2N + 1)^2); default: the model's, model.test_time_views")
    cli.add_arguments(parser)
    return parser


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.configure_console(args.verbose)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.new_threshold is not None and args.gallery is None:
        parser.error("--new-threshold goes with --gallery")

    # Cheap checks first: a typo in a folder should not wait for the model to load.
    support = read_support(args.support) if args.support else None
    queries = read_queries(args.query)
    model = _load_model(args.model, args.endpoint_url, args.tracking_uri, args.test_time_shift_px,
                        args.test_time_views)
    if support is None:
        rows = predict_gallery(model, args.gallery, queries, args.top_k, args.new_threshold, args.endpoint_url,
                               args.batch_size)
        write, what = (lambda stream: write_ranked_csv(rows, stream)), f"{len(rows)} ranked labels"
    else:
        if len(support.classes) == 1:
            print(f"warning: support folder {args.support} has a single class "
                  f"({support.classes[0]!r}); every query gets it", file=sys.stderr)
        predictions = predict(model, support, queries, batch_size=args.batch_size)
        write = lambda stream: write_csv(predictions, stream)  # noqa: E731
        what = f"{len(predictions)} predictions ({len(support.classes)} classes)"
    if args.output is None:
        write(sys.stdout)
        sys.stdout.flush()
    else:
        try:
            with open(args.output, "w", newline="", encoding="utf-8") as stream:
                write(stream)
        except OSError as exc:
            raise PredictError(f"cannot write --output {args.output}: {exc.strerror or exc}") from exc
        print(f"wrote {what} to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    # through the package module, so the errors raised are the classes workflows.cli knows
    from workflows.predict import main as entry

    sys.exit(entry())
