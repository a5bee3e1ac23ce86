"""Re-identification: the gallery/query protocol, the "new" threshold, embed -> S3 -> predict --gallery."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_core import checkpoint
from siamese_core.config import ModelConfig, PreprocessConfig
from siamese_core.images import LabelledImages, class_codes
from siamese_core.model import build_model
from siamese_core.reid import NEW, Ranking, choose_new_threshold, rank, reid_trials


def _images(names: list[str], seed: int = 0) -> LabelledImages:
    rng = np.random.default_rng(seed)
    label, classes = class_codes(names)
    protos = rng.integers(0, 255, (len(classes), 3, 12, 12))
    pixels = np.clip(protos[label] + rng.normal(0, 20, (len(names), 3, 12, 12)), 0, 255).astype(np.uint8)
    return LabelledImages(images=pixels, label=label, classes=classes,
                          image_id=np.array([f"img{i}" for i in range(len(names))]))


def test_trials_hold_out_new_individuals_and_leave_each_query_out() -> None:
    names = [f"c{i}" for i in range(10) for _ in range(3)] + ["single"] + ["new_whale"] * 4
    images = _images(names)
    trials = reid_trials(images, new_share=0.2, seed=3, unknown_label="new_whale")
    assert len(trials.new_classes) == 2 and "new_whale" not in trials.new_classes  # 20% of the 11 known classes
    gallery_names = set(images.label_names[trials.gallery].tolist())
    assert not gallery_names & set(trials.new_classes) and "new_whale" not in gallery_names
    query_names = images.label_names[trials.queries]
    for seed in range(6):  # a known single image is a distractor in the gallery, never a query: nothing to find
        t = reid_trials(images, 0.2, seed=seed, unknown_label="new_whale")
        names = images.label_names
        if "single" not in t.new_classes:
            assert "single" in set(names[t.gallery].tolist()) and "single" not in set(names[t.queries].tolist())
    is_new = trials.truth == NEW
    new_rows = np.isin(images.label_names, list(trials.new_classes) + ["new_whale"])
    assert is_new.sum() == new_rows.sum()  # every image of a new individual is a query, truth "new"
    assert (query_names[~is_new] == trials.truth[~is_new]).all()
    again = reid_trials(images, new_share=0.2, seed=3, unknown_label="new_whale")
    assert again.new_classes == trials.new_classes and np.array_equal(again.queries, trials.queries)
    assert len({reid_trials(images, 0.2, seed=s, unknown_label="new_whale").new_classes for s in range(6)}) > 1
    with pytest.raises(ValueError, match="'new'"):
        reid_trials(_images(["a", "a", "new", "new"]), 0.0, 0)


def test_rank_matches_scoring_every_pair_with_the_head_and_leaves_the_query_out() -> None:
    images = _images([f"c{i}" for i in range(12) for _ in range(4)])
    cfg = ModelConfig(preset="t", input_size=12, channels=(4, 4, 4, 8), kernels=(3, 2, 1, 1), embedding_dim=16,
                      init="kaiming", preprocess=PreprocessConfig(color="rgb", invert=False))
    model = build_model(cfg, seed=0).eval()
    trials = reid_trials(images, 0.25, seed=0)
    ranking = rank(model, images, trials, k=5)
    with torch.no_grad():
        h = model.scoring_embed(torch.from_numpy(images.as_float()))
        logits = model.pairwise_logits(h[trials.queries], h[trials.gallery]).numpy()
    names = images.label_names
    for q, row in enumerate(logits):
        row = row.copy()
        row[trials.gallery == trials.queries[q]] = -np.inf  # not itself
        best: dict[str, float] = {}
        for score, g in zip(row, trials.gallery):
            best[names[g]] = max(best.get(names[g], -np.inf), score)
        expected = sorted(best, key=lambda n: -best[n])[:5]
        assert ranking.labels[q].tolist() == expected
        np.testing.assert_allclose(ranking.scores[q], [best[n] for n in expected], atol=1e-5)


def test_the_threshold_comes_from_validation_alone() -> None:
    """choose_new_threshold reads only the ranking it is given; the test split gets that number."""
    rng = np.random.default_rng(0)
    truth = np.array([f"c{i}" for i in range(30)] + [NEW] * 10, dtype=object)
    labels = np.array([[t if t != NEW and rng.random() < 0.8 else f"x{j}" for j in range(5)] for t in truth],
                      dtype=object)
    labels[:, 1:] = [[f"y{q}{j}" for j in range(4)] for q in range(40)]
    scores = np.sort(rng.normal(0, 1, (40, 5)).astype(np.float32), axis=1)[:, ::-1].copy()
    scores[30:] -= 3.0  # new individuals match badly
    validation = choose_new_threshold(Ranking(labels=labels, scores=scores, truth=truth, queries=np.arange(40)))
    m = validation.metrics()
    assert m["map5_new"] >= m["map5"] * 30 / 40  # inserting "new" at the chosen threshold helps
    thresholds, maps = validation.curve
    assert maps.max() == pytest.approx(m["map5_new"])
    with pytest.raises(ValueError, match="no new individual"):
        choose_new_threshold(Ranking(labels=labels[:30], scores=scores[:30], truth=truth[:30], queries=np.arange(30)))


class _SplitsInMemory:
    """A data set's splits as evaluate_reid reads them (``load_images``, ``manifest.unknown_label``)."""

    def __init__(self, by_split: dict[str, LabelledImages]) -> None:
        from types import SimpleNamespace

        self.by_split = by_split
        self.manifest = SimpleNamespace(unknown_label=None)

    def load_images(self, split: str, size: int, preprocess: PreprocessConfig, include_unknown: bool = False):
        return self.by_split[split]


