"""Training configuration: dataclasses read from a TOML/JSON/YAML file plus ``--set key=value`` overrides.

Every section is a dataclass; unknown keys and values of the wrong type raise
:class:`fastenc.errors.ConfigError` naming the key (``dit.kind``, ``data.components.text.paths``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastenc.errors import ConfigError

LOSSES = ("vision", "embedding")
POOLED = ("auto", "clip", "zeros", "none")
PRECISIONS = ("bf16", "no")
DISTRIBUTED = ("auto", "fsdp")
OVER_LENGTH = ("truncate", "drop")
FORMATS = ("auto", "txt", "json", "jsonl")
SCHEDULES = ("linear", "constant")
DTYPES = ("fp32", "bf16", "fp16")
CONFIG_FORMATS = {".toml": "TOML", ".json": "JSON", ".yaml": "YAML", ".yml": "YAML"}


@dataclass(frozen=True)
class DiTKind:
    """What one kind of frozen DiT's pipeline does around its transformer (diffusers 0.42); the wrapper in
    :mod:`train.dit` of the same ``name`` runs it.

    ``target``: the default :mod:`fastenc.targets` row (tokenizer length, whether the encoder sees the mask,
    what the pipeline does to the embeddings); ``guidance``: the values drawn per sample; ``pooled``: the
    transformer takes a pooled text vector (Flux's CLIP); ``negative``: classifier-free guidance against the
    negative prompt's embedding; ``vae_scale_factor``: pixels per latent pixel; ``vae_temporal_factor`` and
    ``num_frames``: frames per latent frame and the pipeline's default frame count (video kinds only)."""

    name: str
    label: str
    target: str
    guidance: tuple[float, ...]
    pooled: bool = False
    negative: bool = True
    vae_scale_factor: int = 8
    vae_temporal_factor: int | None = None
    num_frames: int | None = None

    @property
    def video(self) -> bool:
        return self.vae_temporal_factor is not None


def _steps(lo: float, hi: float) -> tuple[float, ...]:
    return tuple(lo + 0.5 * i for i in range(int(round((hi - lo) / 0.5)) + 1))


#: Every DiT kind. Flux and PixArt-α: the guidance the paper samples (step 0.5); Wan and LTX-Video: the same
#: step around the pipeline's default scale (5.0 and 3.0).
KINDS: dict[str, DiTKind] = {k.name: k for k in (
    DiTKind("flux", "Flux", "flux-dev", _steps(2.0, 5.0), pooled=True, negative=False),
    DiTKind("pixart", "PixArt-α", "pixart-alpha", _steps(5.0, 10.0)),
    DiTKind("wan", "Wan", "wan", _steps(4.0, 6.0), vae_temporal_factor=4, num_frames=81),
    DiTKind("ltx", "LTX-Video", "ltx-video", _steps(2.0, 4.0), vae_scale_factor=32, vae_temporal_factor=8,
            num_frames=161),
)}
DIT_KINDS = tuple(KINDS)
DEFAULT_GUIDANCE = {name: list(k.guidance) for name, k in KINDS.items()}
DEFAULT_TARGET = {name: k.target for name, k in KINDS.items()}
PROBES = ["A rat", "A cat", "A man", "A monkey", "A woman"]
#: Bounds on counts: a typo (an extra zero or three) is refused before anything is allocated.
MAX_STEPS = 10**12
MAX_SEED = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds python, numpy and torch)
MAX_INFERENCE_STEPS = 1000
MAX_RESOLUTION = 8192
MAX_BATCH = 65536
MAX_LENGTH = 8192
MAX_FRAMES = 10**5
MAX_REPEATS = 10**6


