"""CLIP score of generated images, and images written where T2I-CompBench's scripts look for them.

CLIP score (as torchmetrics defines it): ``100 * max(cos(image embedding, text embedding), 0)`` with a
local ``transformers`` CLIPModel folder (model, tokenizer and preprocessor config), e.g. a download of
``openai/clip-vit-large-patch14``.

T2I-CompBench layout: its evaluation scripts (``BLIPvqa_eval/BLIP_vqa.py --out_dir``,
``UniDet_eval/*_eval.py --outpath``, ``CLIPScore_eval/CLIP_similarity.py --outpath``) read
``<dir>/samples/<prompt>_<NNNNNN>.png``: the prompt is the file name up to the first ``_`` and the
images are ordered by the trailing number. Generated images go to
``<out>/<encoder>/<category>/samples/`` with one running number per folder (prompt-major, then image
index), so ``<out>/<encoder>/<category>`` is what those scripts take. The category is the prompt file's
name without ``_val``/``_train``/``_test`` (``color_val.txt`` -> ``color``). ``_`` and ``/`` cannot appear
in such names, so they become spaces (the original prompt is kept in ``clipscore.json``).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch

from fastenc.api import default_device, parse_dtype
from fastenc.errors import ConfigError

from .encoders import gather_prompts, slug
from .pipelines import EncoderSwitch, GenerationSettings, generate
from .report import write_json, write_png

log = logging.getLogger("fastenc.train")

SPLIT_SUFFIX = re.compile(r"_(val|train|test)$")


class ClipScorer:
    """``scorer(images, prompts)`` -> (CLIP scores [N], cosines [N]) as numpy float64."""

    def __init__(self, path: str | Path, *, device=None, dtype=None):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        dev = default_device(device)
        try:
            self.model = CLIPModel.from_pretrained(str(path), torch_dtype=parse_dtype(dtype, dev)).eval().to(dev)
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.processor = AutoImageProcessor.from_pretrained(str(path))
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"--clip {path}: cannot load a CLIP model with its tokenizer and image preprocessor "
                              f"({exc})") from None
        self.device = dev
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        log.info("clip: %s", path)

    @torch.no_grad()
    def cosine(self, images: list[np.ndarray], prompts: list[str]) -> np.ndarray:
        """images [H, W, 3] uint8 each, one prompt per image -> cosine similarities [N]."""
        if len(images) != len(prompts):
            raise ConfigError(f"{len(images)} images but {len(prompts)} prompts")
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]  # [N, 3, h, w]
        text = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")
        out = self.model(input_ids=text["input_ids"].to(self.device),
                         attention_mask=text["attention_mask"].to(self.device) if "attention_mask" in text else None,
                         pixel_values=pixels.to(self.device, self.model.dtype))
        img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)  # [N, D]
        txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)  # [N, D]
        return (img * txt).sum(-1).cpu().double().numpy()

    def __call__(self, images: list[np.ndarray], prompts: list[str],
                 batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """(CLIP scores [N] = 100 * max(cosine, 0), cosines [N])."""
        cos = [self.cosine(images[i:i + batch_size], prompts[i:i + batch_size])
               for i in range(0, len(images), batch_size)]
        cos = np.concatenate(cos) if cos else np.zeros(0)
        return 100 * np.clip(cos, 0, None), cos


# ------------------------------------------------------------------------------ T2I-CompBench layout


def compbench_prompt(prompt: str) -> str:
    """The prompt as it can stand in a T2I-CompBench file name (no '_' or '/')."""
    return re.sub(r"\s+", " ", prompt.replace("_", " ").replace("/", " ")).strip()


def category_of(path: str | Path) -> str:
    return SPLIT_SUFFIX.sub("", Path(path).stem) or "prompts"


def sample_name(prompt: str, index: int) -> str:
    return f"{compbench_prompt(prompt)}_{index:06d}.png"


def read_samples(root: Path) -> dict[str, list[tuple[Path, str]]]:
    """``{<dir relative to root>: [(image, prompt)]}`` for every ``samples/`` folder under ``root``, in
    T2I-CompBench's order (by the number after the last '_')."""
    groups: dict[str, list[tuple[Path, str]]] = {}
    folders = [root] if root.name == "samples" else sorted(p for p in root.rglob("samples") if p.is_dir())
    for folder in folders:
        files = [f for f in folder.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg") and "_" in f.stem]
        try:
            files.sort(key=lambda f: int(f.stem.rsplit("_", 1)[1]))
        except ValueError:
            raise ConfigError(f"{folder}: image names must end in _<number> (T2I-CompBench layout)") from None
        if files:
            key = folder.parent.relative_to(root).as_posix() if folder != root else "."
            groups[key] = [(f, f.stem.split("_")[0]) for f in files]
    if not groups:
        raise ConfigError(f"{root}: no samples/<prompt>_<NNNNNN>.png images found (T2I-CompBench layout)")
    return groups


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _summary(rows: list[dict], key: str) -> dict:
    """``{value of key: {mean CLIP score, mean cosine, n}}``."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return {k: {"mean": float(np.mean([r["clip_score"] for r in v])),
                "mean_cosine": float(np.mean([r["cosine"] for r in v])), "n": len(v)} for k, v in groups.items()}


def score_folder(scorer: ClipScorer, root: Path, out: Path, *, batch_size: int = 16) -> dict:
    """Score images already laid out as T2I-CompBench expects; writes ``clipscore.json``."""
    rows = []
    for group, items in read_samples(root).items():
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            scores, cos = scorer([_load_rgb(f) for f, _ in chunk], [p for _, p in chunk], batch_size)
            rows += [{"group": group, "file": f.relative_to(root).as_posix(), "prompt": p, "clip_score": float(s),
                      "cosine": float(c)} for (f, p), s, c in zip(chunk, scores, cos)]
    result = {"analysis": "clipscore", "images": str(root), "definition": "100 * max(cos(image, text), 0)",
              "mean": float(np.mean([r["clip_score"] for r in rows])), "groups": _summary(rows, "group"),
              "scores": rows}
    write_json(out / "clipscore.json", result)
    log.info("clipscore: %d images under %s: mean %.3f", len(rows), root, result["mean"])
    return result


def generate_and_score(switch: EncoderSwitch, categories: dict[str, list[str]], out: Path,
                       settings: GenerationSettings, scorer: ClipScorer | None, *, num_images: int = 1) -> dict:
    """For every encoder and category: ``num_images`` images per prompt (seeds ``seed .. seed+num_images-1``,
    the same for every encoder) into ``<out>/<encoder>/<category>/samples/``; scored when ``scorer`` is set."""
    if num_images < 1:
        raise ConfigError(f"--num-images {num_images}: must be at least 1")
    rows = []
    try:
        for label in switch.labels:
            pipe = switch.use(label)
            for category, prompts in categories.items():
                folder = Path(slug(label)) / category / "samples"
                count = 0
                for prompt in prompts:
                    images, names = [], []
                    for n in range(num_images):
                        img = generate(pipe, prompt, settings, seed=settings.seed + n)  # [H, W, 3] uint8
                        rel = folder / sample_name(prompt, count)
                        write_png(out / rel, img)
                        images.append(img)
                        names.append(rel.as_posix())
                        count += 1
                    if scorer is not None:
                        scores, cos = scorer(images, [prompt] * len(images))
                    else:
                        scores = cos = [None] * len(images)
                    rows += [{"encoder": label, "category": category, "prompt": prompt, "file": name,
                              "clip_score": None if s is None else float(s), "cosine": None if c is None else float(c)}
                             for name, s, c in zip(names, scores, cos)]
                log.info("clipscore: %s / %s: %d image(s) in %s", label, category, count, out / folder)
    finally:
        switch.restore()
    result = {"analysis": "clipscore", "definition": "100 * max(cos(image, text), 0)", "encoders": switch.labels,
              "settings": settings.to_dict(), "num_images": num_images,
              "compbench_dirs": {label: {c: (Path(slug(label)) / c).as_posix() for c in categories}
                                 for label in switch.labels},
              "scores": rows}
    if scorer is not None:
        result["mean"] = {label: float(np.mean([r["clip_score"] for r in rows if r["encoder"] == label]))
                          for label in switch.labels}
        result["by_category"] = {label: _summary([r for r in rows if r["encoder"] == label], "category")
                                 for label in switch.labels}
        for label, mean in result["mean"].items():
            log.info("clipscore: %s: mean %.3f over %d image(s)", label, mean,
                     sum(r["encoder"] == label for r in rows))
    write_json(out / "clipscore.json", result)
    return result


def categories_from(files: list[str] | None, inline: list[str] | None, category: str | None) -> dict[str, list[str]]:
    """``{category: prompts}``: one category per prompt file (named after it), inline prompts under
    ``category`` (default ``prompts``); ``category`` also renames a single file's."""
    cats: dict[str, list[str]] = {}
    files = list(files or [])
    for f in files:
        name = category if category and len(files) == 1 and not inline else category_of(f)
        cats.setdefault(name, [])
        cats[name] += [p for p in gather_prompts([f], None) if p not in cats[name]]
    if inline:
        name = category or "prompts"
        cats.setdefault(name, [])
        cats[name] += [p for p in gather_prompts(None, inline) if p not in cats[name]]
    cats = {k: v for k, v in cats.items() if v}
    if not cats:
        raise ConfigError("no prompts: give --prompts FILE (one category per file) or --prompt")
    return cats


def score_generated(scorer: ClipScorer, root: Path, out: Path, *, batch_size: int = 16) -> dict | None:
    """Score the images of a side-by-side run (``generate.json`` in ``root``), per encoder; None when
    ``root`` holds no ``generate.json``."""
    f = root / "generate.json"
    if not f.is_file():
        return None
    try:
        manifest = json.loads(f.read_text())
        files, prompts = manifest["files"]["images"], manifest["prompts"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{f}: not a generate.json ({exc})") from None
    rows = []
    for label, names in files.items():
        for i in range(0, len(names), batch_size):
            chunk = list(zip(names[i:i + batch_size], prompts[i:i + batch_size]))
            scores, cos = scorer([_load_rgb(root / n) for n, _ in chunk], [p for _, p in chunk], batch_size)
            rows += [{"encoder": label, "file": n, "prompt": p, "clip_score": float(s), "cosine": float(c)}
                     for (n, p), s, c in zip(chunk, scores, cos)]
    result = {"analysis": "clipscore", "images": str(root), "definition": "100 * max(cos(image, text), 0)",
              "mean": {k: v["mean"] for k, v in _summary(rows, "encoder").items()}, "scores": rows}
    write_json(out / "clipscore.json", result)
    return result
