"""``python -m train.eval fid``: the Fréchet distance against closed forms and scipy, the statistics, image
folders with a small stand-in feature extractor, the reference cache, and the CLI with an Inception-v3 of
random weights (CI has no copy of pytorch-fid's weights)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastenc import caches
from fastenc.errors import ConfigError
from train.eval import fid
from train.eval.__main__ import main
from train.eval.inception import WEIGHTS_NAME, WEIGHTS_URL, FIDInceptionV3


def _pytorch_fid(mu1, s1, mu2, s2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance (scipy's sqrtm, the eps offset when it is not finite)."""
    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


# ---- the metric ----------------------------------------------------------------------------


def test_diagonal_covariances_closed_form():
    rng = np.random.default_rng(0)
    d = 40
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    exact = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(exact, rel=1e-12)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # the same in any common eigenbasis
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-10)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_general_covariances_match_scipy_sqrtm():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 24))
    y = rng.normal(size=(250, 24)) @ rng.normal(size=(24, 24)) * 0.4 + 0.2
    m1, s1, m2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    got = fid.frechet_distance(m1, s1, m2, s2)
    assert got == pytest.approx(_pytorch_fid(m1, s1, m2, s2), rel=1e-9)
    assert got == pytest.approx(fid.frechet_distance(m2, s2, m1, s1), rel=1e-9)  # symmetric


def test_near_singular_covariances_stay_exact():
    """Fewer images than dimensions (rank 9 and 11 in 128 dims): Tr((S1 S2)^1/2) is the sum of the
    singular values of B Aᵀ for S1 = AᵀA, S2 = BᵀB, a small well-conditioned reference."""
    rng = np.random.default_rng(2)
    d = 128
    x, y = rng.normal(size=(10, d)), rng.normal(size=(12, d)) * 1.5 + 0.3
    a = (x - x.mean(0)) / np.sqrt(len(x) - 1)
    b = (y - y.mean(0)) / np.sqrt(len(y) - 1)
    s1, s2 = a.T @ a, b.T @ b
    assert np.linalg.matrix_rank(s1) == 9 and np.linalg.matrix_rank(s2) == 11
    diff = x.mean(0) - y.mean(0)
    exact = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.linalg.svd(b @ a.T, compute_uv=False).sum()
    got = fid.frechet_distance(x.mean(0), s1, y.mean(0), s2)
    assert np.isfinite(got) and got == pytest.approx(exact, rel=1e-9)
    reference = np.linalg.svd(b @ a.T, compute_uv=False).sum()
    assert fid.trace_sqrt_product(s1, s2) == pytest.approx(reference, rel=1e-8)
    assert fid.trace_sqrt_product(s1, s2, centred2=b) == pytest.approx(reference, rel=1e-10)  # the [N, N] route
    assert fid.trace_sqrt_product(s1, s2, root1=fid.sqrt_psd(s1)) == pytest.approx(reference, rel=1e-8)

    same = fid.frechet_distance(x.mean(0), s1, x[::-1].mean(0), np.cov(x[::-1], rowvar=False))
    assert 0.0 <= same < 1e-6  # a set against itself: 0, never negative

    q, _ = np.linalg.qr(rng.normal(size=(64, 64)))  # exact zeros and 1e-13 eigenvalues
    ea = np.r_[rng.uniform(0.5, 2, 32), np.zeros(32)]
    eb = np.r_[rng.uniform(0.5, 2, 16), np.full(48, 1e-13)]
    mu = rng.normal(size=64)
    exact = mu @ mu + ((np.sqrt(ea) - np.sqrt(eb)) ** 2).sum()
    assert fid.frechet_distance(mu, (q * ea) @ q.T, np.zeros(64), (q * eb) @ q.T) == pytest.approx(exact, rel=1e-7)


