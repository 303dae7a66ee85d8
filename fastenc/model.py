"""The one model definition: a T5 encoder stack plus the MLP projector.

Every backend either runs this module (swapping the op table in ``fastenc.ops``) or
consumes a graph exported from it.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import EncoderConfig
from .errors import ConfigError
from .ops import TORCH_OPS, TorchOps


def _embedding(num: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(num, dim)`` initialised as torch does, except on the meta device: there torch's
    ``normal_`` costs seconds on its first use in a process, and the checkpoint fills the values anyway."""
    weight = torch.empty(num, dim)  # [num, dim]
    emb = nn.Embedding(num, dim, _weight=weight)
    if weight.device.type != "meta":
        emb.reset_parameters()
    return emb


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class Attention(nn.Module):
    """Self-attention with a fused QKV projection ``qkv.weight = cat([q, k, v])``."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.inner_dim, bias=False)
        self.o = nn.Linear(cfg.inner_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, bias, ops: TorchOps) -> torch.Tensor:
        B, L, _ = x.shape  # x: [B, L, D]
        qkv = ops.linear(x, self.qkv.weight)  # [B, L, 3*H*dk]
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.d_kv).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, dk]
        out = ops.attention(q, k, v, bias)  # [B, H, L, dk]
        out = out.transpose(1, 2).reshape(B, L, self.num_heads * self.d_kv)
        return ops.linear(out, self.o.weight)  # [B, L, D]


class FeedForward(nn.Module):
    """Gated (``wi = cat([wi_0, wi_1])``) or plain FFN. ``wo`` may be kept in fp32 for fp16 runs."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.gated, self.act = cfg.gated, cfg.activation
        self.wi = nn.Linear(cfg.d_model, (2 if cfg.gated else 1) * cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, ops: TorchOps) -> torch.Tensor:
        out_dtype = self.wo.weight.dtype  # fp32 when kept out of fp16 (overflow guard)
        if self.gated:
            h = ops.gated_act_linear(x, self.wi.weight, self.act, out_dtype)  # [B, L, F]
        else:
            h = ops.act_linear(x, self.wi.weight, None, self.act, out_dtype)
        return ops.linear(h.to(out_dtype), self.wo.weight)  # [B, L, D]


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.ffn = FeedForward(cfg)
        # umT5 (cfg.per_layer_bias): this layer's own relative-attention-bias table; T5 shares the encoder's.
        self.rel_bias = _embedding(cfg.num_buckets, cfg.num_heads) if cfg.per_layer_bias else None

    def forward(self, x, normed, bias, next_norm: RMSNorm, ops: TorchOps):
        """x: residual stream [B, L, D]; normed: attn_norm(x). Returns (x', next_norm(x'))."""
        a = self.attn(normed, bias, ops)
        x, normed = ops.add_rms_norm(x, a, self.ffn_norm.weight, self.ffn_norm.eps)
        f = self.ffn(normed, ops)
        return ops.add_rms_norm(x, f, next_norm.weight, next_norm.eps)


class Projector(nn.Module):
    """Linear(d -> P) -> ReLU -> Dropout -> Linear(P -> P)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        assert cfg.projection_dim is not None
        self.fc1 = nn.Linear(cfg.d_model, cfg.projection_dim, bias=cfg.projector_bias)
        self.dropout = nn.Dropout(cfg.projector_dropout)
        self.fc2 = nn.Linear(cfg.projection_dim, cfg.projection_dim, bias=cfg.projector_bias)

    def forward(self, x: torch.Tensor, ops: TorchOps) -> torch.Tensor:
        h = ops.act_linear(x, self.fc1.weight, self.fc1.bias, "relu", x.dtype)  # [B, L, P]
        return ops.linear(self.dropout(h), self.fc2.weight, self.fc2.bias)  # [B, L, P]


class T5Encoder(nn.Module):
    """Token ids [B, L] -> embeddings [B, L, output_dim] (projected for students, hidden states for xxl)."""

    def __init__(self, cfg: EncoderConfig, ops: TorchOps = TORCH_OPS):
        if not isinstance(cfg, EncoderConfig):
            raise ConfigError(f"T5Encoder takes an EncoderConfig (e.g. fastenc.SIZES['base']), got {type(cfg).__name__}")
        super().__init__()
        self.config = cfg
        self.ops = ops
        self.embed = _embedding(cfg.vocab_size, cfg.d_model)
        # T5: one relative-attention-bias table shared by every layer; umT5: each Block holds its own.
        self.rel_bias = None if cfg.per_layer_bias else _embedding(cfg.num_buckets, cfg.num_heads)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.projector = Projector(cfg) if cfg.projection_dim else None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    #: Bumped before and after every ``_apply`` of this model (``.to`` / ``.cuda`` / ``.half`` / :meth:`cast`,
    #: and a move of any module holding it): the CUDA graph runner's O(1) sign that the weights may have moved.
    weights_moves: int = 0

    def _apply(self, fn, recurse: bool = True):
        d = self.__dict__
        d["weights_moves"] = d.get("weights_moves", 0) + 1
        try:
            return super()._apply(fn, recurse)
        finally:
            d["weights_moves"] += 1

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm output of the T5 stack: [B, L, D]."""
        ops, cfg = self.ops, self.config
        dtype = self.compute_dtype
        x = self.embed(input_ids)  # [B, L, D]
        if dtype == torch.float16:
            x = x.float()  # fp16 runs keep the residual stream in fp32 (no overflow past 65504)
        L = input_ids.shape[1]

        def position_bias(table: torch.Tensor):  # [B|1, H, L, L] (or the op table's own form)
            return ops.position_bias(table, L, attention_mask, cfg.num_buckets, cfg.max_distance, dtype)

        bias = position_bias(self.rel_bias.weight) if self.rel_bias is not None else None
        first = self.blocks[0].attn_norm if len(self.blocks) else self.final_norm
        normed = ops.rms_norm(x, first.weight, first.eps)
        for i, block in enumerate(self.blocks):
            nxt = self.blocks[i + 1].attn_norm if i + 1 < len(self.blocks) else self.final_norm
            layer_bias = bias if block.rel_bias is None else position_bias(block.rel_bias.weight)
            x, normed = block(x, normed, layer_bias, nxt, ops)
        return normed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden_states(input_ids, attention_mask)  # [B, L, D]
        if self.projector is None:
            return h
        return self.projector(h, self.ops)  # [B, L, P]

    def cast(self, dtype: torch.dtype) -> "T5Encoder":
        """Cast parameters; in fp16 the FFN output projections stay fp32 (T5 overflows fp16 there), cast
        straight from their current dtype (never rounded through fp16 on the way)."""
        if dtype != torch.float16:
            return self.to(dtype)
        kept = {id(block.ffn.wo) for block in self.blocks}
        for module in self.modules():
            target = torch.float32 if id(module) in kept else dtype
            module._apply(lambda t, target=target: t.to(target) if t.is_floating_point() else t, recurse=False)
        return self
