"""``python -m workflows.embed``: a gallery's embeddings, with Ray Data batch inference -> Parquet.

    python -m workflows.embed --model models:/siamese-oneshot/1 --data ./data/lions --output ./data/lion-gallery
    python -m workflows.embed --model runs/x/checkpoint_... --data s3://bucket/whales --output s3://bucket/gallery \\
        --actors 4 --gpus-per-actor 1

``--data`` takes a data set written by ``workflows.ingest`` (``--split`` says which splits; by
default every one), or any source ingest accepts (a folder of class folders, a table).
The images are read and decoded with the model's own preprocessing by an actor pool
(``map_batches``): the model is shipped once through Ray's object store and loaded once per
actor; actors run on CPUs or on GPUs (``--gpus-per-actor``). Execution streams, so memory
holds a few batches per actor, whatever the size of the gallery.

Output (``--output``, a local directory or ``s3://``): ``part-*.parquet`` with ``image_id``,
``label``, ``split`` and ``embedding`` (the model's scoring embedding, ``D`` float32), then
``embeddings.json``, written last: the model's digest, the input's checksum, the size.
Re-running with the same model and input finds it and does nothing; an interrupted run
left no ``embeddings.json``, and running it again replaces its partial files.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from workflows import cli, storage
from workflows.sources import add_source_arguments, source_table_options
from workflows.shards import SPLITS, DatasetError
from workflows.storage import Location, StorageError

MANIFEST_NAME = "embeddings.json"
FORMAT = "siamese-oneshot/embeddings"
FORMAT_VERSION = 1


class EmbedError(RuntimeError):
    """The gallery cannot be written or read; the message says what to fix."""


@dataclass(frozen=True)
class Gallery:
    """Embeddings written by :func:`embed`, opened once: labels in memory, embeddings streamed."""

    loc: Location
    manifest: dict
    files: tuple[str, ...]
    labels: np.ndarray  # object [G]
    image_ids: np.ndarray  # object [G]

    @staticmethod
    def open(uri: str, endpoint_url: str | None = None) -> "Gallery":
        loc = storage.locate(uri, endpoint_url)
        storage.check_bucket(loc.fs, loc.path, loc.uri)
        path = loc.join(MANIFEST_NAME)
        try:
            if not storage.exists(loc.fs, path):
                raise EmbedError(f"{loc.uri} is not a finished gallery: {loc.uri_of(MANIFEST_NAME)} does not exist "
                                 "(run `python -m workflows.embed --model M --data URI --output URI` first)")
            manifest = storage.read_json(loc.fs, path)
        except OSError as exc:
            raise storage.explain(exc, loc.uri, loc.fs) from exc
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise EmbedError(f"{loc.uri_of(MANIFEST_NAME)} is not a {FORMAT} v{FORMAT_VERSION} manifest")
        files = tuple(loc.join(f) for f in manifest["files"])
        if manifest["rows"] == 0:
            raise EmbedError(f"{loc.uri} holds an empty gallery (no images were embedded)")
        import pyarrow.parquet as pq

        columns = [pq.read_table(f, columns=["image_id", "label"], filesystem=loc.fs) for f in files]
        table = pa.concat_tables(columns)
        return Gallery(loc, manifest, files, np.asarray(table.column("label").to_pylist(), dtype=object),
                       np.asarray(table.column("image_id").to_pylist(), dtype=object))

    def check_model(self, digest: str) -> None:
        if self.manifest["model_digest"] != digest:
            raise EmbedError(f"the gallery {self.loc.uri} was embedded by another model ({self.manifest['model']}, "
                             f"digest {self.manifest['model_digest'][:16]}...): embed it again with this model")

    def chunks(self, keep: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(embeddings [g, D] float32, gallery ids [g])`` file by file, batch by batch (``keep``: a row mask)."""
        import pyarrow.parquet as pq

        offset = 0
        for path in self.files:
            with self.loc.fs.open_input_file(path) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=16384, columns=["embedding"]):
                    column = batch.column(0)
                    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
                    emb = values.reshape(len(batch), -1)
                    ids = np.arange(offset, offset + len(batch), dtype=np.int64)
                    offset += len(batch)
                    if keep is not None:
                        mask = keep[ids]
                        emb, ids = emb[mask], ids[mask]
                    if len(ids):
                        yield emb, ids


