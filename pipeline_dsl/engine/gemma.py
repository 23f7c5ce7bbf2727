"""Gemma 3's text decoder: the pieces in which it differs from a llama (model_files/gemma.py
lists them), over LlamaModel's weights and the ModelRunner's paged attention.

    model = build_model(config, weights)     # model.build_model: a GemmaModel where config.gemma

What changes against LlamaModel:

    embed_tokens   the embeddings times sqrt(hidden_size), that number in the compute dtype first
                   (transformers' Gemma3TextScaledWordEmbedding); the tied head reads them unscaled
    rope_tables    [T, 2, hd]: [:, 0] the full layers' rotary (rope_theta, scaled as the config says),
                   [:, 1] the sliding layers' (rope_local_theta); qkv takes its layer's
    attn_out       RMSNorm(o(a)) with post_attn_norm, before the residual add
    mlp            RMSNorm(down(gelu_tanh(gate) * up)) with post_ffw_norm (input normed by ffn_norm,
                   Gemma's pre_feedforward_layernorm)
    attention      scaled by config.attn_scale; a sliding layer (`windows[li]` keys) masks the keys
                   `window` or more positions back (ModelRunner._attention, on every SDPA path)

Every norm weight is 1 + w already (the loaders: model_files/gemma.py). The native CPU kernels, the
flex backend and the CUDA graphs compute llama's layers: a Gemma model runs the eager layers with
gather + SDPA attention on every device (NativeDecoder.create, ModelRunner._choose_attention and
capture_graphs say so).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import LlamaConfig, LlamaModel, _Fallback, _Layer, rope_table


class GemmaLayer(_Layer):
    __slots__ = ("post_attn_norm", "post_ffw_norm", "window")


def _gelu_mul(gu: torch.Tensor) -> torch.Tensor:
    """GeGLU's gate: gu [T, 2I] -> gelu_tanh(gate) * up [T, I]."""
    g, u = gu.chunk(2, dim=-1)
    return F.gelu(g, approximate="tanh") * u


class GemmaModel(LlamaModel):
    computes_gemma = True

    def __init__(self, config: LlamaConfig, weights: dict, dtype: str | torch.dtype = "fp32",
                 device: str | torch.device = "cpu"):
        super().__init__(config, weights, dtype, device)
        c, dt, dev = config, self.dtype, self.device
        layers = []
        for i, ly in enumerate(self.layers):
            g = GemmaLayer()
            for name in _Layer.__slots__:
                setattr(g, name, getattr(ly, name))
            g.post_attn_norm = weights[f"layers.{i}.post_attn_norm"].to(device=dev, dtype=dt).contiguous()
            g.post_ffw_norm = weights[f"layers.{i}.post_ffw_norm"].to(device=dev, dtype=dt).contiguous()
            g.window = c.sliding_window if i in c.window_layers else 0
            layers.append(g)
        self.layers = layers
        self.windows = [ly.window for ly in layers]
        self.attn_scale = c.attn_scale or None
        # transformers: torch.tensor(sqrt(H)) (float32) cast to the weights' dtype
        self.embed_scale = torch.tensor(c.hidden_size ** 0.5, dtype=torch.float32).to(device=dev, dtype=dt)
        full = rope_table(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position)
        local = rope_table(c.head_dim, c.rope_local_theta, (), c.max_position)
        self.cos = torch.stack([full[0], local[0]], dim=1).to(device=dev, dtype=dt)   # [P, 2, hd]
        self.sin = torch.stack([full[1], local[1]], dim=1).to(device=dev, dtype=dt)
        self.silu_mul = _gelu_mul                               # the MLP's gate piece (compiled as llama's)

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 2, hd]: the full layers' rotary, then the sliding layers'."""
        return self.cos[positions], self.sin[positions]

    def qkv(self, layer: GemmaLayer, x: torch.Tensor, cos, sin):
        kind = 1 if layer.window else 0
        return super().qkv(layer, x, cos[:, kind:kind + 1], sin[:, kind:kind + 1])

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.embed) * self.embed_scale

    def attn_out(self, layer: GemmaLayer, a: torch.Tensor) -> torch.Tensor:
        return self.rms(layer.o(a), layer.post_attn_norm)

    def mlp(self, layer: GemmaLayer, x: torch.Tensor) -> torch.Tensor:
        gu = layer.gate_up(self.rms(x, layer.ffn_norm))        # [T, 2I]
        return self.rms(layer.down(self.silu_mul(gu)), layer.post_ffw_norm)   # [T, H]

    def enable_compile(self, force: bool = False) -> None:
        super().enable_compile(force)
        if isinstance(self.silu_mul, _Fallback) and self.silu_mul.eager is not _gelu_mul:
            self.silu_mul = _Fallback(_gelu_mul)            # the MLP's gate piece is GeGLU's here

    @torch.inference_mode()
    def forward_full(self, token_ids: list[int]) -> torch.Tensor:
        """Reference forward of one sequence without any cache: logits [T, V] float32."""
        c = self.config
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        T = ids.shape[0]
        pos = torch.arange(T, device=self.device)
        cos, sin = self.rope_tables(pos)
        causal = pos[None, :] <= pos[:, None]                   # [T, T]
        x = self.embed_tokens(ids)                              # [T, H]
        for layer in self.layers:
            q, k, v = self.qkv(layer, x, cos, sin)
            mask = causal & (pos[None, :] > pos[:, None] - layer.window) if layer.window else causal
            q = q.transpose(0, 1)                               # [nh, T, hd]
            k = k.transpose(0, 1).repeat_interleave(c.group, dim=0)  # [nh, T, hd]
            v = v.transpose(0, 1).repeat_interleave(c.group, dim=0)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.attn_scale)  # [nh, T, hd]
            x = x + self.attn_out(layer, a.transpose(0, 1).reshape(T, -1))
            x = x + self.mlp(layer, x)
        return self.logits(x)