class Invalid(ConfigError):
    """A config value out of range; ``key`` is the value's dotted key (to name where it was set)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def origin_of(key: str, origins: dict[str, str] | None, default: str | None) -> str | None:
    """Where ``key`` was set: the flag that set it or a section above it (``--set data.components.x={...}``),
    else ``default`` (the config file)."""
    if origins:
        parts = key.replace("[", ".[").split(".")
        while parts:
            found = origins.get(".".join(parts).replace(".[", "["))
            if found is not None:
                return found
            parts.pop()
    return default


def _check_int(key: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise Invalid(key, f"{key}={value!r}: must be an integer in {lo}..{hi}")


def _check_float(key: str, value: Any, interval: str, origin_key: str | None = None) -> None:
    """``interval``: "(0, inf)", "[0, 1)", ...; NaN and inf are refused whatever the interval."""
    lo_text, hi_text = interval[1:-1].split(", ")
    lo, hi = float(lo_text), float(hi_text)
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (lo < value if interval[0] == "(" else lo <= value)
          and (value < hi if interval[-1] == ")" else value <= hi))
    if not ok:
        if hi == math.inf:
            rule = f"> {lo_text}" if interval[0] == "(" else f">= {lo_text}"
        else:
            rule = f"in {interval}"
        raise Invalid(origin_key or key, f"{key}={value!r}: must be a finite number {rule}")


@dataclass
class StudentConfig:
    init: str = ""  # T5 checkpoint (transformers layout, e.g. flan-t5-base) or a fastenc / DistillT5 checkpoint
    subfolder: str | None = None
    tokenizer: str | None = None  # T5 tokenizer folder; default: the student's own, else the DiT pipeline's
    dtype: str = "fp32"  # master weights (autocast computes in bf16)


@dataclass
class TeacherConfig:
    path: str | None = None  # T5-v1.1-XXL (e.g. a FLUX.1-dev folder with subfolder="text_encoder_2")
    subfolder: str | None = None
    cache: str | None = None  # folder written by `python -m train.cache_teacher`; read when it holds an index
    dtype: str = "bf16"


@dataclass
class DiTConfig:
    kind: str = "flux"  # flux | pixart | wan | ltx (KINDS)
    path: str = ""  # diffusers pipeline folder (transformer/, scheduler/, optional vae/, text_encoder/, tokenizer/)
    transformer_subfolder: str = "transformer"
    scheduler_subfolder: str = "scheduler"
    num_inference_steps: int = 20
    guidance: list[float] | None = None  # default: the kind's (Flux 2.0..5.0, PixArt 5.0..10.0, step 0.5)
    resolution: int = 512  # pixels (height = width); a stage may override it
    vae_scale_factor: int | None = None  # pixels per latent pixel; default: the kind's (8, LTX-Video 32)
    num_frames: int | None = None  # video kinds: frames per sample, 1 + k x vae_temporal_factor (Wan 81, LTX 161)
    vae_temporal_factor: int | None = None  # video kinds: frames per latent frame (Wan 4, LTX-Video 8)
    frame_rate: float = 25.0  # LTX-Video: the frame rate its rotary-position scale is computed from
    pooled: str = "auto"  # Flux pooled CLIP input: clip (as the pipeline) | zeros (explicit); other kinds: none
    clip_path: str | None = None  # folder with text_encoder/ + tokenizer/ (default: dit.path)
    vae_subfolder: str | None = None  # e.g. "vae": image grids are decoded with it when set
    dtype: str = "bf16"
    gradient_checkpointing: bool = True
    target: str | None = None  # fastenc target; default the kind's (flux-dev, pixart-alpha, wan, ltx-video)
    max_length: int | None = None  # overrides the target's length
    negative_prompt: str = ""  # the unconditional prompt of classifier-free guidance (all kinds but Flux)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01  # torch.optim.AdamW's default
    schedule: str = "linear"  # linear decay to 0 after warm-up | constant after warm-up
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 disables clipping
    ema_decay: float | None = None  # e.g. 0.999: keep an exponential moving average of the student


@dataclass
class ComponentConfig:
    paths: list[str] = field(default_factory=list)  # files, directories or glob patterns
    format: str = "auto"  # auto (by suffix) | txt | json | jsonl
    field: str | None = None  # JSON key holding the prompt (default: prompt, caption, text, TEXT)
    weight: float | None = None  # relative sampling weight (default: prompt count x repeats)
    repeats: int = 1


@dataclass
class StageConfig:
    name: str = ""
    components: list[str] = field(default_factory=list)  # default: every component
    batches: int | None = None  # length in global batches (default: one pass over the stage's prompts)
    resolution: int | None = None  # pixels (default: dit.resolution)
    weights: dict[str, float] | None = None  # per-stage override of component weights


@dataclass
class DataConfig:
    components: dict[str, ComponentConfig] = field(default_factory=dict)
    stages: list[StageConfig] = field(default_factory=list)  # default: one stage over every component
    batch_size: int = 4  # prompts per process and batch
    dedupe: bool = True
    over_length: str = "truncate"  # truncate (as the pipeline does) | drop


@dataclass
class RunConfig:
    output_dir: str = "out/train"
    seed: int = 0
    loss: str = "vision"  # vision (step-following through the DiT) | embedding (naive MSE baseline)
    max_steps: int | None = None  # optimizer steps; default: the stages' total
    stop_after_steps: int | None = None  # stop (with a checkpoint) after this many steps in this invocation
    mixed_precision: str = "bf16"  # bf16 | no
    distributed: str = "auto"  # auto (whatever `accelerate launch` configured: DDP) | fsdp
    save_every: int = 1000  # optimizer steps; written at the end of the trajectory that reaches it
    keep_checkpoints: int = 3
    log_every: int = 10  # log line interval (metrics.jsonl gets every step)
    diagnostic_every: int = 500  # mode-collapse probe interval (0: only at start and end)
    probes: list[str] = field(default_factory=lambda: list(PROBES))
    collapse_threshold: float = 0.99  # cosine similarity at which two probes count as collapsed
    image_every: int = 0  # teacher-vs-student PNG grid interval (0: never)
    image_prompts: list[str] = field(default_factory=lambda: ["A rat", "A sculptor waving a poster stating 'user'."])
    image_seed: int = 0
    log_with: list[str] = field(default_factory=list)  # e.g. ["tensorboard"]
    resume: str | None = None  # checkpoint folder, or "auto" for the latest under output_dir
    cpu: bool = False  # force CPU even where a GPU exists


@dataclass
class TrainConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # ---- derived values -----------------------------------------------------------------

    @property
    def kind(self) -> DiTKind:
        return KINDS[self.dit.kind]

    @property
    def guidance(self) -> list[float]:
        return list(self.dit.guidance) if self.dit.guidance else DEFAULT_GUIDANCE[self.dit.kind]

    @property
    def target(self) -> str:
        return self.dit.target or DEFAULT_TARGET[self.dit.kind]

    @property
    def target_row(self):
        """The :class:`fastenc.targets.Target` the encoder's output is prepared by."""
        from fastenc.targets import get_target

        return get_target(self.target)

    @property
    def pooled(self) -> str:
        if self.dit.pooled == "auto":
            return "clip" if self.kind.pooled else "none"
        return self.dit.pooled

    @property
    def masked(self) -> bool:
        """Whether the pipeline passes the attention mask to its text encoder (PixArt and Wan do, Flux and
        LTX-Video do not): the target's row says."""
        return self.target_row.masked

    @property
    def negative(self) -> bool:
        """Whether the DiT runs classifier-free guidance against the negative prompt's embedding."""
        return self.kind.negative

    @property
    def vae_scale_factor(self) -> int:
        return self.dit.vae_scale_factor or self.kind.vae_scale_factor

    @property
    def vae_temporal_factor(self) -> int | None:
        return self.dit.vae_temporal_factor or self.kind.vae_temporal_factor

    @property
    def num_frames(self) -> int | None:
        return self.dit.num_frames or self.kind.num_frames

    def max_length(self) -> int:
        from fastenc.config import max_length_for

        return self.dit.max_length or max_length_for(self.target)

    # ---- validation / (de)serialisation -------------------------------------------------

    def validate(self, source: str | None = None, origins: dict[str, str] | None = None) -> "TrainConfig":
        """Check every value (type, finiteness, range, consistency) before any work starts.

        ``source`` (the config file) prefixes the message; ``origins`` maps keys set on the command line to
        the flag that set them (``--lr``, ``--set``), which the message names instead of the file.
        """
        try:
            self._validate()
        except ConfigError as exc:
            if source is None and not origins:
                raise
            where = origin_of(getattr(exc, "key", None) or "", origins, source)
            if where is None:
                raise
            raise ConfigError(f"{where}: {exc}") from None
        return self

    def _validate(self) -> None:
        choices = [
            ("dit.kind", self.dit.kind, DIT_KINDS), ("run.loss", self.run.loss, LOSSES),
            ("dit.pooled", self.dit.pooled, POOLED), ("run.mixed_precision", self.run.mixed_precision, PRECISIONS),
            ("run.distributed", self.run.distributed, DISTRIBUTED),
            ("data.over_length", self.data.over_length, OVER_LENGTH), ("optim.schedule", self.optim.schedule, SCHEDULES),
            ("student.dtype", self.student.dtype, DTYPES), ("teacher.dtype", self.teacher.dtype, DTYPES),
            ("dit.dtype", self.dit.dtype, DTYPES),
        ]
        for name, comp in self.data.components.items():
            choices.append((f"data.components.{name}.format", comp.format, FORMATS))
        for key, value, allowed in choices:
            if value not in allowed:
                raise Invalid(key, f"{key}={value!r}: choose one of {', '.join(allowed)}")
        d, o, r = self.dit, self.optim, self.run
        for key, value, lo, hi in (
            ("dit.num_inference_steps", d.num_inference_steps, 1, MAX_INFERENCE_STEPS),
            ("dit.resolution", d.resolution, 1, MAX_RESOLUTION),
            ("data.batch_size", self.data.batch_size, 1, MAX_BATCH), ("run.save_every", r.save_every, 1, MAX_STEPS),
            ("run.log_every", r.log_every, 1, MAX_STEPS), ("run.keep_checkpoints", r.keep_checkpoints, 1, 10**6),
            ("run.diagnostic_every", r.diagnostic_every, 0, MAX_STEPS),
            ("run.image_every", r.image_every, 0, MAX_STEPS),
            ("run.seed", r.seed, 0, MAX_SEED), ("run.image_seed", r.image_seed, 0, MAX_SEED),
            ("optim.warmup_steps", o.warmup_steps, 0, MAX_STEPS),
        ):
            _check_int(key, value, lo, hi)
        for key, value, lo, hi in (("run.max_steps", r.max_steps, 1, MAX_STEPS),
                                   ("run.stop_after_steps", r.stop_after_steps, 1, MAX_STEPS),
                                   ("dit.max_length", d.max_length, 1, MAX_LENGTH),
                                   ("dit.vae_scale_factor", d.vae_scale_factor, 1, 64),
                                   ("dit.vae_temporal_factor", d.vae_temporal_factor, 1, 64),
                                   ("dit.num_frames", d.num_frames, 1, MAX_FRAMES)):
            if value is not None:
                _check_int(key, value, lo, hi)
        # the optimiser: torch.optim.AdamW's own rules, and finite
        _check_float("optim.lr", o.lr, "(0, inf)")
        if not isinstance(o.betas, (list, tuple)) or len(o.betas) != 2:
            raise Invalid("optim.betas", f"optim.betas={o.betas!r}: expected two numbers")
        for i, beta in enumerate(o.betas):
            _check_float(f"optim.betas[{i}]", beta, "[0, 1)", origin_key="optim.betas")
        _check_float("optim.eps", o.eps, "(0, inf)")
        _check_float("optim.weight_decay", o.weight_decay, "[0, inf)")
        _check_float("optim.max_grad_norm", o.max_grad_norm, "[0, inf)")
        if o.ema_decay is not None:
            _check_float("optim.ema_decay", o.ema_decay, "(0, 1)")
        _check_float("run.collapse_threshold", r.collapse_threshold, "[-1, 1]")
        if d.guidance is not None:
            if not d.guidance:
                raise Invalid("dit.guidance", "dit.guidance=[]: give at least one value, or leave it unset for the "
                                              "default")
            for i, g in enumerate(d.guidance):
                _check_float(f"dit.guidance[{i}]", g, "[0, inf)", origin_key="dit.guidance")
        if len(r.probes) < 2:
            raise Invalid("run.probes", f"run.probes={r.probes!r}: give at least two prompts (collapse is measured "
                                        "between pairs)")
        if r.image_every and not r.image_prompts:
            raise Invalid("run.image_prompts", "run.image_prompts is empty but run.image_every is set")
        self._validate_kind()
        if not self.student.init:
            raise Invalid("student.init", "student.init is empty: pass a T5 checkpoint (e.g. flan-t5-base) or a "
                                          "fastenc checkpoint")
        if self.run.loss == "vision" and not self.dit.path:
            raise Invalid("dit.path", "dit.path is empty: the vision loss needs a diffusers pipeline folder")
        if self.run.image_every and not self.dit.path:
            raise Invalid("run.image_every", "run.image_every is set but dit.path is empty: image grids sample "
                                             "through the DiT")
        if not self.run.output_dir:
            raise Invalid("run.output_dir", "run.output_dir is empty")
        for name, comp in self.data.components.items():
            key = f"data.components.{name}"
            if not comp.paths:
                raise Invalid(f"{key}.paths", f"{key}.paths is empty")
            _check_int(f"{key}.repeats", comp.repeats, 1, MAX_REPEATS)
            if comp.weight is not None:
                _check_float(f"{key}.weight", comp.weight, "[0, inf)")
        for i, stage in enumerate(self.data.stages):
            key = f"data.stages[{i}]"
            for comp in stage.components + list(stage.weights or {}):
                if comp not in self.data.components:
                    raise Invalid(f"{key}.components", f"{key} names unknown component {comp!r}; "
                                                       f"defined: {', '.join(self.data.components) or 'none'}")
            if stage.batches is not None:
                _check_int(f"{key}.batches", stage.batches, 1, MAX_STEPS)
            if stage.resolution is not None:
                _check_int(f"{key}.resolution", stage.resolution, 1, MAX_RESOLUTION)
            for comp, w in (stage.weights or {}).items():
                _check_float(f"{key}.weights.{comp}", w, "[0, inf)")
        for item in self.run.log_with:
            if item not in ("tensorboard",):
                raise Invalid("run.log_with", f"run.log_with: unknown tracker {item!r}; supported: tensorboard")

    def _validate_kind(self) -> None:
        """What depends on the DiT kind: its pooled input, frames (video kinds only) and the target."""
        d, kind = self.dit, self.kind
        if not kind.pooled and self.pooled != "none":
            raise Invalid("dit.pooled", f"dit.pooled={d.pooled!r}: {kind.label} has no pooled text input; use auto "
                                        "or none")
        if kind.pooled and self.pooled == "none":
            raise Invalid("dit.pooled", f"dit.pooled='none': {kind.label} needs a pooled CLIP input; choose clip (as "
                                        "the pipeline) or zeros (explicitly zero it)")
        if not kind.video:
            for key in ("num_frames", "vae_temporal_factor"):
                if getattr(d, key) is not None:
                    video = ", ".join(k.name for k in KINDS.values() if k.video)
                    raise Invalid(f"dit.{key}", f"dit.{key}={getattr(d, key)!r}: {kind.label} is an image model; "
                                                f"frames apply to the video kinds ({video})")
        elif (self.num_frames - 1) % self.vae_temporal_factor:
            frames, factor = self.num_frames, self.vae_temporal_factor
            key = "dit.vae_temporal_factor" if d.vae_temporal_factor is not None else "dit.num_frames"
            raise Invalid(key, f"dit.num_frames={frames}: {kind.label} needs 1 + a multiple of its VAE's temporal "
                               f"factor {factor} (dit.vae_temporal_factor; e.g. {(frames - 1) // factor * factor + 1} "
                               f"or {((frames - 1) // factor + 1) * factor + 1} frames)")
        _check_float("dit.frame_rate", d.frame_rate, "(0, inf)")
        if d.target is not None:
            from fastenc.targets import TARGETS

            if d.target not in TARGETS:
                raise Invalid("dit.target", f"dit.target={d.target!r}: choose one of {', '.join(TARGETS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config",
                  origins: dict[str, str] | None = None) -> "TrainConfig":
        """``origins``: dotted key -> the flag that set it (named in errors instead of ``source``)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a table/object at the top level, got {type(data).__name__}")
        return _build(cls, data, source, "", origins)


# ---------------------------------------------------------------------------- generic builder


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(tp: Any, value: Any, source: str, key: str, origins: dict[str, str] | None = None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:
            return _convert(real[0], value, source, key, origins)
        for arg in real:
            try:
                return _convert(arg, value, source, key, origins)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: {key} = {value!r} is not a {' or '.join(_type_name(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a table/object, got {type(value).__name__}")
        return _build(tp, value, source, key + ".", origins)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_convert(item, v, source, f"{key}[{i}]", origins) for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a table/object, got {value!r}")
        out = {}
        for k, v in value.items():
            sub = f"{key}.{k}"
            out[str(k)] = _convert(item, v, (origins or {}).get(sub, source), sub, origins)
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} = {value!r} is not a boolean")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} = {value!r} is not an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} = {value!r} is not a number")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{source}: {key} = {value!r} is not a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} = {value!r} is not a string")
        if "\0" in value:
            raise ConfigError(f"{source}: {key} = {value!r} holds a NUL character")
        return value
    raise ConfigError(f"{source}: {key}: unsupported type {tp}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], source: str, prefix: str, origins: dict[str, str] | None = None) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = (origins or {}).get(f"{prefix}{key}", source)
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'; known: {', '.join(sorted(names))}")
    kwargs = {k: _convert(hints[k], v, (origins or {}).get(f"{prefix}{k}", source), f"{prefix}{k}", origins)
              for k, v in data.items()}
    return cls(**kwargs)


# ---------------------------------------------------------------------------- files and overrides


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a .toml, .json or .yaml/.yml file into a dict (one ConfigError naming the file on failure)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None
    suffix = path.suffix.lower()
    fmt = CONFIG_FORMATS.get(suffix)
    if fmt is None:
        raise ConfigError(f"{path}: unknown config format {suffix!r}; use .toml, .json or .yaml")
    try:
        if fmt == "TOML":
            data = tomllib.loads(text)
        elif fmt == "JSON":
            data = json.loads(text)
        else:
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"{path}: YAML configs need PyYAML (pip install pyyaml); "
                                  "or write the config as TOML/JSON") from None
            data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{path}: not valid {fmt} (too deeply nested)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except ConfigError:
        raise
    except Exception as exc:  # yaml.YAMLError; ValueError for JSON integers past Python's digit limit
        raise ConfigError(f"{path}: not valid {fmt} ({type(exc).__name__}: {exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table/object at the top level, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """``--set`` values: JSON when they parse (numbers, true/false/null, lists), else the raw string."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ConfigError(f"--set value {text[:40]!r}...: too deeply nested") from None
    except ValueError:  # not JSON (or an integer past Python's digit limit): the raw string
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``section.key=value`` (or ``data.components.name.weight=2``) to a raw config dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set optim.lr=3e-5")
    key, text = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: malformed key {key!r}")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = parse_value(text)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    data = read_config_file(path) if path is not None else {}
    for assignment in overrides or []:
        apply_override(data, assignment)
    source = str(path) if path is not None else None
    return TrainConfig.from_dict(data, source=source or "flags").validate(source)
