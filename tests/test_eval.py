"""``python -m train.eval``: t-SNE, mode-collapse check, Flux attention maps, side-by-side grids, CLIP score.

Everything runs on tiny random components written to disk as real users have them: a saved diffusers
Flux pipeline whose ``text_encoder_2`` is a transformers T5 (the teacher), fastenc students without a
tokenizer of their own, and a local transformers CLIP model folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastenc
from fastenc.errors import ConfigError
from helpers import make_t5_tokenizer_json
from reference import hf_config
from test_train_support import STUDENT_CFG, TEACHER_CFG, TEXT_DIM, random_encoder, tiny_clip, tiny_flux, tiny_vae
from train.eval.__main__ import main
from train.eval.attention import capture_attention, latent_grid, select_blocks
from train.eval.clipscore import ClipScorer, read_samples
from train.eval.pipelines import GenerationSettings, generate, load_pipeline
from train.eval.tsne import neighbour_agreement
from train.images import labelled_grid, tile

PROMPTS = ["a photo of a cat sitting on a red chair", "a dog playing with a ball on the beach",
           "an astronaut riding a horse on the moon", "a red fox sitting in the snow",
           "a castle on a hill surrounded by mountains", "a robot reading a book in a library",
           "a bowl of fruit on a wooden table", "a ship sailing on a calm sea under the stars"]
PIPE_FLAGS = ["--height", "64", "--width", "64", "--max-sequence-length", "16", "--device", "cpu"]


@dataclass
class Setup:
    root: Path
    flux: Path  # saved FluxPipeline; text_encoder_2 = transformers T5 (the teacher), tokenizer_2 = T5 tokenizer
    student: Path  # fastenc student (projector to the DiT's width), no tokenizer
    collapsed: Path  # the same student with 'A rat' and 'A cat' forced onto one embedding
    clip: Path  # transformers CLIPModel + tokenizer + preprocessor config
    prompts: Path


def _tokenizer_copy(src: Path, dst: Path, max_length: int) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = max_length  # stands in for Flux's CLIP tokenizer (77 positions)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, T5EncoderModel

    from train.dit import FLUX_SCHEDULER

    root = tmp_path_factory.mktemp("eval")
    tok = root / "t5_tokenizer"
    make_t5_tokenizer_json(tok)
    clip_tok = _tokenizer_copy(tok, root / "clip_tokenizer", 77)
    torch.manual_seed(5)
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER), vae=tiny_vae(),
                 text_encoder=tiny_clip(), tokenizer=AutoTokenizer.from_pretrained(clip_tok),
                 text_encoder_2=T5EncoderModel(hf_config(TEACHER_CFG)).eval(),
                 tokenizer_2=AutoTokenizer.from_pretrained(tok), transformer=tiny_flux()).save_pretrained(root / "flux")

    cfg = STUDENT_CFG.replace(projection_dim=TEXT_DIM)
    fastenc.save(random_encoder(cfg, seed=3), root / "student")
    collapsed = random_encoder(cfg, seed=3)
    t5 = AutoTokenizer.from_pretrained(tok)
    rat, cat = t5("A rat").input_ids, t5("A cat").input_ids
    assert len(rat) == len(cat) and rat != cat
    with torch.no_grad():  # the rows of the pieces where the two prompts differ become equal
        for r, c in zip(rat, cat):
            collapsed.embed.weight[r] = collapsed.embed.weight[c]
    fastenc.save(collapsed, root / "collapsed")

    torch.manual_seed(7)
    text = dict(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    shutil.copytree(clip_tok, root / "clip", dirs_exist_ok=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")

    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return Setup(root, root / "flux", root / "student", root / "collapsed", root / "clip", prompts)


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models run faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


# ---- t-SNE ------------------------------------------------------------------------------


def test_tsne_plot_points_and_agreement(setup, tmp_path):
    out = tmp_path / "tsne"
    assert main(["tsne", "--out", str(out), "--teacher", str(setup.flux), "--student", f"distinct={setup.student}",
                 "--student", f"same={setup.flux}", "--prompts", str(setup.prompts), "--k", "3",
                 "--device", "cpu"]) == 0
    result = json.loads((out / "tsne.json").read_text())
    n = len(PROMPTS)
    assert result["encoders"] == ["teacher", "distinct", "same"] and result["prompts"] == PROMPTS
    for label in result["encoders"]:
        pts = np.asarray(result["points"][label])
        assert pts.shape == (n, 2) and np.isfinite(pts).all()
    assert _png(out / "tsne.png").shape == (900, 1050, 3)  # 7 x 6 inches at 150 dpi

    same = result["agreement"]["same"]  # the teacher against itself
    assert same["nn_agreement"] == same["knn_overlap"] == same["retrieval"] == 1.0
    distinct = result["agreement"]["distinct"]
    assert distinct["k"] == 3 and len(distinct["per_prompt"]) == n
    for key in ("nn_agreement", "knn_overlap", "retrieval"):
        assert 0.0 <= distinct[key] <= 1.0
    overlaps = [row["knn_overlap"] for row in distinct["per_prompt"]]
    assert all(round(o * 3) == pytest.approx(o * 3) for o in overlaps)  # shared neighbours out of k = 3
    assert distinct["nn_agreement"] == np.mean([row["nn_match"] for row in distinct["per_prompt"]])
    assert all(row["teacher_nn"] in PROMPTS and row["teacher_nn"] != row["prompt"] for row in distinct["per_prompt"])


def test_neighbour_agreement_measures():
    t = torch.randn(7, 12, generator=torch.Generator().manual_seed(0))
    scaled = neighbour_agreement(t, 3 * t, k=2)
    assert all(scaled.nn_match) and scaled.knn_overlap == [1.0] * 7 and all(scaled.retrieved)
    flipped = neighbour_agreement(t, -t, k=2)  # same neighbourhoods, but each student point is farthest from its own
    assert all(flipped.nn_match) and not any(flipped.retrieved)
    narrow = neighbour_agreement(t[:, :5], t[:, 5:], k=10)  # different widths: no retrieval; k capped at N - 1
    assert narrow.k == 6 and narrow.retrieved is None and narrow.knn_overlap == [1.0] * 7


# ---- mode collapse ----------------------------------------------------------------------------


def test_collapse_flags_the_collapsed_student_only(setup, tmp_path):
    out = tmp_path / "collapse"
    status = main(["collapse", "--out", str(out), "--teacher", str(setup.flux),
                   "--student", f"distinct={setup.student}", "--student", f"collapsed={setup.collapsed}",
                   "--probe", "A dog", "--fail-on-collapse", "--device", "cpu"])
    assert status == 1  # --fail-on-collapse and a flagged pair
    result = json.loads((out / "collapse.json").read_text())
    assert result["probes"] == ["A rat", "A cat", "A man", "A monkey", "A woman", "A dog"]
    assert result["collapsed"] is True and result["threshold"] == 0.99
    distinct, collapsed = result["students"]
    assert distinct["label"] == "distinct" and distinct["collapsed"] is False and distinct["collapsed_pairs"] == []
    assert collapsed["collapsed"] is True and collapsed["groups"] == [["A rat", "A cat"]]
    (pair,) = collapsed["collapsed_pairs"]
    assert (pair["a"], pair["b"]) == ("A rat", "A cat")
    assert pair["cosine"] > 0.9999 and pair["teacher_cosine"] < 0.99
    for cos in (result["teacher"]["cos"], distinct["cos"], collapsed["cos"]):
        m = np.asarray(cos)
        assert m.shape == (6, 6) and np.allclose(m, m.T, atol=1e-6) and np.allclose(np.diag(m), 1, atol=1e-5)
        assert (m >= -1 - 1e-6).all() and (m <= 1 + 1e-6).all()
    img = _png(out / "collapse.png")
    assert img.shape[1] > 2 * img.shape[0]  # three panels side by side

    out2 = tmp_path / "distinct-only"
    assert main(["collapse", "--out", str(out2), "--teacher", str(setup.flux), "--student", str(setup.student),
                 "--fail-on-collapse", "--device", "cpu"]) == 0
    assert json.loads((out2 / "collapse.json").read_text())["collapsed"] is False


# ---- attention maps ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(setup):
    return load_pipeline(setup.flux, device="cpu", dtype="fp32")


def _transformer_inputs(pipe, text_len: int = 16, grid: int = 4) -> dict:
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(0)
    t = pipe.transformer
    return dict(hidden_states=torch.randn(1, grid * grid, t.config.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, text_len, t.config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, t.config.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.7]), guidance=torch.tensor([3.5]), txt_ids=torch.zeros(text_len, 3),
                img_ids=FluxPipeline._prepare_latent_image_ids(1, grid, grid, "cpu", torch.float32), return_dict=False)


def test_probability_processor_matches_flux_attention(pipe):
    """At the recorded step the explicit softmax replaces SDPA; the transformer's output must not change."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    inputs = _transformer_inputs(pipe)
    with torch.no_grad():
        expected = pipe.transformer(**inputs)[0]
        with capture_attention(pipe.transformer, step=1) as rec:
            got = pipe.transformer(**inputs)[0]
    assert set(rec.rows) == {"transformer_blocks.0", "single_transformer_blocks.0"}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all(type(p) is FluxAttnProcessor for p in pipe.transformer.attn_processors.values())  # restored


