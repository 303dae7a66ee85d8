"""Cross-attention maps of a Flux pipeline (paper Fig. 7), with the teacher and with fastenc students.

Flux attends over one sequence ``[text (T tokens), image (S tokens)]``: each joint block concatenates the
two streams, each single block runs on the already concatenated sequence. At the chosen denoising step
(default the 10th) the selected blocks' attention layers get :class:`ProbabilityProcessor` through
``transformer.set_attn_processor``: it computes the same attention as diffusers' ``FluxAttnProcessor``
but forms ``softmax(Q K^T / sqrt(d))`` explicitly and keeps, averaged over heads,

* ``text-to-image`` (default, the paper's upper-right block): the text-query rows ``P[:, :, :T, :]``
  — full rows over all ``T + S`` keys, so each sums to 1; a token's map is its row's image part;
* ``image-to-text``: the image-query rows' text columns ``P[:, :, T:, :T]``; a token's map is its column.

At every other step (and in unselected blocks) the pipeline's own processor runs unchanged. A token's map
is averaged over the selected blocks (and over a word's sentencepiece pieces), reshaped to the packed
latent grid (latent / 2: Flux packs 2x2 latent patches into one token), upsampled to the image and laid
over it. Processors are restored on exit.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastenc.errors import ConfigError

from ..images import write_labelled_grid
from .encoders import slug
from .defaults import DIRECTIONS
from .pipelines import EncoderSwitch, GenerationSettings, generate
from .report import write_json, write_npz, write_png

log = logging.getLogger("fastenc.train")

PROCESSOR_SUFFIX = ".attn.processor"


# ------------------------------------------------------------------------------ capture


class AttentionRecorder:
    """Counts denoising steps (a new ``timestep`` value at a transformer call starts a step; a second call
    with the same value, as true CFG makes, belongs to the same one) and keeps the maps of ``step``."""

    def __init__(self, step: int, direction: str = "text-to-image"):
        if direction not in DIRECTIONS:
            raise ConfigError(f"direction {direction!r}: choose one of {', '.join(DIRECTIONS)}")
        self.step = int(step)  # 1-based
        self.direction = direction
        self.current = 0  # 1-based index of the step being run; 0 before the first call
        self.text_len: int | None = None
        self.image_len: int | None = None
        self.rows: dict[str, torch.Tensor] = {}  # block -> [B, T, T+S] or [B, S, T], float32 on the CPU
        self._last_t: float | None = None

    @property
    def active(self) -> bool:
        return self.current == self.step

    def on_transformer_call(self, module, args, kwargs) -> None:
        t = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        image = kwargs.get("hidden_states", args[0] if args else None)
        if t is None or text is None or image is None:
            raise ConfigError("attention capture: the transformer was called without timestep / hidden states")
        value = float(t.reshape(-1)[0])
        if value != self._last_t:
            self.current += 1
            self._last_t = value
        self.text_len, self.image_len = int(text.shape[1]), int(image.shape[1])

    def keep(self, block: str, probs: torch.Tensor) -> None:
        self.rows[block] = probs.detach().float().cpu()

    def maps(self, grid: tuple[int, int]) -> "AttentionMaps":
        if not self.rows:
            ran = f"only {self.current} step(s) ran" if self.current < self.step else "no selected block ran"
            raise ConfigError(f"attention capture: nothing recorded at step {self.step} ({ran})")
        gh, gw = grid
        if self.image_len != gh * gw:
            raise ConfigError(f"attention capture: {self.image_len} image tokens do not fill the {gh}x{gw} "
                              "packed latent grid")
        return AttentionMaps(self.step, self.direction, int(self.text_len), (gh, gw), dict(self.rows))


def _split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))  # [B, N, H*D] -> [B, N, H, D]


class ProbabilityProcessor:
    """Flux attention processor that, at the recorder's step, computes the attention probabilities
    explicitly (fp32, ``head_chunk`` heads at a time) and hands them to the recorder; otherwise it defers
    to the processor it replaced."""

    def __init__(self, recorder: AttentionRecorder, block: str, inner, head_chunk: int = 1):
        self.recorder = recorder
        self.block = block
        self.inner = inner
        self.head_chunk = max(1, int(head_chunk))

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None) -> torch.Tensor:
        if not self.recorder.active or self.block in self.recorder.rows:  # other steps; CFG's second call
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb

        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k, v = (_split_heads(x, attn.head_dim) for x in (q, k, v))  # [B, N_img, H, D] (joint) or [B, N, H, D]
        q, k = attn.norm_q(q), attn.norm_k(k)
        if joint:
            if getattr(attn, "fused_projections", False):
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                e = encoder_hidden_states
                eq, ek, ev = attn.add_q_proj(e), attn.add_k_proj(e), attn.add_v_proj(e)
            eq, ek, ev = (_split_heads(x, attn.head_dim) for x in (eq, ek, ev))  # [B, T, H, D]
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)  # [B, T+S, H, D]
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)

        text_len = encoder_hidden_states.shape[1] if joint else self.recorder.text_len
        out = self._attend(q, k, v, attention_mask, int(text_len))  # [B, N, H, D]
        out = out.flatten(2, 3).to(q.dtype)  # [B, N, H*D]
        if encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
            text, image = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)  # [B, T, C], [B, S, C]
            image = attn.to_out[1](attn.to_out[0](image.contiguous()))
            text = attn.to_add_out(text.contiguous())
            return image, text
        return out

    def _attend(self, q, k, v, mask, text_len: int) -> torch.Tensor:
        """q, k, v [B, N, H, D] -> [B, N, H, D]; records the head-averaged probability block."""
        B, N, H, D = q.shape
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, N, D]
        out = torch.empty(B, H, N, D, dtype=torch.float32, device=q.device)
        if self.recorder.direction == "text-to-image":
            kept = torch.zeros(B, text_len, N, dtype=torch.float32, device=q.device)  # text-query rows
        else:
            kept = torch.zeros(B, N - text_len, text_len, dtype=torch.float32, device=q.device)
        scale = D ** -0.5
        for h in range(0, H, self.head_chunk):
            sl = slice(h, min(H, h + self.head_chunk))
            scores = (q[:, sl].float() @ k[:, sl].float().transpose(-1, -2)) * scale  # [B, h, N, N]
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            probs = scores.softmax(dim=-1)
            out[:, sl] = probs @ v[:, sl].float()
            if self.recorder.direction == "text-to-image":
                kept += probs[:, :, :text_len, :].sum(1)
            else:
                kept += probs[:, :, text_len:, :text_len].sum(1)
            del scores, probs
        self.recorder.keep(self.block, kept / H)
        return out.transpose(1, 2)  # [B, N, H, D]


def block_names(transformer) -> list[str]:
    return [name.removesuffix(PROCESSOR_SUFFIX) for name in transformer.attn_processors]


def select_blocks(names: list[str], spec: str | list[str] = "all") -> list[str]:
    """``all``, ``double`` (joint blocks), ``single``, or comma-separated block names / glob patterns
    (``transformer_blocks.0,single_transformer_blocks.1*``)."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    picked: list[str] = []
    for item in items or ["all"]:
        if item == "all":
            hits = names
        elif item == "double":
            hits = [n for n in names if n.startswith("transformer_blocks.")]
        elif item == "single":
            hits = [n for n in names if n.startswith("single_transformer_blocks.")]
        else:
            hits = [n for n in names if fnmatch.fnmatchcase(n, item)]
        if not hits:
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise ConfigError(f"--blocks {item!r} matches no attention block (blocks: {shown}; or all, double, single)")
        picked += [n for n in hits if n not in picked]
    return [n for n in names if n in picked]


