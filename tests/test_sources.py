"""Own images through ingest: folders, tables (local and on S3), bad input, splits, single-image classes.

The images are made here with Pillow (colour, several sizes, a JPEG named .png), so each
case knows exactly what ingest must find.
"""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siamese_core.config import PreprocessConfig
from workflows import ingest, shards
from workflows.ingest import IngestError
from siamese_core.omniglot import OMNIGLOT_NEW_CLASSES

pytestmark = pytest.mark.integration


def quiet(message: str) -> None:
    pass


def image_bytes(seed: int, size: tuple[int, int] = (24, 20), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_folders(root: Path, classes: dict[str, int], start: int = 0) -> None:
    """``ROOT/CLASS/img_k.png`` with ``classes[name]`` images each, of a few sizes."""
    for c, (name, n) in enumerate(sorted(classes.items())):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            (root / name / f"img_{k}.png").write_bytes(image_bytes(start + 100 * c + k, size=(24 + k, 20)))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")} \
        if root.exists() else {}


def labels_by_split(dest: Path) -> dict[str, set[str]]:
    dataset = shards.DataSet.open(str(dest))
    return {split: set(dataset.read_table(split, ["label"]).column("label").to_pylist()) for split in shards.SPLITS}


def test_a_plain_folder_per_class_needs_no_flag(ray_cluster, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    classes = {f"item{i:02d}": 3 + i % 3 for i in range(30)}
    make_folders(root, classes)
    # A JPEG named .png, as in the lion set: read by its content.
    (root / "item00" / "odd.png").write_bytes(image_bytes(999, fmt="JPEG"))
    (root / ".DS_Store").write_bytes(b"junk")  # hidden: skipped and counted
    dest = tmp_path / "shards"
    result = ingest.ingest(str(root), str(dest), log=quiet)
    manifest = result.manifest
    assert manifest.name == "photos" and manifest.source["kind"] == "folder"
    assert manifest.counts["images"] == sum(classes.values()) + 1 and manifest.counts["classes"] == 30
    assert manifest.counts["ignored"] == {"hidden files": 1}
    assert manifest.columns == {"group": False, "source": False, "extra": []}
    # the defaults fit photographs: colour, padded to a square, not inverted, the training split's statistics
    pre = manifest.preprocessing
    assert (pre["color"], pre["fit"], pre["invert"]) == ("rgb", "pad", False)
    assert len(pre["mean"]["rgb"]) == 3 and 0.3 < pre["mean"]["rgb"][0] < 0.7 and len(pre["std"]["gray"]) == 1
    assert manifest.image_sizes["min"] == [24, 20] and manifest.image_sizes["max"][0] >= 28
    # a seeded split by class: validation and test get at least a fifth each, and no class is in two splits
    split = labels_by_split(dest)
    assert (len(split["validation"]), len(split["test"]), len(split["train"])) == (6, 6, 18)
    assert not (split["train"] & split["validation"]) and not (split["train"] & split["test"]) \
        and not (split["validation"] & split["test"])
    assert manifest.split_rule["rule"] == "seeded by class"
    assert manifest.new_classes == "unchanged"  # a turned photograph is the same object
    # every shard holds whole classes; the image bytes are unchanged
    dataset = shards.DataSet.open(str(dest))
    table = dataset.read_table("train", ["image_id", "image", "label"])
    for image_id, data in zip(table.column("image_id").to_pylist(), table.column("image").to_pylist()):
        assert (root / image_id).read_bytes() == data
    assert dataset.verify().content_checksum == manifest.content_checksum
    # the same seed gives the same split; another seed another one
    again = ingest.ingest(str(root), str(tmp_path / "again"), log=quiet)
    assert labels_by_split(tmp_path / "again") == split and again.manifest.content_checksum == manifest.content_checksum
    ingest.ingest(str(root), str(tmp_path / "other"), split_seed=1, log=quiet)
    assert labels_by_split(tmp_path / "other") != split


def test_groups_and_pre_split_folders(ray_cluster, tmp_path: Path) -> None:
    grouped = tmp_path / "grouped"
    for g in range(6):
        make_folders(grouped / f"group{g}", {f"c{c}": 2 for c in range(4)}, start=1000 * g)
    result = ingest.ingest(str(grouped), str(tmp_path / "g"), groups=True, log=quiet)
    manifest = result.manifest
    assert manifest.columns["group"] and manifest.counts["groups"] == 6 and manifest.counts["classes"] == 24
    assert manifest.split_rule["rule"] == "seeded by group"  # enough groups: whole groups per split
    dataset = shards.DataSet.open(str(tmp_path / "g"))
    groups_of = {s: set(dataset.read_table(s, ["group"]).column("group").to_pylist()) for s in shards.SPLITS}
    assert sum(len(v) for v in groups_of.values()) == 6 and all(groups_of.values())
    labels = set(dataset.read_table("train", ["label"]).column("label").to_pylist())
    assert all(re.fullmatch(r"group\d\.c\d", label) for label in labels)  # a class is named within its group

    presplit = tmp_path / "lions"
    make_folders(presplit / "train", {f"lion{i}": 3 for i in range(10)})
    make_folders(presplit / "val", {f"lion{i}": 3 for i in range(10, 16)}, start=5000)
    result = ingest.ingest(str(presplit), str(tmp_path / "p"), log=quiet)
    split = labels_by_split(tmp_path / "p")
    assert split["train"] == {f"lion{i}" for i in range(10)}
    # no test folder: the held-out val classes are split in two, by class
    assert split["validation"] | split["test"] == {f"lion{i}" for i in range(10, 16)}
    assert len(split["validation"]) == 3 and len(split["test"]) == 3
    assert result.manifest.split_rule["carved"] == {"test": "seeded by class from validation"}

    # --split-as val=test: the published val/ is the test split whole; validation comes from train
    result = ingest.ingest(str(presplit), str(tmp_path / "q"), split_as=ingest.parse_split_as(["val=test"]),
                           log=quiet)
    split = labels_by_split(tmp_path / "q")
    assert split["test"] == {f"lion{i}" for i in range(10, 16)}
    assert split["train"] | split["validation"] == {f"lion{i}" for i in range(10)}
    assert len(split["validation"]) == 2 and not split["train"] & split["validation"]
    assert result.manifest.split_rule["carved"] == {"validation": "seeded by class from train"}
    with pytest.raises(IngestError, match="does not give"):  # a folder the source has not got
        ingest.ingest(str(presplit), str(tmp_path / "r"), split_as={"test": "validation"}, log=quiet)
    assert not (tmp_path / "r").exists()


def test_a_table_with_groups_sources_splits_extras_and_unknown_individuals(ray_cluster, tmp_path: Path) -> None:
    images = tmp_path / "whales" / "train"
    images.mkdir(parents=True)
    rows = []
    for i in range(40):
        name = f"{i:04d}.jpg"
        (images / name).write_bytes(image_bytes(i, fmt="JPEG", mode="L"))
        whale = "new_whale" if i >= 36 else f"w_{i // 3:03d}"
        rows.append({"Image": name, "Id": whale, "camera": f"cam{i % 2}", "flank": "left" if i % 2 else "right"})
    table = tmp_path / "whales" / "train.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["Image", "Id", "camera", "flank"])
        writer.writeheader()
        writer.writerows(rows)
    dest = tmp_path / "shards"
    result = ingest.ingest(str(table), str(dest), table_options={
        "image_column": "Image", "label_column": "Id", "source_column": "camera", "images_root": str(images),
        "unknown_label": "new_whale"}, log=quiet)
    manifest = result.manifest
    assert manifest.unknown_label == "new_whale" and manifest.counts["unknown_label_images"] == 4
    assert manifest.counts["classes"] == 12  # w_000..w_011; new_whale is kept but never a class
    assert manifest.columns == {"group": False, "source": True, "extra": ["flank"]}
    assert manifest.preprocessing["color"] == "gray"  # every image has no colour
    dataset = shards.DataSet.open(str(dest))
    train = dataset.read_table("train")
    assert "new_whale" not in train.column("label").to_pylist()  # never trained on
    held = [dataset.read_table(s, ["label"]).column("label").to_pylist() for s in ("validation", "test")]
    assert sum(x.count("new_whale") for x in held) == 4  # they wait in the held-out splits, as queries
    assert set(train.column("flank").to_pylist()) == {"left", "right"}  # the table's own column passed through
    assert set(train.column("source").to_pylist()) == {"cam0", "cam1"}
    # loading a split for a model leaves them out too
    assert dataset.load_images("test", 16, PreprocessConfig()).classes == tuple(sorted(set(held[1]) - {"new_whale"}))


def test_a_parquet_table_with_group_and_split_columns(ray_cluster, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = tmp_path / "parts"
    images.mkdir()
    rows = {"file": [], "part": [], "family": [], "subset": []}
    for i in range(36):
        (images / f"p{i}.png").write_bytes(image_bytes(i))
        family = i // 12  # 3 families of 4 parts, 3 photos each
        rows["file"].append(f"p{i}.png")
        rows["part"].append(f"part{i // 3}")
        rows["family"].append(f"fam{family}")
        rows["subset"].append(["train", "val", "test"][family])
    pq.write_table(pa.table(rows), tmp_path / "parts.parquet")
    assert ingest.main(["--source", str(tmp_path / "parts.parquet"), "--dest", str(tmp_path / "shards"),
                        "--image-column", "file", "--label-column", "part", "--group-column", "family",
                        "--split-column", "subset", "--images-root", str(images)]) == 0
    dataset = shards.DataSet.open(str(tmp_path / "shards"))
    assert dataset.manifest.columns["group"] and dataset.manifest.split_rule["rule"] == "given"
    groups = {s: set(dataset.read_table(s, ["group"]).column("group").to_pylist()) for s in shards.SPLITS}
    assert groups == {"train": {"fam0"}, "validation": {"fam1"}, "test": {"fam2"}}
    assert [dataset.class_count(s) for s in shards.SPLITS] == [4, 4, 4]


def test_a_table_of_images_under_s3(ray_cluster, s3_env, tmp_path: Path) -> None:
    bucket = s3_env.create_bucket()
    client = s3_env.client()
    lines = ["path,label"]
    for i in range(24):
        client.put_object(Bucket=bucket, Key=f"raw/img{i}.png", Body=image_bytes(i))
        lines.append(f"img{i}.png,c{i // 4}")
    client.put_object(Bucket=bucket, Key="raw/labels.csv", Body="\n".join(lines).encode())
    dest = f"s3://{bucket}/shards"
    rc = ingest.main(["--source", f"s3://{bucket}/raw/labels.csv", "--dest", dest,
                      "--endpoint-url", s3_env.endpoint_url, "--split-fractions", "0.5,0.25,0.25"])
    assert rc == 0
    dataset = shards.DataSet.open(dest, endpoint_url=s3_env.endpoint_url)
    assert (dataset.manifest.counts["images"], dataset.manifest.counts["classes"]) == (24, 6)
    assert [dataset.class_count(s) for s in shards.SPLITS] == [2, 2, 2]  # the fractions as given
    assert dataset.verify().counts["images"] == 24
    assert dataset.manifest.source["images_root"] == f"s3://{bucket}/raw/"


BAD_CASES = ["corrupt", "truncated", "empty", "missing file", "no label", "listed twice", "bad label"]


def _bad_table(root: Path, case: str) -> Path:
    """A 12-image table with one bad row or file of the given kind; returns the table's path."""
    images = root / "images"
    images.mkdir(parents=True)
    lines = ["image,label"]
    for i in range(12):
        (images / f"{i}.png").write_bytes(image_bytes(i))
        lines.append(f"{i}.png,c{i % 4}")
    good = (images / "3.png").read_bytes()
    if case == "corrupt":
        (images / "3.png").write_bytes(b"this is no image at all")
    elif case == "truncated":
        (images / "3.png").write_bytes(good[: len(good) // 2])
    elif case == "empty":
        (images / "3.png").write_bytes(b"")
    elif case == "missing file":
        lines.append("gone.png,c0")
    elif case == "no label":
        lines[4] = "3.png,"
    elif case == "listed twice":
        lines.append("3.png,c1")
    elif case == "bad label":
        lines[4] = "3.png,a/b"
    table = root / "labels.csv"
    table.write_text("\n".join(lines) + "\n")
    return table


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_stops_with_its_name_and_changes_nothing(ray_cluster, tmp_path: Path, case: str,
                                                           capsys: pytest.CaptureFixture) -> None:
    table = _bad_table(tmp_path / "src", case)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "NOTES.txt").write_text("the user's")
    before = snapshot(dest)
    rc = ingest.main(["--source", str(table), "--dest", str(dest), "--images-root", str(table.parent / "images")])
    err = capsys.readouterr().err
    assert rc == 2, err
    expected = {"corrupt": "3.png", "truncated": "3.png", "empty": "3.png", "missing file": "gone.png",
                "no label": "row 5", "listed twice": "row 14", "bad label": "a/b"}[case]
    assert expected in err and "--skip-bad" in err, err
    assert snapshot(dest) == before  # no manifest, no shard, no folder: as it was
    # With --skip-bad the rest goes in; the bad one is listed in the manifest and counted.
    rc = ingest.main(["--source", str(table), "--dest", str(dest), "--images-root", str(table.parent / "images"),
                      "--skip-bad", "--split-fractions", "0.5,0.25,0.25"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    manifest = json.loads((dest / "manifest.json").read_text())
    assert len(manifest["rejected"]) == 1 and expected in json.dumps(manifest["rejected"])
    assert "left out 1 bad" in out.out
    stored = manifest["counts"]["images"]
    assert stored == (12 if case in ("missing file", "listed twice") else 11)
    if case == "corrupt":  # replacing that data set with --overwrite: bad input still leaves it as it was
        images = table.parent / "images"
        (images / "3.png").write_bytes(image_bytes(3))
        (images / "7.png").write_bytes(b"broken too")
        files = lambda: {k: v for k, v in snapshot(dest).items() if (dest / k).is_file()}  # noqa: E731
        before = files()
        rc = ingest.main(["--source", str(table), "--dest", str(dest), "--images-root", str(images), "--overwrite"])
        assert rc == 2 and "7.png" in capsys.readouterr().err
        assert files() == before  # the old manifest and shards, unchanged; none of this run's


def test_every_problem_is_named_up_to_the_limit(ray_cluster, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_folders(root, {f"c{i}": 3 for i in range(6)})
    for i in range(6):
        (root / f"c{i}" / "notes.txt").write_text("not an image")
    with pytest.raises(IngestError) as info:
        ingest.ingest(str(root), str(tmp_path / "d"), max_problems=4, log=quiet)
    message = str(info.value)
    assert message.startswith("6 bad file(s)") and message.count("notes.txt") == 4 and "and 2 more" in message


def test_single_image_classes_are_kept(ray_cluster, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_folders(root, {**{f"many{i}": 4 for i in range(25)}, **{f"one{i}": 1 for i in range(10)}})
    result = ingest.ingest(str(root), str(tmp_path / "d"), log=quiet)
    assert result.manifest.counts["single_image_classes"] == 10 and result.manifest.counts["classes"] == 35


def test_omniglot_as_folders_and_as_a_table_matches_the_adapter(ray_cluster, omniglot_dir: Path,
                                                                tmp_path: Path) -> None:
    """Three alphabets through each source: the same images, classes and groups."""
    from omniglot_sources import make_source

    alphabets = {"Latin", "Greek", "Braille", "Angelic", "Atlantean"}
    archives = make_source(omniglot_dir, tmp_path / "zips", alphabets)
    adapter = ingest.ingest(str(archives), str(tmp_path / "a"), allow_subset=True, log=quiet).manifest
    folders, rows = tmp_path / "folders", ["path,label,group,source,split"]
    for name in ("images_background.zip", "images_evaluation.zip"):
        with zipfile.ZipFile(archives / name) as z:
            for member in z.namelist():
                if not member.endswith(".png"):
                    continue
                _, alphabet, character, file = member.split("/")
                target = folders / alphabet / character / file
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(member))
                split = "train" if name.startswith("images_background") else (
                    "test" if alphabet == "Atlantean" else "validation")
                rows.append(f"{alphabet}/{character}/{file},{alphabet}.{character},{alphabet},"
                            f"{file[5:7]},{split}")
    (folders / "labels.csv").write_text("\n".join(rows) + "\n")
    as_folders = ingest.ingest(str(folders), str(tmp_path / "f"), groups=True, log=quiet).manifest
    as_table = ingest.ingest(str(folders / "labels.csv"), str(tmp_path / "t"), table_options={
        "group_column": "group", "source_column": "source", "split_column": "split"}, log=quiet).manifest
    assert adapter.new_classes == OMNIGLOT_NEW_CLASSES != "unchanged"  # a turned character is another
    for manifest in (as_folders, as_table):
        assert manifest.new_classes == "unchanged"  # ... which plain folders and tables do not say
        assert manifest.counts["images"] == adapter.counts["images"] == 20 * (26 + 24 + 26 + 20 + 26)
        assert manifest.counts["classes"] == adapter.counts["classes"] == 26 + 24 + 26 + 20 + 26
        assert manifest.counts["groups"] == adapter.counts["groups"] == 5

    def classes(dest: str) -> set[str]:
        dataset = shards.DataSet.open(dest)
        return {label for s in shards.SPLITS for label in dataset.read_table(s, ["label"]).column("label").to_pylist()}

    assert classes(str(tmp_path / "f")) == classes(str(tmp_path / "a")) == classes(str(tmp_path / "t"))
    # with the split column the table reproduces Lake's splits too
    assert {s: v["classes"] for s, v in as_table.splits.items()} == {s: v["classes"] for s, v in adapter.splits.items()}


def test_new_classes_are_the_ingests_word_and_a_new_word_is_a_new_data_set(ray_cluster, tmp_path: Path) -> None:
    """``--new-classes`` records that a turned or mirrored image is another class (symbols), in the
    manifest that training takes ``pairs.new_classes`` from; saying it changes the data set, so
    the same destination needs ``--overwrite``, and a wrong word is refused by the parser."""
    root = tmp_path / "symbols"
    make_folders(root, {f"sym{i:02d}": 3 for i in range(12)})
    dest = tmp_path / "shards"
    assert ingest.main(["--source", str(root), "--dest", str(dest), "--new-classes", "rot90"]) == 0
    assert shards.DataSet.open(str(dest)).manifest.new_classes == "rot90"
    assert ingest.main(["--source", str(root), "--dest", str(dest), "--new-classes", "rot90"]) == 0  # nothing to do
    with pytest.raises(IngestError, match="--overwrite"):
        ingest.ingest(str(root), str(dest), new_classes="dihedral", log=quiet)
    assert shards.DataSet.open(str(dest)).manifest.new_classes == "rot90"
    assert ingest.ingest(str(root), str(dest), new_classes="dihedral", overwrite=True, log=quiet) \
        .manifest.new_classes == "dihedral"
    with pytest.raises(SystemExit):
        ingest.build_parser().parse_args(["--source", str(root), "--new-classes", "rot45"])