def test_running_stats_match_numpy_cov():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(103, 7)) * 5 + 100  # a large mean: merging batches must not lose the covariance
    stats = fid.RunningStats(7)
    for i in range(0, 103, 10):
        stats.add(x[i:i + 10])
    mu, sigma = stats.result("x")
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)
    assert stats.centred() is None  # 103 rows > 7 dimensions: not kept
    few = fid.RunningStats(7)
    few.add(x[:3])
    few.add(x[3:6])
    b = few.centred()
    assert b.shape == (6, 7)
    np.testing.assert_allclose(b.T @ b, np.cov(x[:6], rowvar=False), rtol=1e-10, atol=1e-10)
    one = fid.RunningStats(7)
    one.add(x[:1])
    with pytest.raises(ConfigError, match=r"^x: 1 image\(s\); FID needs at least 2 \(a covariance\)$"):
        one.result("x")


def test_shape_mismatch_is_one_error():
    with pytest.raises(ConfigError, match="statistics of different shapes"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---- image folders with a stand-in extractor -------------------------------------------------


class ColourStats:
    """Stand-in for Inception: per-channel mean, std and a 2x2 pooled grid of the 299x299 input."""

    dims = 18
    name = "colour-stats"
    resize = "299x299 bilinear"

    def __init__(self):
        self.images = 0

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        assert batch.shape[1:] == (3, 299, 299)
        self.images += batch.shape[0]
        grid = F.adaptive_avg_pool2d(batch, 2).flatten(1)  # [N, 12]
        return torch.cat([batch.mean((2, 3)), batch.std((2, 3)), grid], 1).double().numpy()  # [N, 18]

    def describe(self) -> dict:
        return {"name": self.name, "dims": self.dims}


def _images(folder: Path, n: int, seed: int, size=(24, 32), shift: int = 0, ext: str = "png") -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        arr = np.clip(rng.normal(120 + shift, 40, (*size, 3)), 0, 255).astype(np.uint8)
        files.append(folder / f"{i:03d}.{ext}")
        Image.fromarray(arr).save(files[-1])
    return files


def _features(files: list[Path], extractor) -> np.ndarray:
    rows = []
    for f in files:
        x = torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255
        rows.append(extractor(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)))
    return np.concatenate(rows)


def test_folders_with_stand_in_extractor_and_cache(tmp_path):
    gen = _images(tmp_path / "gen" / "sub", 7, seed=0, shift=30)  # read recursively
    ref = _images(tmp_path / "ref", 9, seed=1, size=(40, 30), ext="jpg")
    (tmp_path / "ref" / "notes.txt").write_text("not an image")
    extractor = ColourStats()
    fg, fr = _features(gen, extractor), _features(ref, extractor)
    expected = _pytorch_fid(fg.mean(0), np.cov(fg, rowvar=False), fr.mean(0), np.cov(fr, rowvar=False))

    cache = tmp_path / "cache"
    extractor = ColourStats()
    result = fid.run({"gen": fid.list_images(tmp_path / "gen")}, tmp_path / "ref", extractor, tmp_path / "out",
                     cache_dir=cache, batch_size=4, workers=2, save_stats=True)
    assert result["fid"]["gen"] == pytest.approx(expected, rel=1e-6)
    assert extractor.images == 16 and result["reference"]["cached"] is False and result["reference"]["images"] == 9
    assert json.loads((tmp_path / "out" / "fid.json").read_text())["fid"] == result["fid"]
    with np.load(tmp_path / "out" / "stats" / "gen.npz") as z:  # pytorch-fid's format, plus n and the extractor
        np.testing.assert_allclose(z["mu"], fg.mean(0), rtol=1e-6)
        assert int(z["n"]) == 7 and str(z["extractor"]) == "colour-stats"
    assert len(result["warnings"]) == 1 and "7 images for 18 dimensions" in result["warnings"][0]

    again = ColourStats()  # the reference comes from the cache: only the 7 generated images are read
    result2 = fid.run({"gen": gen}, tmp_path / "ref", again, tmp_path / "out2", cache_dir=cache, batch_size=4)
    assert again.images == 7 and result2["reference"]["cached"] is True
    assert result2["fid"]["gen"] == pytest.approx(result["fid"]["gen"], rel=1e-12)

    os.utime(ref[0], ns=(1, 1))  # a file's mtime changed: the folder is read again
    third = ColourStats()
    third_result = fid.run({"gen": gen}, tmp_path / "ref", third, tmp_path / "out3", cache_dir=cache)
    assert third_result["reference"]["cached"] is False
    assert third.images == 16

    stats = tmp_path / "out" / "stats" / "gen.npz"  # a set against its own statistics: 0
    assert fid.run({"gen": gen}, stats, ColourStats(), tmp_path / "out4", cache_dir=None)["fid"]["gen"] < 1e-9
    with pytest.raises(ConfigError, match="statistics of the extractor 'colour-stats', not this run's 'other'"):
        other = ColourStats()
        other.name = "other"
        fid.run({"gen": gen}, stats, other, tmp_path / "out5", cache_dir=None)