def test_attention_capture_rows_and_latent_grid(pipe):
    settings = GenerationSettings(steps=3, height=64, width=64, max_sequence_length=16)
    plain = generate(pipe, "a cat on a chair", settings)
    grid = latent_grid(pipe, 64, 64)
    assert grid == (64 // (pipe.vae_scale_factor * 2),) * 2 == (4, 4)
    captured = {}
    for step in (1, 2):
        with capture_attention(pipe.transformer, step=step) as rec:
            image = generate(pipe, "a cat on a chair", settings)
        assert rec.current == 3 and np.abs(image.astype(int) - plain.astype(int)).max() <= 1
        maps = rec.maps(grid)
        assert maps.text_len == 16 and maps.blocks == ["transformer_blocks.0", "single_transformer_blocks.0"]
        for rows in maps.rows.values():
            assert rows.shape == (1, 16, 16 + 16)  # text-query rows over [text, image] keys
            assert (rows >= 0).all()
            torch.testing.assert_close(rows.sum(-1), torch.ones(1, 16), rtol=0, atol=1e-5)
        m = maps.token_map([1, 2])
        assert m.shape == (1, *grid) and (m >= 0).all() and (m <= 1).all()
        captured[step] = maps.rows["transformer_blocks.0"]
    assert not torch.allclose(captured[1], captured[2])  # the chosen step is the one recorded

    with capture_attention(pipe.transformer, step=2, blocks="single", direction="image-to-text") as rec:
        generate(pipe, "a cat on a chair", settings)
    maps = rec.maps(grid)
    (cols,) = maps.rows.values()
    assert maps.blocks == ["single_transformer_blocks.0"] and cols.shape == (1, 16, 16)  # image rows, text columns
    assert (cols >= 0).all() and (cols.sum(-1) <= 1 + 1e-5).all() and (cols.sum(-1) > 0).all()
    assert maps.token_map([0]).shape == (1, 4, 4)

    with capture_attention(pipe.transformer, step=4) as rec:  # past the last of 3 steps
        generate(pipe, "a cat on a chair", settings)
    with pytest.raises(ConfigError, match="only 3 step"):
        rec.maps(grid)


def test_select_blocks():
    names = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0"]
    assert select_blocks(names, "all") == names
    assert select_blocks(names, "double") == names[:2]
    assert select_blocks(names, "single_transformer_blocks.*,transformer_blocks.1") == names[1:]
    with pytest.raises(ConfigError, match="matches no attention block"):
        select_blocks(names, "transformer_blocks.7")


def test_attention_cli_teacher_and_student(setup, tmp_path):
    out = tmp_path / "attention"
    assert main(["attention", "--out", str(out), "--pipeline", str(setup.flux),
                 "--student", f"distinct={setup.student}", "--prompt", "a photo of a cat", "--token", "cat",
                 "--token", "photo", "--steps", "3", "--step", "3", *PIPE_FLAGS]) == 0
    result = json.loads((out / "attention.json").read_text())
    assert result["encoders"] == ["teacher", "distinct"] and result["latent_grid"] == [4, 4] and result["step"] == 3
    (entry,) = result["prompts"]
    maps = {}
    for label, enc in entry["encoders"].items():
        assert [t["token"] for t in enc["tokens"]] == ["cat", "photo"]
        for tok in enc["tokens"]:
            assert _png(out / tok["file"]).shape == (64, 64, 3)
        assert _png(out / enc["image"]).shape == (64, 64, 3)
        with np.load(out / enc["maps"]) as z:
            maps[label] = z["maps"]
            assert z["maps"].shape == (2, 4, 4) and list(z["tokens"]) == ["cat", "photo"]
            assert (z["maps"] >= 0).all() and (z["maps"] <= 1).all()
    assert not np.allclose(maps["teacher"], maps["distinct"])  # the student's embeddings steer the attention
    assert all(-1 <= t["correlation_with_reference"] <= 1 for t in entry["encoders"]["distinct"]["tokens"])
    grid = _png(out / entry["grid"])
    assert grid.shape[0] >= 2 * 64 and grid.shape[1] >= 3 * 64  # rows: encoders; columns: image + 2 tokens


# ---- side-by-side generation ------------------------------------------------------------------


def test_generate_grid_same_seed_per_encoder(setup, pipe, tmp_path):
    out = tmp_path / "generate"
    assert main(["generate", "--out", str(out), "--pipeline", str(setup.flux), "--student", f"distinct={setup.student}",
                 "--student", f"collapsed={setup.collapsed}", "--prompt", "A rat", "--prompt", "A cat",
                 "--steps", "2", "--seed", "3", *PIPE_FLAGS]) == 0
    result = json.loads((out / "generate.json").read_text())
    assert result["encoders"] == ["teacher", "distinct", "collapsed"] and result["settings"]["seed"] == 3
    img = {label: [_png(out / f) for f in files] for label, files in result["files"]["images"].items()}
    assert all(i.shape == (64, 64, 3) for imgs in img.values() for i in imgs)
    grid = _png(out / "grid.png")
    assert grid.shape[0] >= 2 * 64 and grid.shape[1] >= 3 * 64
    assert not np.array_equal(img["teacher"][0], img["teacher"][1])
    assert not np.array_equal(img["teacher"][0], img["distinct"][0])
    assert not np.array_equal(img["distinct"][0], img["collapsed"][0])

    from fastenc.integrations import use_in_pipeline

    original = pipe.text_encoder_2
    try:  # the student column is what the pipeline itself gives with that student and seed
        use_in_pipeline(pipe, fastenc.load(setup.student, device="cpu", cache=False, backend="torch"))
        settings = GenerationSettings(seed=3, steps=2, height=64, width=64, max_sequence_length=16)
        direct = generate(pipe, "A rat", settings)
    finally:
        pipe.register_modules(text_encoder_2=original)
    assert np.array_equal(direct, img["distinct"][0])


def test_teacher_checkpoint_column_matches_pipeline_t5(setup, tmp_path):
    """--teacher loads T5 with fastenc (here from the pipeline's own text_encoder_2) instead of the pipeline's
    transformers T5; the images agree."""
    own, loaded = tmp_path / "own", tmp_path / "loaded"
    common = ["--pipeline", str(setup.flux), "--prompt", "a red fox in the snow", "--steps", "2", *PIPE_FLAGS]
    assert main(["generate", "--out", str(own), *common]) == 0
    assert main(["generate", "--out", str(loaded), "--teacher", f"t5={setup.flux}", *common]) == 0
    a = json.loads((own / "generate.json").read_text())["files"]["images"]
    b = json.loads((loaded / "generate.json").read_text())["files"]["images"]
    assert list(a) == ["teacher"] and list(b) == ["t5"]
    diff = np.abs(_png(own / a["teacher"][0]).astype(int) - _png(loaded / b["t5"][0]).astype(int))
    assert diff.max() <= 2


# ---- CLIP score + T2I-CompBench layout --------------------------------------------------------


def test_clipscore_compbench_layout_and_rescoring(setup, tmp_path):
    prompts = tmp_path / "color_val.txt"
    prompts.write_text("a blue_backpack and a red book\na green bench\n")
    out = tmp_path / "clip"
    assert main(["clipscore", "--out", str(out), "--pipeline", str(setup.flux), "--no-teacher", "--student",
                 f"distinct={setup.student}", "--prompts", str(prompts), "--clip", str(setup.clip), "--num-images", "2",
                 "--steps", "2", "--height", "32", "--width", "32", "--max-sequence-length", "16",
                 "--device", "cpu"]) == 0
    samples = out / "distinct" / "color" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == [
        "a blue backpack and a red book_000000.png", "a blue backpack and a red book_000001.png",
        "a green bench_000002.png", "a green bench_000003.png"]
    result = json.loads((out / "clipscore.json").read_text())
    assert result["compbench_dirs"] == {"distinct": {"color": "distinct/color"}}
    rows = result["scores"]
    assert [r["prompt"] for r in rows] == ["a blue_backpack and a red book"] * 2 + ["a green bench"] * 2
    for r in rows:
        assert -1 <= r["cosine"] <= 1 and r["clip_score"] == pytest.approx(100 * max(r["cosine"], 0.0))
    assert result["mean"]["distinct"] == pytest.approx(np.mean([r["clip_score"] for r in rows]))

    groups = read_samples(out / "distinct" / "color")  # prompts read back from the names, in number order
    assert [p for _, p in groups["."]] == ["a blue backpack and a red book"] * 2 + ["a green bench"] * 2
    out2 = tmp_path / "rescored"
    assert main(["clipscore", "--out", str(out2), "--images", str(out / "distinct" / "color"),
                 "--clip", str(setup.clip), "--device", "cpu"]) == 0
    again = json.loads((out2 / "clipscore.json").read_text())
    assert [r["file"] for r in again["scores"]] == [f"samples/{n}" for n in sorted(p.name for p in samples.iterdir())]
    # only '_' differs between the prompt that generated an image and the one its name holds
    np.testing.assert_allclose([r["cosine"] for r in again["scores"]][2:], [r["cosine"] for r in rows][2:], atol=1e-6)


def test_clip_cosine_matches_model_logits(setup):
    from transformers import CLIPModel

    scorer = ClipScorer(setup.clip, device="cpu")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    texts = ["a red fox", "a castle on a hill", "a robot"]
    scores, cos = scorer(images, texts, batch_size=2)
    model = CLIPModel.from_pretrained(setup.clip).eval()
    pixels = scorer.processor(images=images, return_tensors="pt")["pixel_values"]
    ids = scorer.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids, pixel_values=pixels).logits_per_image  # scale * cosine, [images, texts]
        expected = (logits.diagonal() / model.logit_scale.exp()).numpy()
    np.testing.assert_allclose(cos, expected, atol=1e-5)
    np.testing.assert_allclose(scores, 100 * np.clip(cos, 0, None))


