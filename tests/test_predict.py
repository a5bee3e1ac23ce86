"""``python -m workflows.predict`` on a handmade support/query folder of real Omniglot images.

The model is a tiny random SiameseNet whose head weights are all negative:
its logit is ``b - sum_j |w_j| |h1_j - h2_j|``, largest (= ``b``) exactly when
the two embeddings are equal. So a query that is a pixel-exact copy of a
support image, after preprocessing, must be predicted as that class with score
``sigmoid(b)``; every other score is checked against ``model.similarity``
computed pair by pair with the evaluation pipeline's own decoding.
"""

from __future__ import annotations

import csv
import io
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_core import checkpoint
from siamese_core.config import PAPER_PREPROCESS, ModelConfig, PreprocessConfig
from siamese_core.images import LabelledImages, decode_image
from siamese_core.model import build_model, with_test_time_shift
from workflows import predict

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ALPHABET = "images_background/Latin"
CLASSES = ["alpha", "beta", "gamma", "delta", "eps"]  # Latin character01..05
HEAD_BIAS = 2.0
SIZE = 35


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pngs(omniglot_dir: Path) -> dict[tuple[str, int], bytes]:
    """Original PNG bytes of drawers 1-3 of five Latin characters, keyed (class, drawer)."""
    out = {}
    with zipfile.ZipFile(omniglot_dir / "images_background.zip") as archive:
        names = sorted(n for n in archive.namelist() if n.startswith(ALPHABET + "/character0") and n.endswith(".png"))
        for cls, number in zip(CLASSES, range(1, 6)):
            for drawer in (1, 2, 3):
                [name] = [n for n in names if f"/character{number:02d}/" in n and n.endswith(f"_{drawer:02d}.png")]
                out[cls, drawer] = archive.read(name)
    return out


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(preset="tiny-test", input_size=SIZE, channels=(4, 8, 8, 16), kernels=(3, 3, 2, 2),
                      embedding_dim=32, init="kaiming")
    net = build_model(cfg, seed=0)
    with torch.no_grad():
        net.head.weight.copy_(-(net.head.weight.abs() + 0.05))
        net.head.bias.fill_(HEAD_BIAS)
    return net.eval()


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-model")
    checkpoint.save(directory, model)
    return directory


# Exact copies of support images in other formats/modes: (query path, class, bytes builder).
def _copies(pngs):
    original = {cls: Image.open(io.BytesIO(pngs[cls, 1])) for cls in CLASSES}
    gray = original["gamma"].convert("L")
    transparent = Image.new("RGBA", gray.size, (0, 0, 0, 0))
    transparent.putalpha(Image.eval(gray, lambda v: 255 - v))  # black ink, transparent paper
    return {
        "copies/alpha_rgb.png": ("alpha", _encode(original["alpha"].convert("RGB"), "PNG")),
        "copies/beta.bmp": ("beta", _encode(original["beta"].convert("RGB"), "BMP")),
        "copies/gamma_rgba.png": ("gamma", _encode(transparent, "PNG")),
        "copies/delta_gray.tiff": ("delta", _encode(original["delta"].convert("L"), "TIFF")),
        # a copy of the *second* example of the two-image class: best-match scoring finds it
        "copies/eps_03.png": ("eps", pngs["eps", 3]),
    }