def test_evaluate_reid_chooses_the_threshold_without_reading_the_test_split() -> None:
    """Two data sets that share validation and differ in test: the same threshold, other test figures;
    a different validation split moves the threshold (so it is read from validation, not fixed)."""
    from siamese_core.config import EvaluationConfig
    from workflows.evaluate import evaluate_reid

    cfg = ModelConfig(preset="t", input_size=12, channels=(4, 4, 4, 8), kernels=(3, 2, 1, 1), embedding_dim=16,
                      init="kaiming", preprocess=PreprocessConfig(color="rgb", invert=False))
    model = build_model(cfg, seed=0).eval()
    evaluation = EvaluationConfig(reid_new_share=0.3)
    names = [f"c{i}" for i in range(15) for _ in range(4)]
    validation, other_validation = _images(names, seed=1), _images(names, seed=7)
    reids = [evaluate_reid(model, _SplitsInMemory({"validation": v, "test": _images(names, seed=t)}), evaluation, 0)
             for v, t in ((validation, 2), (validation, 3), (other_validation, 2))]
    assert reids[0].test.threshold == reids[1].test.threshold == reids[0].validation.threshold
    assert reids[0].test.metrics() != reids[1].test.metrics()  # the test split was ranked, just never chosen on
    assert reids[2].test.threshold != reids[0].test.threshold


# ----------------------------------------------------------------------------- the workflow, end to end