class Embedder:
    """The actor: the network rebuilt once from the object store, then batches of encoded images -> embeddings."""

    def __init__(self, payload: Any, device: str, batch_size: int) -> None:
        import ray
        import torch

        from siamese_core.checkpoint import model_from_payload

        if isinstance(payload, ray.ObjectRef):  # shipped once through the object store, fetched once per actor
            payload = ray.get(payload)
        if device == "cuda" and not torch.cuda.is_available():
            raise EmbedError("--gpus-per-actor was given, but the actor sees no GPU")
        self.model = model_from_payload(payload).to(device)
        self.device, self.batch_size = device, batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        from siamese_core.evaluation import embed_images
        from siamese_core.images import decode_image

        cfg = self.model.config
        images = batch.column("image").to_pylist()
        ids = batch.column("image_id").to_pylist()
        pixels = np.stack([decode_image(data, cfg.preprocess, cfg.input_size, path=str(i))
                           for data, i in zip(images, ids)])
        h = embed_images(self.model, pixels, self.device, self.batch_size).float().cpu().numpy()
        flat = pa.array(h.reshape(-1), pa.float32())
        return pa.table({"image_id": batch.column("image_id"), "label": batch.column("label"),
                         "split": batch.column("split"),
                         "embedding": pa.FixedSizeListArray.from_arrays(flat, h.shape[1])})


def read_bytes_batch(batch: pa.Table, reader: Any) -> pa.Table:
    """For a raw source: the listing's rows with their image bytes read (a Ray Data task)."""
    data = [reader.read(w) for w in batch.column("where").to_pylist()]
    return batch.drop_columns(["where"]).append_column("image", pa.array(data, pa.binary()))


def input_dataset(data: str, splits: list[str], endpoint_url: str | None, kind: str = "auto", groups: bool = False,
                  table_options: dict[str, Any] | None = None) -> tuple[Any, dict]:
    """The images to embed as a Ray dataset (``image_id``, ``image``, ``label``, ``split``), and what identifies them."""
    import ray.data

    from workflows.shards import DataSet
    from workflows.sources import open_source

    try:
        dataset = DataSet.open(data, endpoint_url)
    except DatasetError:
        dataset = None
    if dataset is not None:
        if kind != "auto" or groups or table_options:
            raise EmbedError(f"{data} is a data set written by ingest; --format, --groups and the table flags "
                             "describe a raw source: leave them out (ingest has read them already)")
        paths = [p for s in splits if dataset.manifest.shards_of(s) for p in dataset.shard_paths(s)]
        if not paths:
            raise EmbedError(f"{data} has no shards in the splits {splits}")
        ds = ray.data.read_parquet(paths, filesystem=dataset.loc.fs).select_columns(
            ["image_id", "image", "label", "split"])
        return ds, {"uri": dataset.uri, "checksum": dataset.manifest.content_checksum, "splits": splits,
                    "unknown_label": dataset.manifest.unknown_label}
    if list(splits) != list(SPLITS):
        raise EmbedError(f"--split picks splits of an ingested data set; {data} is a raw source, embedded whole")
    listing = open_source(data, kind=kind, groups=groups, endpoint_url=endpoint_url, table_options=table_options)
    if listing.problems:
        raise EmbedError(f"{len(listing.problems)} bad row(s) or file(s) in {data}, e.g. {listing.problems[0]}; "
                         "ingest it with --skip-bad first, or fix them")
    from workflows.ingest import listing_checksum

    rows = [{"image_id": e.image_id, "where": e.where, "label": e.label, "split": e.split or "all"}
            for e in listing.entries]
    ds = ray.data.from_items(rows).map_batches(read_bytes_batch, fn_kwargs={"reader": listing.reader},
                                               batch_format="pyarrow", batch_size=256)
    return ds, {"uri": data, "checksum": listing_checksum(listing.entries, {"kind": listing.kind,
                                                                           **(table_options or {})}),
                "splits": ["all"], "unknown_label": listing.unknown_label}