def test_generate_output_gives_one_set_per_encoder(tmp_path):
    root = tmp_path / "side-by-side"
    files = {e: _images(root / "images" / e, 3, seed=i) for i, e in enumerate(["teacher", "base"])}
    manifest = {"analysis": "generate", "encoders": ["teacher", "base"], "prompts": ["a", "b", "c"],
                "files": {"grid": "grid.png", "images": {e: [f.relative_to(root).as_posix() for f in fs]
                                                          for e, fs in files.items()}}}
    (root / "generate.json").write_text(json.dumps(manifest))
    sets = fid.image_sets([str(root)])
    assert list(sets) == ["teacher", "base"] and sets["base"] == files["base"]
    assert list(fid.image_sets([f"run1={root}"])) == ["run1/teacher", "run1/base"]
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "generate.json").write_text(json.dumps({**manifest, "files": {"images": {}}}))
    with pytest.raises(ConfigError, match=rf"^{empty}/generate.json: lists no images$"):
        fid.image_sets([str(empty)])
    files["base"][1].unlink()
    with pytest.raises(ConfigError, match=rf"^{root}/generate.json lists images/base/001.png, which is missing$"):
        fid.image_sets([str(root)])


# ---- the network and the CLI ------------------------------------------------------------------


def test_network_has_pytorch_fid_parameter_layout():
    """Names and shapes of every tensor of pytorch-fid's FID Inception-v3 (fid_inception_v3() with
    torchvision 0.28, num_batches_tracked left out): the weights file loads by these names."""
    rows = sorted((k, list(v.shape)) for k, v in FIDInceptionV3().state_dict().items()
                  if not k.endswith("num_batches_tracked"))
    assert len(rows) == 472
    assert hashlib.sha256(json.dumps(rows).encode()).hexdigest() == \
        "579c09ebb0c6f0f4c9f0a51099479eb353aaee1969adaaf05fbc5cefaa1f987e"


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory) -> Path:
    """FIDInceptionV3 with random weights whose BatchNorm statistics are set on random images, so the
    features are of order 1 (default initialisation shrinks them to ~1e-8 over 94 layers)."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    net.train()
    with torch.no_grad():
        net(torch.rand(2, 3, 299, 299))
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTENC_FID_INCEPTION", raising=False)


def test_cli_with_inception(random_inception, tmp_path, capsys, cache_env, caplog, monkeypatch):
    _images(tmp_path / "gen", 3, seed=0, shift=60)
    _images(tmp_path / "ref", 4, seed=1, size=(50, 40))
    argv = ["fid", "--out", str(tmp_path / "out"), "--images", f"near={tmp_path / 'ref'}", "--images",
            f"far={tmp_path / 'gen'}", "--ref", str(tmp_path / "ref"), "--inception", str(random_inception),
            "--device", "cpu", "--batch-size", "3", "--save-stats"]
    assert main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip())
    result = json.loads((tmp_path / "out" / "fid.json").read_text())
    assert line == {"analysis": "fid", "fid": result["fid"], "out": str(tmp_path / "out")}
    assert result["fid"]["near"] < 1e-6 < result["fid"]["far"]  # the reference against itself, another set
    assert result["extractor"]["standard_weights"] is False and result["extractor"]["dims"] == 2048
    assert "is not pt_inception-2015-12-05-6726825d.pth" in caplog.text
    cached = list((tmp_path / "cache" / "fid-stats").glob("*.npz"))
    assert len(cached) == 1 and result["reference"]["cache_file"] == str(cached[0])
    (stats_cache,) = [c for c in caches.cache_dirs() if c.name == "fid-stats"]
    assert stats_cache.owned() == cached  # so `fastenc cache clear` deletes it
    with np.load(tmp_path / "out" / "stats" / "far.npz") as z:
        assert z["mu"].shape == (2048,) and z["sigma"].shape == (2048, 2048)

    # the saved statistics as --ref give the same number; the env var names the weights
    monkeypatch.setenv("FASTENC_FID_INCEPTION", str(random_inception))
    assert main(["fid", "--out", str(tmp_path / "out2"), "--images", f"far={tmp_path / 'gen'}", "--ref",
                 str(tmp_path / "out" / "stats" / "near.npz"), "--device", "cpu"]) == 0
    again = json.loads((tmp_path / "out2" / "fid.json").read_text())
    assert again["fid"]["far"] == pytest.approx(result["fid"]["far"], rel=1e-6)


def _err(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_bad_input(random_inception, tmp_path, capsys, cache_env):
    _images(tmp_path / "gen", 2, seed=0)
    (tmp_path / "empty").mkdir()
    out = ["--out", str(tmp_path / "out")]
    good = ["--images", str(tmp_path / "gen"), "--ref", str(tmp_path / "gen")]

    need = (f"FID needs pytorch-fid's Inception-v3 weights {WEIGHTS_NAME} (91 MB; download {WEIGHTS_URL} once, "
            f"then pass --inception FILE or set $FASTENC_FID_INCEPTION)")
    assert main(["fid", *out, *good]) == 2
    assert _err(capsys) == f"train.eval: error: no --inception given: {need}"
    assert main(["fid", *out, *good, "--inception", str(tmp_path / "nope.pth")]) == 2
    assert _err(capsys) == f"train.eval: error: --inception {tmp_path / 'nope.pth'}: not a file: {need}"

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    assert main(["fid", *out, *good, "--inception", str(junk)]) == 2
    assert _err(capsys).startswith(f"train.eval: error: --inception {junk}: not a torch weights file (")
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    assert main(["fid", *out, *good, "--inception", str(other)]) == 2
    assert _err(capsys) == (f"train.eval: error: --inception {other}: not the FID Inception-v3 (472 tensors "
                            f"missing, e.g. 'Conv2d_1a_3x3.bn.bias'); expected {WEIGHTS_NAME} from {WEIGHTS_URL}")

    inc = ["--inception", str(random_inception), "--device", "cpu"]
    cases = [
        ([*good, "--out", str(junk)], f"--out {junk}: exists and is not a folder"),
        (["--images", str(tmp_path / "missing"), "--ref", str(tmp_path / "gen")],
         f"--images {tmp_path / 'missing'}: not a directory"),
        (["--images", str(tmp_path / "gen"), "--ref", str(tmp_path / "nothing")],
         f"--ref {tmp_path / 'nothing'}: no such folder or file"),
        (["--images", str(tmp_path / "empty"), "--ref", str(tmp_path / "gen")],
         f"{tmp_path / 'empty'}: no images (.bmp, .jpeg, .jpg, .pgm, .png, .ppm, .tif, .tiff, .webp) in it or its "
         f"subfolders"),
        ([*good, "--workers", "0"], "--workers 0: must be at least 1"),
        ([*good, "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    ]
    for argv, message in cases:
        assert main(["fid", *out, *argv, *inc]) == 2
        assert _err(capsys) == f"train.eval: error: {message}"

    bad = tmp_path / "bad"
    _images(bad, 2, seed=3)
    (bad / "002.png").write_bytes(b"\x89PNG broken")
    assert main(["fid", *out, "--images", str(bad), "--ref", str(tmp_path / "gen"), *inc]) == 2
    assert _err(capsys).startswith(f"train.eval: error: {bad / '002.png'}: not a readable image (")

    small = tmp_path / "small.npz"
    np.savez(small, mu=np.zeros(8), sigma=np.eye(8))
    assert main(["fid", *out, "--images", str(tmp_path / "gen"), "--ref", str(small), *inc]) == 2
    assert _err(capsys) == (f"train.eval: error: --ref {small}: mu (8,) and sigma (8, 8); this extractor gives 2048 "
                            f"dimensions: expected (2048,) and (2048, 2048)")