def _png(seed: int, colour: np.ndarray) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(colour + rng.normal(0, 12, (20, 20, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def individuals(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """A folder of 12 individuals x 4 photos, each individual a colour; queries are other photos of them."""
    root = tmp_path_factory.mktemp("individuals")
    rng = np.random.default_rng(1)
    colours = {f"ind{i:02d}": rng.integers(30, 225, 3) for i in range(12)}
    for name, colour in colours.items():
        (root / "gallery" / name).mkdir(parents=True)
        for k in range(4):
            (root / "gallery" / name / f"{k}.png").write_bytes(_png(100 * int(name[3:]) + k, colour))
    (root / "queries").mkdir()
    for name in ("ind00", "ind05"):
        (root / "queries" / f"{name}.png").write_bytes(_png(999 + int(name[3:]), colours[name]))
    (root / "queries" / "stranger.png").write_bytes(_png(5, np.array([255, 0, 255])))
    return root, colours


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A network whose embedding is, in effect, the mean colour: trained for nothing, built to see colour."""
    cfg = ModelConfig(preset="colour", input_size=16, channels=(3, 3, 3, 3), kernels=(3, 2, 1, 1), embedding_dim=6,
                      init="kaiming", preprocess=PreprocessConfig(color="rgb", fit="stretch", invert=False,
                                                                  mean=(), std=()))
    net = build_model(cfg, seed=0)
    with torch.no_grad():
        net.head.weight.copy_(-(net.head.weight.abs() + 0.1))  # all negative: the faiss index path applies
    directory = tmp_path_factory.mktemp("colour-model")
    checkpoint.save(directory, net, new_threshold=0.3)
    return directory


@pytest.mark.integration
def test_embed_to_s3_then_predict_against_the_gallery(ray_cluster, s3_env, individuals, colour_model,
                                                      capsys) -> None:
    from workflows import embed, predict

    root, _ = individuals
    bucket = s3_env.create_bucket()
    out = f"s3://{bucket}/gallery"
    assert embed.main(["--model", str(colour_model), "--data", str(root / "gallery"), "--output", out,
                       "--endpoint-url", s3_env.endpoint_url, "--batch-size", "16"]) == 0
    capsys.readouterr()
    gallery = embed.Gallery.open(out, s3_env.endpoint_url)
    assert gallery.manifest["rows"] == 48 and gallery.manifest["embedding_dim"] == 6
    assert sorted(set(gallery.labels.tolist())) == sorted(f"ind{i:02d}" for i in range(12))
    keys = [k for k in s3_env.keys(bucket) if not k.endswith("/")]
    assert "gallery/embeddings.json" in keys and all(k.endswith((".parquet", ".json")) for k in keys)
    # the stored embeddings are the model's scoring embeddings of the images, decoded as it decodes them
    from siamese_core.evaluation import embed_images
    from siamese_core.images import decode_image

    net = checkpoint.load_model(colour_model)
    emb, ids = next(gallery.chunks())
    first = gallery.image_ids[ids[0]]
    pixels = decode_image((root / "gallery" / first).read_bytes(), net.config.preprocess, 16)
    np.testing.assert_allclose(emb[0], embed_images(net, pixels[None]).numpy()[0], atol=1e-6)
    # a re-run finds its output and does nothing
    before = s3_env.client().get_object(Bucket=bucket, Key="gallery/embeddings.json")["ETag"]
    assert embed.main(["--model", str(colour_model), "--data", str(root / "gallery"), "--output", out,
                       "--endpoint-url", s3_env.endpoint_url]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert s3_env.client().get_object(Bucket=bucket, Key="gallery/embeddings.json")["ETag"] == before

    code = predict.main(["--model", str(colour_model), "--gallery", out, "--query", str(root / "queries"),
                         "--endpoint-url", s3_env.endpoint_url, "--top-k", "3", "--new-threshold", "auto"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert code == 0 and list(rows[0]) == ["query", "rank", "label", "score"]
    by_query: dict[str, list[dict]] = {}
    for row in rows:
        by_query.setdefault(row["query"], []).append(row)
    assert {q: len(r) for q, r in by_query.items()} == {"ind00.png": 3, "ind05.png": 3, "stranger.png": 3}
    # the ranks are those of scoring every query-gallery pair with the head
    from siamese_core.reid import NEW

    for query, ranked in by_query.items():
        x = decode_image((root / "queries" / query).read_bytes(), net.config.preprocess, 16)
        hq = embed_images(net, x[None])
        all_emb = np.concatenate([e for e, _ in gallery.chunks()])
        with torch.no_grad():
            logits = net.pairwise_logits(hq, torch.from_numpy(all_emb)).numpy()[0]
        best: dict[str, float] = {}
        for score, label in zip(logits, gallery.labels):
            best[label] = max(best.get(label, -np.inf), float(score))
        order = sorted(best, key=lambda n: -best[n])
        expected_p = [1 / (1 + np.exp(-best[n])) for n in order]
        got = [r["label"] for r in ranked if r["label"] != NEW]
        assert got == order[:len(got)]
        if NEW in [r["label"] for r in ranked]:  # "new" sits where the best match falls below p = 0.3
            at = [r["label"] for r in ranked].index(NEW)
            assert all(p >= 0.3 for p in expected_p[:at]) and (at == len(got) or expected_p[at] < 0.3)
            assert float(ranked[at]["score"]) == pytest.approx(0.3, abs=1e-6)
    assert by_query["ind00.png"][0]["label"] == "ind00" and by_query["ind05.png"][0]["label"] == "ind05"


@pytest.mark.integration
def test_gallery_bad_input_is_a_clear_error(ray_cluster, individuals, colour_model, tmp_path, capsys) -> None:
    from workflows import embed, predict

    root, _ = individuals
    out = tmp_path / "gallery"
    assert embed.main(["--model", str(colour_model), "--data", str(root / "gallery"), "--output", str(out)]) == 0
    capsys.readouterr()

    def error(argv: list[str]) -> str:
        code = predict.main(argv)
        captured = capsys.readouterr()
        assert code == 2 and captured.out == "" and "Traceback" not in captured.err, captured.err
        return captured.err

    # an unreadable query image
    bad = tmp_path / "bad-queries"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not an image")
    err = error(["--model", str(colour_model), "--gallery", str(out), "--query", str(bad)])
    assert str(bad / "broken.png") in err
    # a gallery written by another model
    other = tmp_path / "other-model"
    other.mkdir()
    checkpoint.save(other, build_model(checkpoint.load_model(colour_model).config, seed=9))
    err = error(["--model", str(other), "--gallery", str(out), "--query", str(root / "queries")])
    assert "embedded by another model" in err
    # an empty gallery, and a folder that is no gallery at all
    empty = tmp_path / "empty"
    (empty / "images" / "x").mkdir(parents=True)
    assert embed.main(["--model", str(colour_model), "--data", str(empty / "images"), "--output",
                       str(empty / "g")]) == 2
    assert "holds no images" in capsys.readouterr().err
    err = error(["--model", str(colour_model), "--gallery", str(tmp_path), "--query", str(root / "queries")])
    assert "not a finished gallery" in err
    # auto needs a threshold stored with the model (the same weights, saved without one)
    bare = tmp_path / "no-threshold"
    bare.mkdir()
    checkpoint.save(bare, checkpoint.load_model(colour_model))
    err = error(["--model", str(bare), "--gallery", str(out), "--query", str(root / "queries"),
                 "--new-threshold", "auto"])
    assert "carries no threshold" in err
    for bad_p in ("1.5", "0", "often"):
        err = error(["--model", str(colour_model), "--gallery", str(out), "--query", str(root / "queries"),
                     "--new-threshold", bad_p])
        assert "--new-threshold takes a probability" in err
    # an interrupted run (files, no manifest) is started again and replaces its partial files
    (out / "embeddings.json").unlink()
    (out / "stale-part.parquet").write_bytes(b"partial")
    assert embed.main(["--model", str(colour_model), "--data", str(root / "gallery"), "--output", str(out)]) == 0
    assert not (out / "stale-part.parquet").exists()
    assert json.loads((out / "embeddings.json").read_text())["rows"] == 48


@pytest.mark.integration
def test_the_whale_workflow_from_a_table_with_unknown_individuals(ray_cluster, individuals, colour_model, tmp_path,
                                                                   capsys) -> None:
    """A Kaggle-style table (Image, Id, new_whale): ingested, embedded from the shards and straight from the
    table, then queries ranked with "new" at a given threshold; new_whale never becomes a gallery label."""
    from workflows import embed, ingest, predict
    from siamese_core.reid import NEW

    root, colours = individuals
    images = tmp_path / "whales" / "train"
    images.mkdir(parents=True)
    rows = []
    for name in sorted(colours):
        for k in range(4):
            file = f"{name}_{k}.jpg"
            (images / file).write_bytes((root / "gallery" / name / f"{k}.png").read_bytes())  # PNG bytes, .jpg name
            rows.append((file, name))
    for k in range(5):  # unknown individuals: kept in the data, never a class
        (images / f"unknown_{k}.jpg").write_bytes(_png(7000 + k, np.array([10, 240, 10])))
        rows.append((f"unknown_{k}.jpg", "new_whale"))
    table = tmp_path / "whales" / "train.csv"
    table.write_text("Image,Id\n" + "".join(f"{f},{i}\n" for f, i in rows))
    flags = ["--image-column", "Image", "--label-column", "Id", "--unknown-label", "new_whale",
             "--images-root", str(images)]

    assert ingest.main(["--source", str(table), "--dest", str(tmp_path / "shards"), *flags]) == 0
    from_shards, from_table = tmp_path / "g-shards", tmp_path / "g-table"
    assert embed.main(["--model", str(colour_model), "--data", str(tmp_path / "shards"), "--output",
                       str(from_shards)]) == 0
    assert embed.main(["--model", str(colour_model), "--data", str(table), "--output", str(from_table),
                       *flags]) == 0
    capsys.readouterr()
    for out in (from_shards, from_table):
        gallery = embed.Gallery.open(str(out))
        assert gallery.manifest["rows"] == len(rows) and gallery.manifest["data"]["unknown_label"] == "new_whale"
        code = predict.main(["--model", str(colour_model), "--gallery", str(out), "--query", str(root / "queries"),
                             "--top-k", "5", "--new-threshold", "0.5"])
        ranked = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
        assert code == 0 and {r["query"] for r in ranked} == {"ind00.png", "ind05.png", "stranger.png"}
        labels = {r["label"] for r in ranked}
        assert "new_whale" not in labels and labels <= set(colours) | {NEW}
        for query in ("ind00.png", "ind05.png", "stranger.png"):
            mine = [r for r in ranked if r["query"] == query]
            assert len(mine) == 5 and sum(r["label"] == NEW for r in mine) <= 1
            known = [float(r["score"]) for r in mine if r["label"] != NEW]
            assert known == sorted(known, reverse=True)
    # embedding only the test split of the ingested set: the gallery holds that split alone
    assert embed.main(["--model", str(colour_model), "--data", str(tmp_path / "shards"), "--split", "test",
                       "--output", str(tmp_path / "g-test")]) == 0
    test_gallery = embed.Gallery.open(str(tmp_path / "g-test"))
    assert 0 < test_gallery.manifest["rows"] < len(rows)
