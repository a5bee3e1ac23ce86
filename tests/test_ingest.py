"""workflows.ingest and workflows.shards with the Omniglot adapter: real Omniglot -> Parquet shards, locally and on S3.

Expected numbers are computed here from the data README's alphabet tables and
the test-alphabet list of the reference (not from siamese_core), so a wrong
split or count in the code cannot agree with itself.
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import subprocess
import sys
import threading
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omniglot_sources import OFFICIAL_ALPHABETS, make_source
from s3_server import closed_port
from workflows import download, ingest, shards
from workflows.ingest import IngestError
from workflows.shards import DatasetError
from siamese_core.omniglot import OMNIGLOT_NEW_CLASSES

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LAKE_TEST = {"Atlantean", "Ge_ez", "Glagolitic", "Gurmukhi", "Kannada", "Malayalam", "Manipuri",
             "Old_Church_Slavonic_(Cyrillic)", "Tengwar", "Tibetan"}


def expected_counts() -> dict[str, dict[str, int]]:
    tables = OFFICIAL_ALPHABETS
    assert len(tables["images_background"]) == 30 and len(tables["images_evaluation"]) == 20
    assert LAKE_TEST <= set(tables["images_evaluation"])
    groups = {"train": tables["images_background"],
              "test": {a: n for a, n in tables["images_evaluation"].items() if a in LAKE_TEST},
              "validation": {a: n for a, n in tables["images_evaluation"].items() if a not in LAKE_TEST}}
    return {split: {"images": 20 * sum(g.values()), "classes": sum(g.values()), "groups": len(g)}
            for split, g in groups.items()}


def split_counts(manifest: shards.Manifest) -> dict[str, dict[str, int]]:
    return {s: {k: v[k] for k in ("images", "classes", "groups")} for s, v in manifest.splits.items()}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def quiet(message: str) -> None:
    pass


# --------------------------------------------------------------------------- small sources

SUBSET_A = {"Latin", "Greek", "Atlantean", "Angelic"}  # 2 train, 1 test, 1 validation alphabet
SUBSET_B = {"Braille", "Tengwar", "Keble"}


def first_image(source: Path, alphabet: str) -> str:
    for name in download.ARCHIVE_FILES:
        with zipfile.ZipFile(source / name) as z:
            names = sorted(n for n in z.namelist() if n.split("/")[1:2] == [alphabet] and n.endswith(".png"))
            if names:
                return names[0]
    raise AssertionError(alphabet)


@pytest.fixture(scope="module")
def subset_a(omniglot_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_source(omniglot_dir, tmp_path_factory.mktemp("subset-a"), SUBSET_A)


def subset_expected(alphabets: set[str]) -> dict[str, dict[str, int]]:
    tables = OFFICIAL_ALPHABETS
    result = {s: {"images": 0, "classes": 0, "groups": 0} for s in ("train", "validation", "test")}
    for archive, table in tables.items():
        for alphabet, n in table.items():
            if alphabet in alphabets:
                split = "train" if archive == "images_background" else (
                    "test" if alphabet in LAKE_TEST else "validation")
                result[split]["images"] += 20 * n
                result[split]["classes"] += n
                result[split]["groups"] += 1
    return result


# --------------------------------------------------------------------------- full data, local


@pytest.fixture(scope="module")
def full_local(ray_cluster, omniglot_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    dest = tmp_path_factory.mktemp("full-local") / "omniglot"
    result = ingest.ingest(str(omniglot_dir), str(dest), log=quiet)
    return dest, result


def test_full_ingest_local_exact_counts(full_local, omniglot_dir: Path) -> None:
    dest, result = full_local
    assert not result.skipped
    expected = expected_counts()
    assert expected["train"] == {"images": 19_280, "classes": 964, "groups": 30}
    manifest = shards.DataSet.open(str(dest)).manifest
    assert split_counts(manifest) == expected
    assert manifest.counts["images"] == 32_460 and manifest.counts["classes"] == 1_623
    assert manifest.counts["groups"] == 50 and manifest.counts["single_image_classes"] == 0
    assert manifest.source["archives"]["images_background.zip"] == \
        "sha256:7a4cae547f16207901bd3acaabd866c1dbbef4d559dff26d797dbc6423a64a1e"
    assert manifest.columns == {"group": True, "source": True, "extra": ["character_id", "archive"]}
    assert manifest.preprocessing == {"color": "gray", "fit": "stretch", "invert": True, "mean": [], "std": []}
    assert manifest.image_sizes["min"] == manifest.image_sizes["max"] == [105, 105]
    assert manifest.split_rule == {"rule": "given"} and manifest.rejected == []
    assert manifest.new_classes == OMNIGLOT_NEW_CLASSES != "unchanged"
    assert manifest.splits["train"]["source_names"] == [f"{d:02d}" for d in range(1, 21)]
    # The manifest is the last file written and lists exactly the shards on disk.
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*.parquet"))
    assert files == sorted(s.path for s in manifest.shards)
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "test", "train", "validation"]


def test_full_ingest_shards_hold_whole_groups(full_local, omniglot_dir: Path) -> None:
    dest, _ = full_local
    manifest = shards.DataSet.open(str(dest)).manifest
    owner: dict[int, str] = {}
    rows_per_character: Counter = Counter()
    archives: Counter = Counter()
    for shard in manifest.shards:
        table = pq.read_table(dest / shard.path)
        assert table.schema.remove_metadata() == shards.schema(True, True, [pa.field("character_id", pa.int32()),
                                                                            pa.field("archive", pa.string())])
        assert table.num_rows == shard.rows
        assert set(table.column("split").to_pylist()) == {shard.split}
        assert len(set(table.column("group").to_pylist())) == 1  # one alphabet per shard
        archives.update(table.column("archive").to_pylist())
        for c, label in zip(table.column("character_id").to_pylist(), table.column("label").to_pylist()):
            assert owner.setdefault(c, shard.path) == shard.path, f"character {c} spans shards"
            rows_per_character[c] += 1
            assert label.split(".", 1)[0] == table.column("group")[0].as_py()
    assert len(owner) == 1623 and set(rows_per_character.values()) == {20}
    assert set(owner) == set(range(1, 1624))
    assert archives == {"images_background": 19_280, "images_evaluation": 13_180}


def test_full_ingest_rows_and_ids(full_local, omniglot_dir: Path) -> None:
    dest, _ = full_local
    dataset = shards.DataSet.open(str(dest))
    table = dataset.read_table("test")
    assert table.num_rows == 7640
    assert set(table.column("group").to_pylist()) == LAKE_TEST
    row = table.slice(0, 1).to_pylist()[0]
    alphabet, character_name = row["label"].split(".")
    assert row["group"] == alphabet
    assert row["image_id"] == f"images_evaluation/{alphabet}/{character_name}/" \
                              f"{row['character_id']:04d}_{row['source']}.png"
    with zipfile.ZipFile(omniglot_dir / "images_evaluation.zip") as z:
        assert z.read(row["image_id"]) == row["image"]  # PNG bytes unchanged
    assert len(set(table.column("image_id").to_pylist())) == 7640
    assert set(table.column("source").to_pylist()) == {f"{d:02d}" for d in range(1, 21)}
    assert dataset.verify().content_checksum == dataset.manifest.content_checksum


def test_rerun_is_a_noop(full_local, omniglot_dir: Path) -> None:
    dest, first = full_local
    before = snapshot(dest)
    manifest_bytes = (dest / "manifest.json").read_bytes()
    again = ingest.ingest(str(omniglot_dir), str(dest), log=quiet)
    assert again.skipped and again.manifest.content_checksum == first.manifest.content_checksum
    # The command line too (a fresh process; the no-op path never starts Ray).
    proc = subprocess.run([sys.executable, "-m", "workflows.ingest", "--source", str(omniglot_dir),
                           "--dest", str(dest)], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout
    assert snapshot(dest) == before
    assert (dest / "manifest.json").read_bytes() == manifest_bytes


def test_read_split_dataset_with_ray_data(full_local) -> None:
    dest, _ = full_local
    ds = shards.DataSet.open(str(dest)).ray_dataset("validation", columns=["label", "group"])
    assert ds.count() == 5540
    assert len({row["label"] for row in ds.iter_rows()}) == 277


# --------------------------------------------------------------------------- full data, S3


def test_full_ingest_to_s3(ray_cluster, s3_env, omniglot_dir: Path) -> None:
    bucket = s3_env.create_bucket()
    uri = f"s3://{bucket}/datasets/omniglot"
    rc = ingest.main(["--source", str(omniglot_dir), "--dest", uri, "--endpoint-url", s3_env.endpoint_url])
    assert rc == 0
    dataset = shards.DataSet.open(uri, endpoint_url=s3_env.endpoint_url)
    manifest = dataset.manifest
    assert split_counts(manifest) == expected_counts()
    keys = [k for k in s3_env.keys(bucket) if not k.endswith("/")]
    assert "datasets/omniglot/manifest.json" in keys
    assert sorted(k for k in keys if k.endswith(".parquet")) == \
        sorted(f"datasets/omniglot/{s.path}" for s in manifest.shards)
    assert len(keys) == len(manifest.shards) + 1  # no probe or temporary objects left
    table = dataset.read_table("train", columns=["label", "source"])
    assert table.num_rows == 19_280 and len(set(table.column("label").to_pylist())) == 964
    assert dataset.ray_dataset("test").count() == 7640
    assert dataset.verify().content_checksum == manifest.content_checksum
    # Same content again: nothing is written.
    manifest_obj = s3_env.client().get_object(Bucket=bucket, Key="datasets/omniglot/manifest.json")
    again = ingest.ingest(str(omniglot_dir), uri, endpoint_url=s3_env.endpoint_url, log=quiet)
    assert again.skipped
    after = s3_env.client().get_object(Bucket=bucket, Key="datasets/omniglot/manifest.json")
    assert after["ETag"] == manifest_obj["ETag"] and after["LastModified"] == manifest_obj["LastModified"]
    assert [k for k in s3_env.keys(bucket) if not k.endswith("/")] == keys


# --------------------------------------------------------------------------- S3 failures


def _no_manifest(s3_env, bucket: str) -> bool:
    return not any(k.endswith("manifest.json") for k in s3_env.keys(bucket))


def test_s3_missing_bucket_names_uri(s3_env, subset_a: Path, capsys) -> None:
    uri = "s3://bucket-that-does-not-exist/omniglot"
    rc = ingest.main(["--source", str(subset_a), "--dest", uri, "--endpoint-url", s3_env.endpoint_url,
                      "--allow-subset"])
    err = capsys.readouterr().err
    assert rc == 2 and uri in err and "does not exist" in err


def test_s3_unreachable_endpoint_names_uri(s3_env, subset_a: Path, capsys) -> None:
    uri = "s3://omniglot/data"
    rc = ingest.main(["--source", str(subset_a), "--dest", uri, "--allow-subset",
                      "--endpoint-url", f"http://127.0.0.1:{closed_port()}"])
    err = capsys.readouterr().err
    assert rc == 2 and uri in err and "cannot reach" in err


def test_s3_bad_credentials_names_uri(s3_env, subset_a: Path, monkeypatch, capsys) -> None:
    bucket = s3_env.create_bucket()
    uri = f"s3://{bucket}/omniglot"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    rc = ingest.main(["--source", str(subset_a), "--dest", uri, "--allow-subset",
                      "--endpoint-url", s3_env.endpoint_url])
    err = capsys.readouterr().err
    assert rc == 2 and uri in err and "access denied" in err
    assert s3_env.keys(bucket) == []
    # The reader refuses with the same clarity.
    with pytest.raises(shards.StorageError, match="access denied"):
        shards.DataSet.open(uri, endpoint_url=s3_env.endpoint_url)


def test_s3_reader_refuses_prefix_without_manifest(s3_env) -> None:
    bucket = s3_env.create_bucket()
    s3_env.client().put_object(Bucket=bucket, Key="omniglot/train/x.parquet", Body=b"not parquet")
    with pytest.raises(DatasetError, match=f"s3://{bucket}/omniglot/manifest.json does not exist"):
        shards.DataSet.open(f"s3://{bucket}/omniglot", endpoint_url=s3_env.endpoint_url)


# --------------------------------------------------------------------------- sources and failures


def test_subset_needs_allow_subset(subset_a: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with pytest.raises(IngestError, match="--allow-subset"):
        ingest.ingest(str(subset_a), str(dest), log=quiet)
    assert not dest.exists()  # the destination is left as it was


def test_missing_image_names_the_file(omniglot_dir: Path, tmp_path: Path) -> None:
    victim = "images_background/Latin/character05/0687_13.png"
    source = make_source(omniglot_dir, tmp_path / "src", drop={victim})
    dest = tmp_path / "out"
    with pytest.raises(IngestError, match=re.escape(victim)):
        ingest.ingest(str(source), str(dest), log=quiet)
    assert not (dest / "manifest.json").exists()


def test_corrupt_archive_names_the_file(omniglot_dir: Path, tmp_path: Path, capsys) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "images_background.zip").write_bytes((omniglot_dir / "images_background.zip").read_bytes()[:100_000])
    (source / "images_evaluation.zip").write_bytes((omniglot_dir / "images_evaluation.zip").read_bytes())
    rc = ingest.main(["--source", str(source), "--dest", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and str(source / "images_background.zip") in err
    assert not (tmp_path / "out").exists()


def test_corrupt_png_names_the_file(ray_cluster, omniglot_dir: Path, tmp_path: Path) -> None:
    victim = "images_evaluation/Angelic/character03/0967_07.png"
    source = make_source(omniglot_dir, tmp_path / "src", SUBSET_A, replace={victim: b"\x89PNG\r\n\x1a\nbroken"})
    dest = tmp_path / "out"
    with pytest.raises(IngestError, match=re.escape(victim)):
        ingest.ingest(str(source), str(dest), allow_subset=True, log=quiet)
    assert not dest.exists()  # nothing written, not even the folders


def test_subset_ingest_overwrite_and_verify(ray_cluster, omniglot_dir: Path, subset_a: Path,
                                            tmp_path: Path) -> None:
    dest = tmp_path / "out"
    first = ingest.ingest(str(subset_a), str(dest), allow_subset=True, log=quiet)
    assert split_counts(first.manifest) == subset_expected(SUBSET_A)
    old_shards = {s.path for s in first.manifest.shards}
    (dest / "NOTES.txt").write_text("not ours")
    # A different source into the same destination is refused...
    subset_b = make_source(omniglot_dir, tmp_path / "b", SUBSET_B)
    with pytest.raises(IngestError, match="another data set.*--overwrite"):
        ingest.ingest(str(subset_b), str(dest), allow_subset=True, log=quiet)
    assert shards.DataSet.open(str(dest)).manifest.content_checksum == first.manifest.content_checksum
    # ...unless --overwrite: the old shards go, unrelated files stay.
    second = ingest.ingest(str(subset_b), str(dest), allow_subset=True, overwrite=True, log=quiet)
    assert split_counts(second.manifest) == subset_expected(SUBSET_B)
    on_disk = {str(p.relative_to(dest)) for p in dest.rglob("*.parquet")}
    assert on_disk == {s.path for s in second.manifest.shards} and not on_disk & old_shards
    assert (dest / "NOTES.txt").read_text() == "not ours"
    shards.DataSet.open(str(dest)).verify()
    # Tampering with a shard is detected.
    shard = second.manifest.shards_of("test")[0]
    table = pq.read_table(dest / shard.path)
    images = table.column("image").to_pylist()
    images[0] = images[1]
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image",
                                    pa.array(images, pa.binary())), dest / shard.path)
    with pytest.raises(DatasetError, match="content checksum"):
        shards.DataSet.open(str(dest)).verify()


def test_a_manifest_from_before_new_classes_is_completed_by_a_rerun(ray_cluster, subset_a: Path,
                                                                    tmp_path: Path) -> None:
    """An Omniglot data set ingested before manifests said ``new_classes`` reads as "unchanged";
    running ingest again records the adapter's word, and only that: no shard is rewritten."""
    dest = tmp_path / "out"
    ingest.ingest(str(subset_a), str(dest), allow_subset=True, log=quiet)
    data = json.loads((dest / "manifest.json").read_text())
    del data["new_classes"]
    (dest / "manifest.json").write_text(json.dumps(data))
    assert shards.DataSet.open(str(dest)).manifest.new_classes == "unchanged"
    before = snapshot(dest)
    messages: list[str] = []
    again = ingest.ingest(str(subset_a), str(dest), allow_subset=True, log=messages.append)
    assert again.skipped and again.manifest.new_classes == OMNIGLOT_NEW_CLASSES != "unchanged"
    assert any(f"recorded its new_classes={OMNIGLOT_NEW_CLASSES}" in m for m in messages)
    assert shards.DataSet.open(str(dest)).manifest.new_classes == OMNIGLOT_NEW_CLASSES
    after = snapshot(dest)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}
    assert ingest.ingest(str(subset_a), str(dest), allow_subset=True, log=quiet).skipped  # now nothing to do