# ---- grids and bad input ----------------------------------------------------------------------


def test_labelled_grid_keeps_tiles():
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, 256, (3, 20, 24, 3), dtype=np.uint8) for _ in range(2)]
    plain = tile(rows)
    out = labelled_grid(rows, row_labels=["a long prompt that has to wrap over lines", "b"], col_labels=["x", "y", "z"])
    h, w = plain.shape[:2]
    assert out.shape[0] > h and out.shape[1] > w and out.dtype == np.uint8
    np.testing.assert_array_equal(out[-h:, -w:], plain)  # labels go above and to the left; tiles unchanged


@pytest.mark.parametrize("argv, message", [
    (["tsne", "--prompt", "only one"], "at least 2 prompts"),
    (["collapse", "--threshold", "1.5"], "--threshold 1.5"),
    (["collapse", "--student", "missing=/no/such/dir"], "/no/such/dir"),
    (["attention", "--prompt", "a cat", "--steps", "3", "--step", "5"], "--step 5 must be within"),
    (["attention", "--prompt", "a cat", "--steps", "3", "--step", "2", "--blocks", "nope"], "--blocks 'nope'"),
    (["attention", "--prompt", "a cat", "--steps", "3", "--step", "2", "--token", "dog"], "--token 'dog'"),
    (["clipscore", "--images", "x", "--pipeline", "y"], "either --images"),
])
def test_bad_input_exits_2(setup, tmp_path, capsys, argv, message):
    analysis, *rest = argv
    extra = {"tsne": ["--teacher", str(setup.flux), "--student", str(setup.student)],
             "collapse": ["--teacher", str(setup.flux)] + ([] if "--student" in rest
                                                           else ["--student", str(setup.student)]),
             "attention": ["--pipeline", str(setup.flux), "--height", "32", "--width", "32", "--device", "cpu"],
             "clipscore": []}[analysis]
    assert main([analysis, "--out", str(tmp_path / "o"), *rest, *extra]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after any loading progress bars
    assert last.startswith("train.eval: error: ") and message in last
