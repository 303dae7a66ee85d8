"""The pairs of a study, built from ``generate`` outputs (``generate.json`` + ``images/<encoder>/...``).

Every prompt gives one pair per two encoders (two encoders: one pair per prompt, as the paper's 15).
Several outputs can be combined (e.g. one ``generate`` run per encoder) when they pair up: the same
prompts in the same order and the same settings (seed, guidance, steps, size, sequence length).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

from fastenc.errors import ConfigError


@dataclass(frozen=True)
class Item:
    """One pair: ``encoder_a`` and ``encoder_b``'s images of one prompt (absolute paths)."""

    prompt_index: int
    prompt: str
    encoder_a: str
    encoder_b: str
    file_a: str
    file_b: str


@dataclass(frozen=True)
class Output:
    folder: Path
    encoders: list[str]
    prompts: list[str]
    settings: dict
    files: dict[str, list[Path]]


def read_output(folder: Path) -> Output:
    manifest = folder / "generate.json"
    if not folder.is_dir():
        raise ConfigError(f"--images {folder}: not a directory")
    if not manifest.is_file():
        raise ConfigError(f"--images {folder}: no generate.json (give folders written by python -m train.eval "
                          f"generate)")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        encoders, prompts = [str(e) for e in data["encoders"]], [str(p) for p in data["prompts"]]
        settings = dict(data.get("settings") or {})
        images = {str(k): [folder / str(f) for f in v] for k, v in data["files"]["images"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{manifest}: not a generate.json ({type(exc).__name__}: {exc})") from None
    for enc in encoders:
        files = images.get(enc)
        if files is None or len(files) != len(prompts):
            raise ConfigError(f"{manifest}: encoder {enc!r} has {0 if files is None else len(files)} images for "
                              f"{len(prompts)} prompts")
        for f in files:
            if not f.is_file():
                raise ConfigError(f"{manifest} lists {f.relative_to(folder).as_posix()}, which is missing")
    return Output(folder, encoders, prompts, settings, images)


def combine(outputs: list[Output]) -> tuple[list[str], list[str], dict[str, list[Path]], dict]:
    """(encoders, prompts, files per encoder, settings) of outputs that pair up."""
    first = outputs[0]
    encoders, files = [], {}
    for out in outputs:
        if out.prompts != first.prompts:
            i = next((i for i, (a, b) in enumerate(zip(out.prompts, first.prompts)) if a != b),
                     min(len(out.prompts), len(first.prompts)))
            got = out.prompts[i] if i < len(out.prompts) else "(none)"
            want = first.prompts[i] if i < len(first.prompts) else "(none)"
            raise ConfigError(f"--images {out.folder} and {first.folder} do not pair up: prompt {i + 1} is "
                              f"{got!r} vs {want!r}")
        for key in sorted(set(out.settings) | set(first.settings)):
            if out.settings.get(key) != first.settings.get(key):
                raise ConfigError(f"--images {out.folder} and {first.folder} do not pair up: {key} "
                                  f"{out.settings.get(key)!r} vs {first.settings.get(key)!r}")
        for enc in out.encoders:
            if enc in files:
                raise ConfigError(f"--images {out.folder}: encoder {enc!r} is in another folder too")
            encoders.append(enc)
            files[enc] = out.files[enc]
    if len(encoders) < 2:
        raise ConfigError(f"a study needs at least 2 encoders; --images gives {len(encoders)} "
                          f"({', '.join(encoders) or 'none'})")
    return encoders, first.prompts, files, first.settings


def build_items(folders: list[str | Path]) -> tuple[list[Item], dict]:
    """(items, description) of the study from ``generate`` output folders."""
    if not folders:
        raise ConfigError("study: give --images DIR (a generate output; repeatable), or --db of an existing study")
    outputs = [read_output(Path(f)) for f in folders]
    encoders, prompts, files, settings = combine(outputs)
    items = [Item(i, prompt, a, b, str(files[a][i].resolve()), str(files[b][i].resolve()))
             for i, prompt in enumerate(prompts) for a, b in combinations(encoders, 2)]
    about = {"encoders": encoders, "prompts": prompts, "settings": settings,
             "sources": [str(o.folder.resolve()) for o in outputs]}
    return items, about


def fingerprint(items: list[Item]) -> str:
    """The study's identity: its pairs (prompts, encoders, image paths), in order."""
    return hashlib.sha256(json.dumps([asdict(i) for i in items]).encode()).hexdigest()[:32]