def test_failed_write_leaves_no_manifest_and_removes_own_shards(ray_cluster, subset_a: Path, tmp_path: Path,
                                                                monkeypatch) -> None:
    dest = tmp_path / "out"
    (dest / "train").mkdir(parents=True)
    (dest / "train" / "keep-me.txt").write_text("unrelated")

    def boom(*args, **kwargs):
        raise IngestError("simulated failure after the shards were written")

    monkeypatch.setattr(ingest, "build_manifest", boom)
    with pytest.raises(IngestError, match="simulated"):
        ingest.ingest(str(subset_a), str(dest), allow_subset=True, log=quiet)
    assert not (dest / "manifest.json").exists()
    assert list(dest.rglob("*.parquet")) == []
    assert (dest / "train" / "keep-me.txt").read_text() == "unrelated"


def test_leftover_shards_without_manifest_are_refused(subset_a: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    (dest / "train").mkdir(parents=True)
    (dest / "train" / "old.parquet").write_bytes(b"x")
    with pytest.raises(IngestError, match="no manifest.*--overwrite"):
        ingest.ingest(str(subset_a), str(dest), allow_subset=True, log=quiet)
    assert (dest / "train" / "old.parquet").exists()


# --------------------------------------------------------------------------- download path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_server(tmp_path: Path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_ingest_from_url(ray_cluster, http_server, subset_a: Path, omniglot_dir: Path, tmp_path: Path) -> None:
    root, base = http_server
    (root / "mirror").mkdir()
    checksums = []
    for name in download.ARCHIVE_FILES:
        data = (subset_a / name).read_bytes()
        (root / "mirror" / name).write_bytes(data)
        import hashlib

        checksums += ["--checksum", f"{name}=sha256:{hashlib.sha256(data).hexdigest()}"]
    dest = tmp_path / "out"
    rc = ingest.main(["--source", f"{base}/mirror", "--dest", str(dest), "--allow-subset",
                      "--cache-dir", str(tmp_path / "cache"), *checksums])
    assert rc == 0
    manifest = shards.DataSet.open(str(dest)).manifest
    assert manifest.source["kind"] == "omniglot" and manifest.source["uri"] == f"{base}/mirror"
    assert split_counts(manifest) == subset_expected(SUBSET_A)


def test_ingest_from_url_checksum_mismatch(http_server, subset_a: Path, tmp_path: Path, capsys) -> None:
    root, base = http_server
    (root / "mirror").mkdir()
    for name in download.ARCHIVE_FILES:
        (root / "mirror" / name).write_bytes((subset_a / name).read_bytes())
    dest = tmp_path / "out"
    rc = ingest.main(["--source", f"{base}/mirror", "--dest", str(dest), "--allow-subset",
                      "--cache-dir", str(tmp_path / "cache")])  # official MD5s: must not match
    err = capsys.readouterr().err
    assert rc == 2 and f"{base}/mirror/images_background.zip" in err and "checksum mismatch" in err
    assert list((tmp_path / "cache").iterdir()) == []
    assert not (dest / "manifest.json").exists()


# --------------------------------------------------------------------------- reader refusals


def test_reader_refuses_missing_or_invalid_manifest(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="manifest.json does not exist"):
        shards.DataSet.open(str(empty))
    with pytest.raises(DatasetError, match="does not exist"):
        shards.DataSet.open(str(tmp_path / "nowhere"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        shards.DataSet.open(str(bad))
    (bad / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DatasetError, match="format"):
        shards.DataSet.open(str(bad))


def test_split_as_names_splits_and_refuses_unknown_names() -> None:
    from workflows.ingest import IngestError, parse_split_as

    assert parse_split_as(["val=test"]) == {"validation": "test"}
    assert parse_split_as(["val=test", "dev=test"]) == {"validation": "test"}  # two names of one split
    for bad in ("val", "val=holdout", "=test"):
        with pytest.raises(IngestError, match="--split-as"):
            parse_split_as([bad])
    with pytest.raises(IngestError, match="both"):
        parse_split_as(["val=test", "valid=train"])