@pytest.fixture(scope="module")
def folders(pngs, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("predict")
    support, query = root / "support", root / "query"
    support.mkdir()
    for cls in ("alpha", "beta", "gamma"):
        (support / f"{cls}.png").write_bytes(pngs[cls, 1])
    (support / "delta").mkdir()  # a class given as a subfolder with one image
    (support / "delta" / "example.png").write_bytes(pngs["delta", 1])
    (support / "eps").mkdir()  # a class with two examples
    (support / "eps" / "a.png").write_bytes(pngs["eps", 1])
    (support / "eps" / "b.png").write_bytes(pngs["eps", 3])
    (support / "README.txt").write_text("not an image: skipped")
    (support / ".hidden.png").write_bytes(b"not even an image: hidden, skipped")

    for cls in CLASSES:  # other drawer's versions, in a nested folder
        (query / "drawer2").mkdir(parents=True, exist_ok=True)
        (query / "drawer2" / f"{cls}.png").write_bytes(pngs[cls, 2])
    for rel, (_, data) in _copies(pngs).items():
        (query / rel).parent.mkdir(parents=True, exist_ok=True)
        (query / rel).write_bytes(data)
    big = Image.open(io.BytesIO(pngs["beta", 1])).convert("RGB").resize((160, 120), Image.BILINEAR)
    (query / "beta_big.jpg").write_bytes(_encode(big, "JPEG", quality=95))
    (query / "notes.md").write_text("skipped")
    return support, query


def _run(argv, capsys) -> tuple[int, str, str]:
    code = predict.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _rows(text: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames == ["query", "predicted", "score"]
    return list(reader)


def _decode_like_evaluation(files: list[Path], preprocess: PreprocessConfig = PAPER_PREPROCESS,
                            size: int = SIZE) -> torch.Tensor:
    """The images as evaluation decodes shard rows (``LabelledImages.decode``), float [N,C,S,S]."""
    images = LabelledImages.decode([f.read_bytes() for f in files], ["a"] * len(files), [str(f) for f in files],
                                   preprocess, size)
    return torch.from_numpy(images.as_float())


def _support_files(support: Path) -> dict[str, list[Path]]:
    return {"alpha": [support / "alpha.png"], "beta": [support / "beta.png"], "gamma": [support / "gamma.png"],
            "delta": [support / "delta" / "example.png"], "eps": [support / "eps" / "a.png", support / "eps" / "b.png"]}


def _expected_queries(pngs) -> list[str]:
    names = [f"drawer2/{c}.png" for c in CLASSES] + list(_copies(pngs)) + ["beta_big.jpg"]
    return sorted(names)


def _direct_scores(model, query_files: list[Path], classes: dict[str, list[Path]]) -> list[dict[str, float]]:
    """Per query, per class: the best ``model.similarity`` over the class's images, pair by pair."""
    names = [c for c, files in classes.items() for _ in files]
    pre, size = model.config.preprocess, model.config.input_size
    xs = _decode_like_evaluation([f for files in classes.values() for f in files], pre, size)
    xq = _decode_like_evaluation(query_files, pre, size)
    left = xq.repeat_interleave(len(names), dim=0)
    right = xs.repeat(len(query_files), 1, 1, 1)
    with torch.no_grad():
        p = model.similarity(left, right).reshape(len(query_files), len(names))
    return [{c: max(float(row[j]) for j, n in enumerate(names) if n == c) for c in classes} for row in p]


def test_predict_csv_matches_pairwise_similarity(model, model_dir, folders, pngs, capsys):
    support, query = folders
    code, out, err = _run(["--model", model_dir, "--support", support, "--query", query], capsys)
    assert code == 0, err
    rows = _rows(out)
    assert [r["query"] for r in rows] == _expected_queries(pngs)

    classes = _support_files(support)
    direct = _direct_scores(model, [query / r["query"] for r in rows], classes)
    for row, per_class in zip(rows, direct):
        assert row["predicted"] in classes
        score = float(row["score"])
        assert 0.0 <= score <= 1.0
        best = max(per_class, key=per_class.get)
        assert row["predicted"] == best, (row, per_class)
        assert score == pytest.approx(per_class[best], abs=1e-5)


def test_test_time_views_can_be_asked_for(model, model_dir, folders, pngs, capsys):
    support, query = folders
    code, out, err = _run(["--model", model_dir, "--support", support, "--query", query,
                           "--test-time-shift-px", "1"], capsys)
    assert code == 0, err
    rows = _rows(out)
    viewed = with_test_time_shift(model, 1)
    direct = _direct_scores(viewed, [query / r["query"] for r in rows], _support_files(support))
    plain = _direct_scores(model, [query / r["query"] for r in rows], _support_files(support))
    assert direct != plain  # the views change the scores
    for row, per_class in zip(rows, direct):
        best = max(per_class, key=per_class.get)
        assert row["predicted"] == best and float(row["score"]) == pytest.approx(per_class[best], abs=1e-5)
    code, _, err = _run(["--model", model_dir, "--support", support, "--query", query,
                         "--test-time-shift-px", "-1"], capsys)
    assert code == 2 and "model.test_time_shift_px must be" in err
    # the square pattern: every shift within 1 px (9 views)
    code, out, err = _run(["--model", model_dir, "--support", support, "--query", query,
                           "--test-time-shift-px", "1", "--test-time-views", "square"], capsys)
    assert code == 0, err
    rows = _rows(out)
    squared = _direct_scores(with_test_time_shift(model, 1, "square"), [query / r["query"] for r in rows],
                             _support_files(support))
    assert squared != direct
    for row, per_class in zip(rows, squared):
        best = max(per_class, key=per_class.get)
        assert row["predicted"] == best and float(row["score"]) == pytest.approx(per_class[best], abs=1e-5)


def test_exact_copies_in_any_format_are_recognised(model, folders, model_dir, pngs, capsys):
    support, query = folders
    code, out, err = _run(["--model", model_dir, "--support", support, "--query", query], capsys)
    assert code == 0, err
    rows = {r["query"]: r for r in _rows(out)}
    top = 1.0 / (1.0 + math.exp(-HEAD_BIAS))
    copies = _copies(pngs)
    direct = _direct_scores(model, [query / rel for rel in copies], _support_files(support))
    for (rel, (cls, _)), scores in zip(copies.items(), direct):
        assert rows[rel]["predicted"] == cls, rel
        assert float(rows[rel]["score"]) == pytest.approx(top, abs=1e-5), rel
        # the assertion is meaningful: every other class scores clearly lower
        assert max(s for c, s in scores.items() if c != cls) < top - 1e-3, (rel, scores)
    # A resized RGB JPEG of a support image is not pixel-exact but still nearest to it.
    assert rows["beta_big.jpg"]["predicted"] == "beta"
    assert float(rows["beta_big.jpg"]["score"]) < top


def test_output_file_and_real_entrypoint(model_dir, folders, tmp_path, capsys):
    support, query = folders
    target = tmp_path / "predictions.csv"
    code, out, err = _run(["--model", model_dir, "--support", support, "--query", query, "--output", target], capsys)
    assert code == 0, err
    assert out == ""
    assert "wrote 11 predictions (5 classes)" in err
    from_main = target.read_text()

    done = subprocess.run([sys.executable, "-m", "workflows.predict", "--model", str(model_dir),
                           "--support", str(support), "--query", str(query)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == from_main
    assert len(_rows(done.stdout)) == 11

    missing = subprocess.run([sys.executable, "-m", "workflows.predict", "--model", str(model_dir),
                              "--support", str(tmp_path / "nope"), "--query", str(query)],
                             cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert str(tmp_path / "nope") in missing.stderr and "does not exist" in missing.stderr


def test_decode_image_is_the_evaluation_preprocessing(pngs):
    """Every colour mode of one image decodes like the PNG in the shards: grayscale, resized, inverted."""
    original = pngs["alpha", 1]
    reference = decode_image(original, PAPER_PREPROCESS, SIZE)
    img = Image.open(io.BytesIO(original))
    assert img.mode == "1"
    gray = img.convert("L")
    # the paper's preprocessing, computed here with Pillow alone: ink (dark) becomes 255
    by_hand = 255 - np.asarray(gray.resize((SIZE, SIZE), Image.BILINEAR), dtype=np.uint8)
    np.testing.assert_array_equal(reference[0], by_hand)
    transparent = Image.new("LA", gray.size, (0, 0))
    transparent.putalpha(Image.eval(gray, lambda v: 255 - v))
    for data in [_encode(gray, "PNG"), _encode(img.convert("RGB"), "PNG"), _encode(img.convert("RGBA"), "PNG"),
                 _encode(transparent, "PNG"), _encode(img.convert("P"), "GIF"), _encode(gray, "BMP"),
                 _encode(Image.fromarray(np.asarray(gray).astype(np.uint16) * 257), "PNG")]:
        np.testing.assert_array_equal(decode_image(data, PAPER_PREPROCESS, SIZE), reference)
    assert decode_image(original).shape == (1, 105, 105)
    assert decode_image(original, size=SIZE).dtype == np.uint8


# ----------------------------------------------------------------------------- errors

def _error(argv, capsys) -> str:
    code, out, err = _run(argv, capsys)
    assert code == 2, (out, err)
    assert out == ""
    assert "error:" in err
    return err


def test_missing_folders(model_dir, folders, tmp_path, capsys):
    support, query = folders
    err = _error(["--model", model_dir, "--support", tmp_path / "absent", "--query", query], capsys)
    assert f"support folder {tmp_path / 'absent'} does not exist" in err
    err = _error(["--model", model_dir, "--support", support, "--query", tmp_path / "absent-q"], capsys)
    assert f"query folder {tmp_path / 'absent-q'} does not exist" in err
    (tmp_path / "file.png").write_bytes(b"x")
    err = _error(["--model", model_dir, "--support", tmp_path / "file.png", "--query", query], capsys)
    assert "is not a folder" in err


def test_empty_folders(model_dir, folders, tmp_path, capsys):
    support, query = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    err = _error(["--model", model_dir, "--support", empty, "--query", query], capsys)
    assert f"support folder {empty} holds no images" in err
    err = _error(["--model", model_dir, "--support", support, "--query", empty], capsys)
    assert f"query folder {empty} holds no images" in err
    hollow = tmp_path / "hollow"
    (hollow / "cls").mkdir(parents=True)
    (hollow / "other.png").write_bytes(b"x")
    err = _error(["--model", model_dir, "--support", hollow, "--query", query], capsys)
    assert f"support class folder {hollow / 'cls'} holds no images" in err


def test_corrupt_images_are_named(model_dir, folders, pngs, tmp_path, capsys):
    support, query = folders
    bad_query = tmp_path / "q"
    bad_query.mkdir()
    (bad_query / "good.png").write_bytes(pngs["alpha", 2])
    (bad_query / "broken.png").write_bytes(pngs["alpha", 2][:100])  # truncated
    err = _error(["--model", model_dir, "--support", support, "--query", bad_query], capsys)
    assert str(bad_query / "broken.png") in err

    bad_support = tmp_path / "s"
    bad_support.mkdir()
    (bad_support / "alpha.png").write_bytes(pngs["alpha", 1])
    (bad_support / "beta.jpg").write_bytes(b"this is not a jpeg")
    err = _error(["--model", model_dir, "--support", bad_support, "--query", query], capsys)
    assert str(bad_support / "beta.jpg") in err and "corrupt image" in err


def test_duplicate_class_names(model_dir, folders, pngs, tmp_path, capsys):
    _, query = folders
    twice = tmp_path / "twice"
    twice.mkdir()
    (twice / "alpha.png").write_bytes(pngs["alpha", 1])
    (twice / "alpha.jpg").write_bytes(_encode(Image.open(io.BytesIO(pngs["alpha", 1])).convert("RGB"), "JPEG"))
    err = _error(["--model", model_dir, "--support", twice, "--query", query], capsys)
    assert "two entries for class 'alpha'" in err and "alpha.jpg" in err and "alpha.png" in err

    mixed = tmp_path / "mixed"
    (mixed / "beta").mkdir(parents=True)
    (mixed / "beta" / "x.png").write_bytes(pngs["beta", 1])
    (mixed / "beta.png").write_bytes(pngs["beta", 1])
    err = _error(["--model", model_dir, "--support", mixed, "--query", query], capsys)
    assert "two entries for class 'beta'" in err


def test_bad_model_spec(folders, tmp_path, capsys):
    support, query = folders
    err = _error(["--model", tmp_path / "no-such-model", "--support", support, "--query", query], capsys)
    assert str(tmp_path / "no-such-model") in err


def test_single_class_warns(model_dir, folders, pngs, tmp_path, capsys):
    _, query = folders
    one = tmp_path / "one"
    one.mkdir()
    (one / "alpha.png").write_bytes(pngs["alpha", 1])
    code, out, err = _run(["--model", model_dir, "--support", one, "--query", query], capsys)
    assert code == 0
    assert "single class" in err
    assert {r["predicted"] for r in _rows(out)} == {"alpha"}


@pytest.mark.integration
def test_registered_mlflow_model_predicts_like_its_checkpoint(model, model_dir, folders, tmp_path, capsys,
                                                              monkeypatch):
    from workflows import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking.mlflow_run(uri, "predict-test", run_name="log"):
        tracking.log_model(model, "predict-model")
    support, query = folders
    code, from_ckpt, err = _run(["--model", model_dir, "--support", support, "--query", query], capsys)
    assert code == 0, err
    code, from_mlflow, err = _run(["--model", "models:/predict-model/1", "--tracking-uri", uri,
                                   "--support", support, "--query", query], capsys)
    assert code == 0, err
    assert from_mlflow == from_ckpt


@pytest.mark.integration
def test_a_colour_models_preprocessing_travels_from_the_registry_into_predict(pngs, folders, tmp_path, capsys,
                                                                            monkeypatch):
    """An RGB model with its own fit, polarity and normalisation: the registered model decodes exactly as
    its checkpoint, and the served model (MLflow's pyfunc, image bytes in) scores as the network does."""
    import mlflow

    from workflows import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    pre = PreprocessConfig(color="rgb", fit="crop", invert=False, mean=(0.8, 0.7, 0.6), std=(0.3, 0.2, 0.25))
    cfg = ModelConfig(preset="tiny-rgb", input_size=SIZE, channels=(4, 8, 8, 16), kernels=(3, 3, 2, 2),
                      embedding_dim=32, init="kaiming", preprocess=pre)
    net = build_model(cfg, seed=1).eval()
    assert net.conv1.in_channels == 3
    ckpt = tmp_path / "rgb"
    ckpt.mkdir()
    checkpoint.save(ckpt, net)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking.mlflow_run(uri, "predict-rgb", run_name="log"):
        tracking.log_model(net, "rgb-model")
    support, query = folders
    code, from_ckpt, err = _run(["--model", ckpt, "--support", support, "--query", query], capsys)
    assert code == 0, err
    code, from_mlflow, err = _run(["--model", "models:/rgb-model/1", "--tracking-uri", uri,
                                   "--support", support, "--query", query], capsys)
    assert code == 0, err
    assert from_mlflow == from_ckpt
    # the scores are the network's on images decoded with the model's own preprocessing, not the paper's
    rows = _rows(from_ckpt)
    direct = _direct_scores(net, [query / r["query"] for r in rows], _support_files(support))
    for row, per_class in zip(rows, direct):
        assert float(row["score"]) == pytest.approx(per_class[row["predicted"]], abs=1e-5)
    # the served model: pairs of encoded images in, the same similarities out
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model("models:/rgb-model/1")
    left, right = [pngs["alpha", 1], pngs["beta", 2]], [pngs["alpha", 2], pngs["beta", 2]]
    import pandas as pd

    p = served.predict(pd.DataFrame({"left": left, "right": right}))
    with torch.no_grad():
        xl = torch.from_numpy(np.stack([decode_image(b, pre, SIZE) for b in left]).astype(np.float32) / 255)
        xr = torch.from_numpy(np.stack([decode_image(b, pre, SIZE) for b in right]).astype(np.float32) / 255)
        expected = net.similarity(xl, xr).numpy()
    np.testing.assert_allclose(np.asarray(p), expected, atol=1e-6)
    assert float(p[1]) == pytest.approx(1 / (1 + math.exp(-float(net.head.bias))), abs=1e-6)  # identical images