def embed(model_spec: str, data: str, output: str, *, splits: list[str] | None = None, actors: int = 1,
          gpus_per_actor: float = 0.0, cpus_per_actor: float = 1.0, batch_size: int = 256,
          endpoint_url: str | None = None, tracking_uri: str | None = None, overwrite: bool = False,
          kind: str = "auto", groups: bool = False, table_options: dict[str, Any] | None = None,
          log: Any = print) -> dict:
    """Library entry point of the CLI; returns the gallery's manifest."""
    import ray
    import ray.data

    from siamese_core.checkpoint import model_digest
    from workflows.models import load_any
    from workflows.ray_setup import ray_session

    cli.quiet_ray_data()

    splits = splits or list(SPLITS)
    loc = storage.locate(output, endpoint_url)
    storage.check_writable(loc.fs, loc.path, loc.uri)
    net = load_any(model_spec, endpoint_url, tracking_uri=tracking_uri)
    digest = model_digest(net)
    with ray_session():
        ds, source = input_dataset(data, splits, endpoint_url, kind, groups, table_options)
        manifest_path = loc.join(MANIFEST_NAME)
        if storage.exists(loc.fs, manifest_path):
            old = storage.read_json(loc.fs, manifest_path)
            if old.get("model_digest") == digest and old.get("data", {}).get("checksum") == source["checksum"] \
                    and old.get("data", {}).get("splits") == source["splits"]:
                log(f"[embed] {loc.uri_of(MANIFEST_NAME)} already holds this model's embeddings of this input; "
                    "nothing to do")
                return old
            if not overwrite:
                raise EmbedError(f"{loc.uri} already holds another gallery ({old.get('model')}, "
                                 f"{old.get('data', {}).get('uri')}); pass --overwrite to replace it")
        stale = [f for f in storage.list_files(loc.fs, loc.path) if f.endswith(".parquet")]
        if stale:
            log(f"[embed] removing {len(stale)} file(s) of an earlier, unfinished or replaced gallery")
        storage.delete_files(loc.fs, [manifest_path] + stale)
        from siamese_core import checkpoint as ckpt_io

        payload = ray.put(ckpt_io.plain({"model_config": dataclasses.asdict(net.config),
                                         "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}))
        ray.data.DataContext.get_current().enable_progress_bars = True
        token = f"emb-{uuid.uuid4().hex[:8]}"
        embedded = ds.map_batches(Embedder, fn_constructor_args=(payload, "cuda" if gpus_per_actor else "cpu",
                                                                 batch_size),
                                  batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(
                                      size=actors), num_gpus=gpus_per_actor or None, num_cpus=cpus_per_actor)
        started = time.perf_counter()
        from ray.data.datasource import FilenameProvider

        embedded.write_parquet(loc.path, filesystem=storage.patient(loc.fs),
                               filename_provider=FilenameProvider(dataset_uuid=token, file_format="parquet"))
        seconds = time.perf_counter() - started
    import pyarrow.parquet as pq

    files = sorted(f for f in storage.list_files(loc.fs, loc.path) if f.endswith(".parquet"))
    rows = sum(pq.read_metadata(f, filesystem=loc.fs).num_rows for f in files)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "model": model_spec, "model_digest": digest, "embedding_dim": net.config.embedding_dim,
                "data": source, "rows": rows, "files": [f[len(loc.path) + 1:] for f in files],
                "seconds": seconds}
    storage.write_json(loc.fs, loc.join(MANIFEST_NAME), manifest)
    log(f"[embed] {rows} images embedded in {seconds:.1f}s into {loc.uri} ({len(files)} file(s))")
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workflows.embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a checkpoint (local or s3://) or an MLflow model URI, as "
                                                       "predict takes")
    parser.add_argument("--data", required=True, help="a data set written by workflows.ingest, or a source it reads")
    parser.add_argument("--output", required=True, help="a local directory or s3://bucket/prefix")
    add_source_arguments(parser, "--data (a raw source)")
    parser.add_argument("--split", action="append", choices=list(SPLITS), default=None,
                        help="an ingested data set's split to embed (repeatable; default: every split)")
    parser.add_argument("--actors", type=int, default=1, help="embedding actors (default: %(default)s)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="0: CPU actors (default: %(default)s)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0,
                        help="CPU slots each actor takes (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch (default: %(default)s)")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// locations (default: AWS_ENDPOINT_URL)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ and runs:/ (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument("--overwrite", action="store_true", help="replace another model's gallery at --output")
    cli.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli.run(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.configure_console(args.verbose)
    if args.actors < 1 or args.batch_size < 1:
        parser.error("--actors and --batch-size must be >= 1")
    embed(args.model, args.data, args.output, splits=args.split, actors=args.actors,
          gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size,
          endpoint_url=args.endpoint_url, tracking_uri=args.tracking_uri, overwrite=args.overwrite,
          kind=args.kind, groups=args.groups, table_options=source_table_options(args))
    return 0


if __name__ == "__main__":
    # through the package module, so the errors raised are the classes workflows.cli knows
    from workflows.embed import main as entry

    sys.exit(entry())
