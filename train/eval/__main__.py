"""``python -m train.eval {tsne,collapse,attention,generate,clipscore,fid,study} ...`` (``--help`` on each).

Bad input exits with status 2 and one line naming the flag, file or value (``train.eval: error: ...``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fastenc.config import TARGET_MAX_LENGTH
from fastenc.errors import ConfigError, FastencError

from .defaults import DEFAULT_THRESHOLD, DIRECTIONS

log = logging.getLogger("fastenc.train")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--backend", default="torch", help="fastenc backend for the encoders (default: torch, the reference numerics)")
    p.add_argument("--tokenizer", help="T5 tokenizer for every encoder (default: each one's own, else the teacher's)")


def _prompt_flags(p: argparse.ArgumentParser, what: str = "prompts") -> None:
    p.add_argument("--prompts", action="append", metavar="FILE", help=f"{what} file (TXT, JSON or JSONL); repeatable")
    p.add_argument("--prompt", action="append", help="a prompt; repeatable")


def _embedding_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, metavar="[LABEL=]PATH",
                   help="teacher checkpoint, or a diffusers pipeline folder (its T5 slot: text_encoder_2 for Flux)")
    p.add_argument("--student", action="append", required=True, metavar="[LABEL=]PATH",
                   help="student checkpoint (fastenc format, e.g. runs/x/student); repeatable")
    p.add_argument("--target", default="flux-dev", choices=sorted(TARGET_MAX_LENGTH),
                   help="tokenise (length, mask) as this pipeline does (default: flux-dev)")
    p.add_argument("--batch-size", type=int, default=16)


def _pipeline_flags(p: argparse.ArgumentParser, steps: int = 28) -> None:
    p.add_argument("--pipeline", required=True, help="diffusers pipeline folder (or hub id), e.g. FLUX.1-dev")
    p.add_argument("--student", action="append", default=[], metavar="[LABEL=]PATH", help="student; repeatable")
    p.add_argument("--teacher", metavar="[LABEL=]PATH", help="checkpoint for the teacher column (default: the "
                   "pipeline's own T5)")
    p.add_argument("--no-teacher", action="store_true", help="students only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=3.5, help="guidance scale (default 3.5, as the paper's figures)")
    p.add_argument("--steps", type=int, default=steps, help=f"inference steps (default {steps})")
    p.add_argument("--height", type=int, help="pixels (default: the pipeline's)")
    p.add_argument("--width", type=int, help="pixels (default: the pipeline's)")
    p.add_argument("--max-sequence-length", type=int, help="T5 tokens (default: the pipeline's)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.eval", description="Quality analyses: a student vs its teacher.")
    sub = p.add_subparsers(dest="analysis", required=True)

    t = sub.add_parser("tsne", help="t-SNE of mean-pooled embeddings + nearest-neighbour agreement")
    _common(t)
    _embedding_flags(t)
    _prompt_flags(t)
    t.add_argument("--perplexity", type=float, default=30.0)
    t.add_argument("--k", type=int, default=5, help="neighbours compared per prompt (default 5)")
    t.add_argument("--metric", default="euclidean", help="t-SNE distance (euclidean, cosine, ...)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-links", action="store_true", help="do not join each prompt's teacher and student points")

    c = sub.add_parser("collapse", help="mode-collapse check on near-concept probes")
    _common(c)
    _embedding_flags(c)
    c.add_argument("--probe", action="append", help="extra probe prompt; repeatable")
    c.add_argument("--probes", action="append", metavar="FILE", help="file of extra probes; repeatable")
    c.add_argument("--no-default-probes", action="store_true", help="leave out 'A rat', 'A cat', ... ")
    c.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"cosine at which a pair counts as collapsed (default {DEFAULT_THRESHOLD})")
    c.add_argument("--fail-on-collapse", action="store_true", help="exit with status 1 when a pair is flagged")

    a = sub.add_parser("attention", help="Flux cross-attention maps per token at one denoising step")
    _common(a)
    _pipeline_flags(a)
    a.add_argument("--prompt", action="append", required=True, help="a prompt; repeatable")
    a.add_argument("--token", action="append", help="a word of the prompt to map; repeatable (default: every word)")
    a.add_argument("--step", type=int, default=10, help="1-based denoising step to record (default 10)")
    a.add_argument("--blocks", default="all", help="all, double, single, or names/globs, comma-separated "
                   "(transformer_blocks.0,single_transformer_blocks.1*)")
    a.add_argument("--direction", choices=DIRECTIONS, default="text-to-image",
                   help="text-to-image: text-query rows (the paper's); image-to-text: image-query columns")
    a.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    a.add_argument("--head-chunk", type=int, default=1, help="heads per explicit softmax (memory vs speed)")

    g = sub.add_parser("generate", help="prompts x encoders, same seed and guidance: a labelled grid")
    _common(g)
    _pipeline_flags(g)
    _prompt_flags(g)

    s = sub.add_parser("clipscore", help="CLIP score; images in T2I-CompBench's layout")
    _common(s)
    s.add_argument("--clip", help="local CLIP model folder (transformers CLIPModel + tokenizer + preprocessor)")
    s.add_argument("--images", help="score existing images: a T2I-CompBench-layout folder or a `generate` output")
    s.add_argument("--pipeline", help="generate with this pipeline first (see --student/--teacher)")
    s.add_argument("--student", action="append", default=[], metavar="[LABEL=]PATH")
    s.add_argument("--teacher", metavar="[LABEL=]PATH")
    s.add_argument("--no-teacher", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--guidance", type=float, default=3.5)
    s.add_argument("--steps", type=int, default=28)
    s.add_argument("--height", type=int)
    s.add_argument("--width", type=int)
    s.add_argument("--max-sequence-length", type=int)
    _prompt_flags(s, "prompts file per category (color_val.txt -> color)")
    s.add_argument("--category", help="category name for --prompt (or a single --prompts file)")
    s.add_argument("--num-images", type=int, default=1, help="images per prompt (T2I-CompBench uses 10)")
    s.add_argument("--batch-size", type=int, default=16, help="images per CLIP batch")

    f = sub.add_parser("fid", help="Frechet Inception Distance of generated images against a reference set")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--images", action="append", required=True, metavar="[LABEL=]DIR",
                   help="generated images: a folder (read recursively) or a generate output (one set per encoder); "
                   "repeatable")
    f.add_argument("--ref", required=True, metavar="DIR|FILE.npz",
                   help="reference images (e.g. MSCOCO-2014 val) or their statistics (.npz with mu, sigma)")
    f.add_argument("--inception", metavar="FILE", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                   "(default: $FASTENC_FID_INCEPTION)")
    f.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    f.add_argument("--batch-size", type=int, default=50, help="images per batch (default 50, as pytorch-fid)")
    f.add_argument("--workers", type=int, default=4, help="threads decoding images (default 4)")
    f.add_argument("--cache-dir", help="reference statistics cache (default: $FASTENC_CACHE_DIR/fid-stats)")
    f.add_argument("--no-cache", action="store_true", help="read a reference folder again; cache nothing")
    f.add_argument("--save-stats", action="store_true",
                   help="write each set's statistics to stats/<label>.npz (pytorch-fid's format: mu, sigma)")

    u = sub.add_parser("study", help="blind A/B preference study on generate outputs, as a local web page")
    u.add_argument("--out", required=True, help="output folder (the database by default, --report's files)")
    u.add_argument("--images", action="append", metavar="DIR",
                   help="a generate output (two or more encoders, or several folders that pair up); repeatable")
    u.add_argument("--db", metavar="FILE", help="SQLite database of the study (default: <out>/study.sqlite)")
    u.add_argument("--report", action="store_true", help="write study.json, answers.csv, shares.csv and exit")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    u.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free one)")
    u.add_argument("--allow-remote", action="store_true", help="allow a --host other than loopback (needs a token)")
    u.add_argument("--token", help="access token for --allow-remote (default: $FASTENC_STUDY_TOKEN, else a random one)")
    u.add_argument("--seed", type=int, help="draw participants' orders from this seed (default: at random)")
    u.add_argument("--question", help="question shown above each pair")
    u.add_argument("--confidence", type=float, default=0.95, help="level of the Wilson intervals (default 0.95)")
    return p


def _settings(args):
    from .pipelines import GenerationSettings

    for flag in ("steps", "height", "width", "max_sequence_length"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {value}: must be at least 1")
    return GenerationSettings(seed=args.seed, guidance=args.guidance, steps=args.steps, height=args.height,
                              width=args.width, max_sequence_length=args.max_sequence_length)


def _switch(args):
    from .encoders import parse_spec
    from .pipelines import EncoderSwitch, load_pipeline

    pipe = load_pipeline(args.pipeline, device=args.device, dtype=args.dtype,
                         without_t5=bool(args.no_teacher or args.teacher))
    teacher = parse_spec(args.teacher, "teacher") if args.teacher else None
    return EncoderSwitch(pipe, [parse_spec(s) for s in args.student], teacher=teacher,
                         include_teacher=not args.no_teacher, tokenizer=args.tokenizer, backend=args.backend)


def _encoders(args):
    from .encoders import load_encoders, parse_spec

    return load_encoders(parse_spec(args.teacher, "teacher"), [parse_spec(s) for s in args.student],
                         tokenizer=args.tokenizer, device=args.device, dtype=args.dtype, backend=args.backend)


def _fid(args, out: Path) -> dict:
    from . import fid
    from .inception import InceptionExtractor

    sets = fid.image_sets(args.images)
    ref = Path(args.ref)
    if not ref.exists():
        raise ConfigError(f"--ref {ref}: no such folder or file")
    for flag in ("workers", "batch_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    cache = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else fid.default_cache_dir()
    extractor = InceptionExtractor(args.inception, device=args.device)
    return fid.run(sets, ref, extractor, out, cache_dir=cache, batch_size=args.batch_size, workers=args.workers,
                   save_stats=args.save_stats)


def run(args) -> tuple[dict | None, int]:
    out = Path(args.out)
    if args.analysis == "tsne":
        from . import tsne
        from .encoders import gather_prompts

        prompts = gather_prompts(args.prompts, args.prompt)
        if len(prompts) < 2:  # checked before any model is loaded
            raise ConfigError(f"tsne needs at least 2 prompts, got {len(prompts)} (--prompts FILE, --prompt)")
        return tsne.run(_encoders(args), prompts, out, target=args.target, perplexity=args.perplexity, k=args.k,
                        seed=args.seed, metric=args.metric, batch_size=args.batch_size, links=not args.no_links), 0
    if args.analysis == "collapse":
        from . import collapse
        from .encoders import gather_prompts

        probes = collapse.probe_list(gather_prompts(args.probes, args.probe), defaults=not args.no_default_probes)
        collapse.check_inputs(probes, args.threshold)
        result = collapse.run(_encoders(args), probes, out, threshold=args.threshold, target=args.target,
                              batch_size=args.batch_size)
        return result, 1 if (args.fail_on_collapse and result["collapsed"]) else 0
    if args.analysis == "attention":
        from . import attention

        settings = _settings(args)
        attention.check_step(args.step, settings.steps)
        return attention.run(_switch(args), args.prompt, out, settings, step=args.step, tokens=args.token,
                             blocks=args.blocks, direction=args.direction, alpha=args.alpha,
                             head_chunk=args.head_chunk), 0
    if args.analysis == "generate":
        from . import generate
        from .encoders import gather_prompts

        settings = _settings(args)
        return generate.run(_switch(args), gather_prompts(args.prompts, args.prompt), out, settings), 0
    if args.analysis in ("fid", "study") and out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if args.analysis == "fid":
        return _fid(args, out), 0
    if args.analysis == "study":
        from . import study

        if args.report:
            return study.report(args, out), 0
        return None, study.serve(args, out)
    from . import clipscore

    if bool(args.images) == bool(args.pipeline):
        raise ConfigError("clipscore: give either --images DIR (score existing images) or --pipeline (generate)")
    if args.images:
        if not args.clip:
            raise ConfigError("clipscore --images needs --clip (a local CLIP model folder)")
        root = Path(args.images)
        if not root.is_dir():
            raise ConfigError(f"--images {root}: not a directory")
        scorer = clipscore.ClipScorer(args.clip, device=args.device, dtype=args.dtype)
        result = clipscore.score_generated(scorer, root, out, batch_size=args.batch_size)
        if result is None:
            result = clipscore.score_folder(scorer, root, out, batch_size=args.batch_size)
        return result, 0
    categories = clipscore.categories_from(args.prompts, args.prompt, args.category)
    if args.num_images < 1:
        raise ConfigError(f"--num-images {args.num_images}: must be at least 1")
    settings = _settings(args)
    switch = _switch(args)
    scorer = clipscore.ClipScorer(args.clip, device=args.device, dtype=args.dtype) if args.clip else None
    if scorer is None:
        log.info("clipscore: no --clip given: images are written for T2I-CompBench, not scored")
    return clipscore.generate_and_score(switch, categories, out, settings, scorer, num_images=args.num_images), 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result, status = run(args)
    except FastencError as exc:
        sys.stderr.write(f"train.eval: error: {exc}\n")
        return 2
    if result is None:  # the study server printed its own line when it started listening
        return status
    keys = ("analysis", "collapsed", "mean", "fid", "participants", "answers", "overall", "inter_rater")
    summary = {k: result[k] for k in keys if k in result}
    if "agreement" in result:
        summary["agreement"] = {k: {m: v[m] for m in v if m != "per_prompt"} for k, v in result["agreement"].items()}
    sys.stdout.write(json.dumps({**summary, "out": str(Path(args.out))}) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
