"""Prompt data: three components read from local files, mixed by weight, in staged curricula.

Components (names are free; the paper's three are image quality, semantics and text rendering):

* TXT  — one prompt per line (T2I-CompBench ``*_train.txt``);
* JSON — a list (or an object whose values are the items) of strings or objects (CommonText);
* JSONL — one string or object per line (LAION-Aesthetics-style metadata).

Objects hold the prompt under ``field`` (default: the first of ``prompt``, ``caption``, ``text``, ``TEXT``).
Empty lines, duplicates and over-length prompts are counted and reported; empty lines and duplicates
are left out, over-length prompts are truncated as the pipeline would (or dropped, if configured).
A missing or malformed file raises one :class:`DataError` naming the file (and line or item).

The stream is deterministic in ``(seed, stage, batch index)`` and each component's epoch: its whole
state is a few integers (:meth:`PromptStream.state_dict`), which is what exact resume needs.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from fastenc.errors import ConfigError

from .config import ComponentConfig, DataConfig, StageConfig

log = logging.getLogger("fastenc.train")

PROMPT_KEYS = ("prompt", "caption", "text", "TEXT")
SUFFIX_FORMATS = {".txt": "txt", ".json": "json", ".jsonl": "jsonl"}
#: Samples in one component epoch (prompts x repeats): its shuffled order is held in memory (8 bytes each).
MAX_EPOCH = 1 << 26


class DataError(ConfigError):
    """A prompt file is missing or malformed; the message names the file and line/item."""


@dataclass
class ComponentReport:
    name: str
    files: list[str] = field(default_factory=list)
    read: int = 0  # lines/items read
    kept: int = 0
    empty: int = 0  # left out
    duplicates: int = 0  # left out (when dedupe)
    over_length: int = 0  # longer than max_length tokens
    over_length_dropped: int = 0
    repeats: int = 1

    def line(self) -> str:
        action = "dropped" if self.over_length_dropped else "truncated"
        return (f"{self.name}: {self.kept} prompts kept of {self.read} read from {len(self.files)} file(s); "
                f"{self.empty} empty, {self.duplicates} duplicate(s) left out, "
                f"{self.over_length} over-length ({action}); repeats x{self.repeats}")


@dataclass
class Component:
    name: str
    prompts: list[str]
    report: ComponentReport


# ---------------------------------------------------------------------------- reading files


def _expand(pattern: str, where: str) -> list[Path]:
    path = Path(pattern)
    if any(ch in pattern for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"{pattern}: pattern matched no files ({where})")
        return matches
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIX_FORMATS)
        if not files:
            raise DataError(f"{path}: directory holds no .txt/.json/.jsonl files ({where})")
        return files
    if not path.is_file():
        raise DataError(f"{path}: file not found ({where})")
    return [path]


def _item_text(item, key: str | None, where: str) -> str | None:
    """The prompt of one JSON item; None for a null item (counted as empty)."""
    if item is None or isinstance(item, str):
        return item
    if isinstance(item, dict):
        keys = (key,) if key else PROMPT_KEYS
        for k in keys:
            if k in item:
                value = item[k]
                if value is not None and not isinstance(value, str):
                    raise DataError(f"{where}: {k!r} is {type(value).__name__}, expected a string")
                return value
        raise DataError(f"{where}: object has none of the keys {', '.join(map(repr, keys))}"
                        + ("" if key else " (set the component's field=...)"))
    raise DataError(f"{where}: item is {type(item).__name__}, expected a string or an object")


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {exc.start})") from None


def read_prompts(path: Path, fmt: str = "auto", key: str | None = None) -> list[str | None]:
    """Raw prompts of one file in order (None or blank = empty entries, still counted)."""
    if fmt == "auto":
        fmt = SUFFIX_FORMATS.get(path.suffix.lower(), "")
        if not fmt:
            raise DataError(f"{path}: unknown prompt file type {path.suffix!r}; set the component's format "
                            "to txt, json or jsonl")
    text = _read_text(path)
    if fmt == "txt":
        return text.splitlines()
    if fmt == "jsonl":
        out: list[str | None] = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                out.append(None)
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{n}: not valid JSON (too deeply nested)") from None
            except ValueError as exc:  # e.g. an integer past Python's digit limit
                raise DataError(f"{path}:{n}: not valid JSON ({exc})") from None
            out.append(_item_text(item, key, f"{path}:{n}"))
        return out
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{path}: not valid JSON (too deeply nested)") from None
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(doc, dict):
        items = list(doc.items())
    elif isinstance(doc, list):
        items = list(enumerate(doc))
    else:
        raise DataError(f"{path}: expected a JSON list (or object) of prompts, got {type(doc).__name__}")
    return [_item_text(item, key, f"{path}: item {idx!r}") for idx, item in items]


# ---------------------------------------------------------------------------- components


def token_lengths(tokenizer, prompts: list[str]) -> list[int]:
    """Token count of each prompt including ``</s>`` (no truncation)."""
    if not prompts:
        return []
    encs = tokenizer.backend.encode_batch(prompts, add_special_tokens=True)
    return [len(e.ids) for e in encs]


def load_component(name: str, spec: ComponentConfig, *, tokenizer=None, max_length: int | None = None,
                   dedupe: bool = True, over_length: str = "truncate") -> Component:
    report = ComponentReport(name=name, repeats=spec.repeats)
    seen: set[str] = set()
    prompts: list[str] = []
    for i, pattern in enumerate(spec.paths):
        for path in _expand(pattern, f"data.components.{name}.paths[{i}]"):
            report.files.append(str(path))
            for raw in read_prompts(path, spec.format, spec.field):
                report.read += 1
                text = (raw or "").strip()
                if not text:
                    report.empty += 1
                    continue
                if dedupe and text in seen:
                    report.duplicates += 1
                    continue
                seen.add(text)
                prompts.append(text)
    if tokenizer is not None and max_length is not None:
        lengths = token_lengths(tokenizer, prompts)
        over = [n > max_length for n in lengths]
        report.over_length = sum(over)
        if over_length == "drop":
            prompts = [p for p, o in zip(prompts, over) if not o]
            report.over_length_dropped = report.over_length
    report.kept = len(prompts)
    if not prompts:
        raise DataError(f"data.components.{name}: no usable prompts in {', '.join(report.files)} "
                        f"({report.read} read, {report.empty} empty)")
    return Component(name, prompts, report)


def load_components(cfg: DataConfig, *, tokenizer=None, max_length: int | None = None) -> dict[str, Component]:
    if not cfg.components:
        raise ConfigError("data.components is empty: define at least one prompt component")
    comps = {name: load_component(name, spec, tokenizer=tokenizer, max_length=max_length, dedupe=cfg.dedupe,
                                  over_length=cfg.over_length)
             for name, spec in cfg.components.items()}
    return comps


def cross_duplicates(components: dict[str, Component]) -> int:
    """Prompts present in more than one component (kept in each; reported)."""
    owners: dict[str, int] = {}
    for comp in components.values():
        for p in set(comp.prompts):
            owners[p] = owners.get(p, 0) + 1
    return sum(1 for n in owners.values() if n > 1)


# ---------------------------------------------------------------------------- stream


@dataclass
class Stage:
    name: str
    components: list[str]
    weights: list[float]  # normalised, one per component
    batches: int
    resolution: int | None


@dataclass
class Batch:
    prompts: list[str]  # this process's slice
    sources: list[str]  # component of each prompt
    stage: str
    stage_index: int
    resolution: int | None


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across runs and machines)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _resolve_stages(cfg: DataConfig, comps: dict[str, Component], global_batch: int) -> list[Stage]:
    specs = cfg.stages or [StageConfig(name="all")]
    stages = []
    for i, spec in enumerate(specs):
        names = spec.components or list(comps)
        weights = []
        for n in names:
            c = cfg.components[n]
            w = (spec.weights or {}).get(n, c.weight)
            weights.append(float(len(comps[n].prompts) * c.repeats) if w is None else float(w))
        total = sum(weights)
        if total <= 0:
            raise ConfigError(f"data.stages[{i}]: component weights sum to 0")
        if not math.isfinite(total) or not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ConfigError(f"data.stages[{i}]: component weights {weights} do not form a distribution "
                              "(each must be a finite number >= 0, their sum finite)")
        size = sum(len(comps[n].prompts) * cfg.components[n].repeats for n in names)
        batches = spec.batches or max(1, math.ceil(size / global_batch))
        stages.append(Stage(spec.name or f"stage{i + 1}", names, [w / total for w in weights], batches,
                            spec.resolution))
    return stages


class PromptStream:
    """Deterministic batches of prompts: per stage, each sample picks a component by weight, then the
    next prompt of that component's shuffled epoch (its prompts, each ``repeats`` times)."""

    def __init__(self, cfg: DataConfig, components: dict[str, Component], *, seed: int, num_processes: int = 1,
                 process_index: int = 0):
        self.components = components
        self.repeats = {n: cfg.components[n].repeats for n in components}
        for n, r in self.repeats.items():
            size = len(components[n].prompts) * r
            if size > MAX_EPOCH:
                raise ConfigError(f"data.components.{n}: {len(components[n].prompts)} prompts x repeats {r} = {size} "
                                  f"samples per epoch; at most {MAX_EPOCH} (lower data.components.{n}.repeats)")
        self.batch_size = cfg.batch_size
        self.global_batch = cfg.batch_size * num_processes
        self.process_index = process_index
        self.seed = seed
        self.stages = _resolve_stages(cfg, components, self.global_batch)
        self.stage_index = 0
        self.batch_in_stage = 0
        self.position = {n: [0, 0] for n in components}  # name -> [epoch, index in epoch]
        self._orders: dict[str, tuple[int, torch.Tensor]] = {}

    @property
    def total_batches(self) -> int:
        return sum(s.batches for s in self.stages)

    def _order(self, name: str, epoch: int) -> torch.Tensor:
        cached = self._orders.get(name)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        n = len(self.components[name].prompts)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "component", name, epoch))
        order = torch.randperm(n * self.repeats[name], generator=gen) % n  # a tensor: 8 bytes a sample
        self._orders[name] = (epoch, order)
        return order

    def _take(self, name: str) -> str:
        epoch, idx = self.position[name]
        order = self._order(name, epoch)
        if not 0 <= idx < len(order):
            raise ConfigError(f"data position {idx} of component {name!r} lies outside its epoch of {len(order)} "
                              "samples; the data changed since the checkpoint was written")
        prompt = self.components[name].prompts[int(order[idx])]
        idx += 1
        if idx == len(order):
            epoch, idx = epoch + 1, 0
        self.position[name] = [epoch, idx]
        return prompt

    def next_batch(self) -> Batch:
        """The next global batch (this process's slice). After the last stage it keeps drawing from it."""
        if self.batch_in_stage >= self.stages[self.stage_index].batches and self.stage_index + 1 < len(self.stages):
            self.stage_index += 1
            self.batch_in_stage = 0
            log.info("data: entering stage %d/%d (%s)", self.stage_index + 1, len(self.stages),
                     self.stages[self.stage_index].name)
        stage = self.stages[self.stage_index]
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "stage", self.stage_index, self.batch_in_stage))
        picks = torch.multinomial(torch.tensor(stage.weights), self.global_batch, replacement=True,
                                  generator=gen).tolist()
        sources = [stage.components[i] for i in picks]
        prompts = [self._take(name) for name in sources]  # every process draws the whole global batch
        self.batch_in_stage += 1
        lo = self.process_index * self.batch_size
        hi = lo + self.batch_size
        return Batch(prompts[lo:hi], sources[lo:hi], stage.name, self.stage_index, stage.resolution)

    def state_dict(self) -> dict:
        return {"stage_index": self.stage_index, "batch_in_stage": self.batch_in_stage,
                "position": {k: list(v) for k, v in self.position.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.position) - set(state["position"])
        if missing:
            raise ConfigError(f"checkpoint data position lacks component(s) {sorted(missing)}; "
                              "the data config changed since the checkpoint was written")
        stage_index, batch_in_stage = int(state["stage_index"]), int(state["batch_in_stage"])
        if not 0 <= stage_index < len(self.stages) or batch_in_stage < 0:
            raise ConfigError(f"checkpoint data position (stage {stage_index}, batch {batch_in_stage}) does not fit "
                              f"the {len(self.stages)} stage(s) configured; the data config changed since the "
                              "checkpoint was written")
        self.stage_index, self.batch_in_stage = stage_index, batch_in_stage
        self.position = {k: [int(e), int(i)] for k, (e, i) in state["position"].items() if k in self.position}


# ---------------------------------------------------------------------------- reporting


def report(components: dict[str, Component], stream: PromptStream | None = None) -> dict:
    """A JSON-able summary; also logged one line per component and stage."""
    out = {"components": {n: asdict(c.report) for n, c in components.items()},
           "cross_component_duplicates": cross_duplicates(components)}
    for c in components.values():
        log.info("data: %s", c.report.line())
    if out["cross_component_duplicates"]:
        log.info("data: %d prompt(s) appear in more than one component (kept in each)",
                 out["cross_component_duplicates"])
    if stream is not None:
        out["stages"] = [asdict(s) for s in stream.stages]
        for s in stream.stages:
            mix = ", ".join(f"{n} {w:.0%}" for n, w in zip(s.components, s.weights))
            log.info("data: stage %s: %d batches of %d (%s)%s", s.name, s.batches, stream.global_batch, mix,
                     f" at {s.resolution}px" if s.resolution else "")
    return out


def all_prompts(components: dict[str, Component], extra: Iterable[str] = ()) -> list[str]:
    """Unique prompts of every component plus ``extra`` (probes, negative prompt), in first-seen order."""
    seen: dict[str, None] = {}
    for comp in components.values():
        for p in comp.prompts:
            seen.setdefault(p, None)
    for p in extra:
        seen.setdefault(p, None)
    return list(seen)