@contextmanager
def capture_attention(transformer, *, step: int, blocks: str | list[str] = "all", direction: str = "text-to-image",
                      head_chunk: int = 1):
    """Within the block, the selected attention layers of a Flux transformer record step ``step`` (1-based)
    of the next pipeline call; yields the :class:`AttentionRecorder`."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    if not type(transformer).__name__.startswith("Flux"):
        raise ConfigError(f"attention maps need a Flux transformer, got {type(transformer).__name__}")
    if step < 1:
        raise ConfigError(f"--step {step}: steps count from 1")
    originals = dict(transformer.attn_processors)  # "<block>.attn.processor" -> processor
    names = [n.removesuffix(PROCESSOR_SUFFIX) for n in originals]
    chosen = set(select_blocks(names, blocks))
    recorder = AttentionRecorder(step, direction)
    swapped = {}
    for key, proc in originals.items():
        block = key.removesuffix(PROCESSOR_SUFFIX)
        if block in chosen:
            if type(proc) is not FluxAttnProcessor:
                raise ConfigError(f"{block}: attention processor is {type(proc).__name__}; maps are taken only "
                                  "with diffusers' FluxAttnProcessor (unload IP adapters first)")
            proc = ProbabilityProcessor(recorder, block, proc, head_chunk)
        swapped[key] = proc
    transformer.set_attn_processor(swapped)
    handle = transformer.register_forward_pre_hook(recorder.on_transformer_call, with_kwargs=True)
    try:
        yield recorder
    finally:
        handle.remove()
        transformer.set_attn_processor(dict(originals))


# ------------------------------------------------------------------------------ maps


@dataclass
class AttentionMaps:
    step: int
    direction: str
    text_len: int
    grid: tuple[int, int]  # packed latent grid (latent_h / 2, latent_w / 2)
    rows: dict[str, torch.Tensor] = field(repr=False)  # block -> [B, T, T+S] or [B, S, T]

    @property
    def blocks(self) -> list[str]:
        return list(self.rows)

    def token_map(self, positions: list[int], blocks: list[str] | None = None) -> torch.Tensor:
        """[B, gh, gw]: attention between the text tokens at ``positions`` and each image token, averaged
        over those tokens and the blocks."""
        T = self.text_len
        per_block = []
        for name in blocks or self.blocks:
            r = self.rows[name]
            if self.direction == "text-to-image":
                per_block.append(r[:, positions, T:].mean(1))  # [B, S]
            else:
                per_block.append(r[:, :, positions].mean(-1))  # [B, S]
        m = torch.stack(per_block).mean(0)  # [B, S]
        return m.reshape(m.shape[0], *self.grid)


@dataclass
class Token:
    label: str
    positions: list[int]


def _norm_word(text: str) -> str:
    return re.sub(r"[^\w]+", "", text.lower())


def prompt_tokens(tokenizer, prompt: str, max_length: int) -> list[Token]:
    """The prompt's words as the pipeline's T5 tokenizer splits them (special tokens and padding left out);
    a word is the group of sentencepiece pieces it became (each piece alone when word ids are unknown)."""
    enc = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True)
    ids = list(enc["input_ids"])
    try:
        words = enc.word_ids()
    except (AttributeError, ValueError):  # slow tokenizers keep no word ids
        words = list(range(len(ids)))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    groups: dict[int, list[int]] = {}
    for pos, (tid, w) in enumerate(zip(ids, words)):
        if w is None or tid in special:
            continue
        groups.setdefault(w, []).append(pos)
    tokens = []
    for positions in groups.values():
        label = tokenizer.decode([ids[p] for p in positions], skip_special_tokens=True).strip()
        tokens.append(Token(label or tokenizer.convert_ids_to_tokens(ids[positions[0]]), positions))
    return tokens


def choose_tokens(tokens: list[Token], wanted: list[str] | None) -> list[Token]:
    if not wanted:
        return tokens
    out = []
    for w in wanted:
        hits = [t for t in tokens if _norm_word(t.label) == _norm_word(w) or t.label == w]
        if not hits:
            raise ConfigError(f"--token {w!r} is not a word of the prompt (words: "
                              f"{', '.join(repr(t.label) for t in tokens)})")
        out += [t for t in hits if t not in out]
    return out


def overlay(image: np.ndarray, heat: torch.Tensor, *, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """image [H, W, 3] uint8, heat [gh, gw] -> [H, W, 3] uint8: the map upsampled (bilinear) to the
    image, scaled to [0, 1] and coloured, blended with weight ``alpha``."""
    import matplotlib

    H, W = image.shape[:2]
    up = F.interpolate(heat.float()[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]  # [H, W]
    lo, hi = up.min(), up.max()
    up = (up - lo) / (hi - lo).clamp(min=1e-12)
    colours = matplotlib.colormaps[cmap](up.numpy())[..., :3]  # [H, W, 3] in [0, 1]
    mixed = (1 - alpha) * image.astype(np.float32) / 255 + alpha * colours
    return (mixed.clip(0, 1) * 255).round().astype(np.uint8)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a @ b) / denom) if denom > 0 else float("nan")


# ------------------------------------------------------------------------------ analysis


def check_step(step: int, steps: int) -> None:
    if not 1 <= step <= steps:
        raise ConfigError(f"--step {step} must be within the {steps} inference steps (1..{steps})")


def latent_grid(pipe, height: int, width: int) -> tuple[int, int]:
    """Packed latent grid of a Flux pipeline: (H / (vae_scale * 2), W / (vae_scale * 2))."""
    f = int(pipe.vae_scale_factor) * 2
    return height // f, width // f


def run(switch: EncoderSwitch, prompts: list[str], out: Path, settings: GenerationSettings, *, step: int = 10,
        tokens: list[str] | None = None, blocks: str = "all", direction: str = "text-to-image", alpha: float = 0.5,
        head_chunk: int = 1) -> dict:
    """Writes, per prompt, ``<NN>-<prompt>/<encoder>/image.png``, one ``<NN>-<word>.png`` overlay per token,
    ``maps.npz`` (raw grid maps) and ``<NN>-<prompt>/grid.png`` (encoders x tokens); ``attention.json``."""
    pipe = switch.pipe
    if not prompts:
        raise ConfigError("attention: no prompts (give --prompt)")
    check_step(step, settings.steps)
    tokenizer = getattr(pipe, switch.tok_slot, None)
    if tokenizer is None:
        raise ConfigError(f"{type(pipe).__name__}.{switch.tok_slot} is missing: the T5 tokenizer names the tokens")
    height, width = settings.resolved_size(pipe)
    grid = latent_grid(pipe, height, width)
    max_len = settings.max_sequence_length or 512
    labels = switch.labels
    entries = []
    try:
        for pi, prompt in enumerate(prompts):
            toks = choose_tokens(prompt_tokens(tokenizer, prompt, max_len), tokens)
            if not toks:
                raise ConfigError(f"prompt {prompt!r} has no words to map")
            folder = Path(f"{pi:02d}-{slug(prompt)}")
            rows, per_encoder, reference = [], {}, None
            for label in labels:
                p = switch.use(label)
                with capture_attention(p.transformer, step=step, blocks=blocks, direction=direction,
                                       head_chunk=head_chunk) as rec:
                    image = generate(p, prompt, settings)  # [H, W, 3] uint8
                maps = rec.maps(grid)
                sub = folder / slug(label)
                write_png(out / sub / "image.png", image)
                grids = torch.stack([maps.token_map(t.positions)[0] for t in toks])  # [K, gh, gw]
                tiles = [image]
                token_rows = []
                for ti, (tok, m) in enumerate(zip(toks, grids)):
                    pic = overlay(image, m, alpha=alpha)
                    rel = sub / f"{ti:02d}-{slug(tok.label)}.png"
                    write_png(out / rel, pic)
                    tiles.append(pic)
                    row = {"token": tok.label, "positions": tok.positions, "file": rel.as_posix(),
                           "mass": float(m.sum()), "peak": list(np.unravel_index(int(m.argmax()), m.shape))}
                    row["peak"] = [int(x) for x in row["peak"]]
                    if reference is not None:
                        row["correlation_with_reference"] = _pearson(m, reference[ti])
                    token_rows.append(row)
                reference = grids if reference is None else reference
                write_npz(out / sub / "maps.npz", maps=grids.numpy(), tokens=np.array([t.label for t in toks]))
                rows.append(np.stack(tiles))
                per_encoder[label] = {"image": (sub / "image.png").as_posix(), "maps": (sub / "maps.npz").as_posix(),
                                      "tokens": token_rows}
                log.info("attention: %r with %s: %d token map(s) from %d block(s) at step %d", prompt, label,
                         len(toks), len(maps.blocks), step)
            write_labelled_grid(out / folder / "grid.png", rows, row_labels=labels,
                                col_labels=["image"] + [t.label for t in toks])
            entries.append({"prompt": prompt, "grid": (folder / "grid.png").as_posix(), "encoders": per_encoder})
    finally:
        switch.restore()
    result = {"analysis": "attention", "step": step, "direction": direction, "blocks": blocks, "reference": labels[0],
              "latent_grid": list(grid), "height": height, "width": width, "encoders": labels,
              "settings": settings.to_dict(), "prompts": entries}
    write_json(out / "attention.json", result)
    return result
