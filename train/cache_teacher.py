"""``python -m train.cache_teacher --config train.toml``: precompute the teacher's embeddings.

Reads the same config as training (data, teacher, DiT kind/target, tokenizer, pooled CLIP), encodes every
unique prompt — plus the collapse probes, image prompts and PixArt's negative prompt — with the live
teacher, and writes safetensors shards and an index into ``teacher.cache`` (or ``--output``).

An existing cache built for the same settings is extended with the prompts it lacks (nothing to do when
it has them all); ``--force`` rebuilds it. Under ``accelerate launch`` each process encodes its share.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from fastenc.errors import ConfigError

from .boundary import Parser, guarded
from .config import load_config
from .data import all_prompts, load_components
from .distributed import setup_logging, use_cpu
from .student import TORCH_DTYPES, load_tokenizer
from .teacher import load_live_teacher, teacher_forward, tokenize
from .teacher_cache import (INDEX_NAME, CacheMeta, TeacherCache, clear, tokenizer_fingerprint, write_index,
                            write_shards)

log = logging.getLogger("fastenc.train")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m train.cache_teacher", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="training config (.toml, .json or .yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set teacher.path=/models/t5-xxl (repeatable)")
    p.add_argument("--output", help="cache folder (default: teacher.cache from the config)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per teacher forward (default 8)")
    p.add_argument("--shard-size", type=int, default=256,
                   help="prompts per shard, rounded up to whole batches (default 256)")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"],
                   help="storage dtype (default: the existing cache's, else bf16)")
    p.add_argument("--force", action="store_true",
                   help="delete an existing cache's own files (index and shards; nothing else) and rebuild it")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks of unexpected errors")
    return p


def run(args: argparse.Namespace) -> Path:
    from accelerate import PartialState
    from tqdm.auto import tqdm

    cfg = load_config(args.config, args.overrides)
    out = Path(args.output or cfg.teacher.cache or "")
    if not str(out) or str(out) == ".":
        raise ConfigError("no cache folder: pass --output or set teacher.cache")
    if args.batch_size <= 0 or args.shard_size <= 0:
        raise ConfigError("--batch-size and --shard-size must be positive")
    state = PartialState(cpu=use_cpu(cfg))
    tokenizer = load_tokenizer(cfg)
    max_length = cfg.max_length()
    comps = load_components(cfg.data, tokenizer=tokenizer, max_length=max_length)
    prompts = all_prompts(comps, [cfg.dit.negative_prompt] * cfg.negative + list(cfg.run.probes)
                          + list(cfg.run.image_prompts))

    existing, generation, entries = None, 0, {}
    if TeacherCache.present(out):
        if args.force:  # the cache's own files only: anything else in the folder stays
            if state.is_main_process:
                log.info("cache_teacher: --force: deleted %d files of the old cache in %s", clear(out), out)
            state.wait_for_everyone()
        else:
            existing = TeacherCache(out)
    teacher = load_live_teacher(cfg, state.device)
    clip = None
    if cfg.pooled == "clip":
        from .dit import PooledCLIP

        clip = PooledCLIP(cfg.dit.clip_path or cfg.dit.path, state.device, TORCH_DTYPES[cfg.dit.dtype])
    dtype = str(TORCH_DTYPES[args.dtype]).removeprefix("torch.") if args.dtype else (
        existing.meta.dtype if existing is not None else "bfloat16")
    meta = CacheMeta(target=cfg.target, max_length=max_length, masked=cfg.masked,
                     tokenizer=tokenizer_fingerprint(tokenizer), teacher=teacher.source,
                     dim=teacher.config.output_dim, pooled_dim=clip.dim if clip is not None else None, dtype=dtype)
    if existing is not None:
        if existing.meta != meta:
            diff = [f"{k}: {getattr(existing.meta, k)!r} -> {getattr(meta, k)!r}"
                    for k in meta.__dataclass_fields__ if getattr(existing.meta, k) != getattr(meta, k)]
            raise ConfigError(f"{out}: existing cache was built for other settings ({'; '.join(diff)}); "
                              "pass --force to rebuild it")
        prompts = existing.missing(prompts)
        entries = dict(existing.entries)
        generation = existing.generation + 1
        if not prompts:
            log.info("cache_teacher: %s already holds all %d prompts", out, len(existing))
            return out
        log.info("cache_teacher: adding %d prompts to %s", len(prompts), out)

    mine = prompts[state.process_index::state.num_processes]
    masked = cfg.masked

    def encode(chunk: list[str]):
        ids, mask = tokenize(tokenizer, chunk, max_length, cfg.target_row.prepare)
        embeds = teacher_forward(teacher.model, ids, mask, masked)  # [b, L, D]
        pooled = clip(chunk) if clip is not None else None  # [b, Dp]
        return embeds, mask, pooled

    size = len(prompts) * max_length * meta.dim * torch.finfo(getattr(torch, dtype)).bits // 8
    log.info("cache_teacher: %d prompts x %d tokens x %d -> %.2f GiB (%s) in %s", len(prompts), max_length,
             meta.dim, size / 2**30, meta.dtype, out)
    with tqdm(total=len(mine), disable=not state.is_local_main_process, unit="prompt") as bar:
        part = write_shards(out, mine, encode, meta=meta, batch_size=args.batch_size, shard_size=args.shard_size,
                            prefix=f"shard-g{generation:03d}-r{state.process_index:03d}", progress=bar)
    part_file = out / f".part-g{generation:03d}-r{state.process_index:03d}.json"
    part_file.write_text(json.dumps(part))
    state.wait_for_everyone()
    if state.is_main_process:
        for r in range(state.num_processes):
            f = out / f".part-g{generation:03d}-r{r:03d}.json"
            entries.update(json.loads(f.read_text()))
            f.unlink()
        write_index(out, meta, entries, generation)
        log.info("cache_teacher: %s/%s lists %d prompts", out, INDEX_NAME, len(entries))
    state.wait_for_everyone()
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()

    def build() -> int:
        run(args)
        return 0

    return guarded("train.cache_teacher", build, verbose=args.verbose,
                   interrupted="run it again: it keeps the shards already written",
                   memory_hint="lower --batch-size")


if __name__ == "__main__":
    sys.exit(main())
