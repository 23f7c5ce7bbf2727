"""Gemma 3's text decoder: the pieces in which it differs from a llama (model_files/gemma.py
lists them), over LlamaModel's weights and the ModelRunner's paged attention.

    model = build_model(config, weights)     # models.build_model: a GemmaModel where config.gemma

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

Every norm weight is 1 + w already (the loaders: model_files/gemma.py), kept in float32: `rms` norms in
float32 and casts the result to the compute dtype, as transformers' Gemma3RMSNorm. The native CPU kernels, the
flex backend and the CUDA graphs compute llama's layers: a Gemma model runs the eager layers with
gather + SDPA attention on every device (NativeDecoder.create, ModelRunner._choose_attention and
capture_graphs say so).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError
from .model import LlamaConfig, LlamaModel, Fallback, Layer, resolve_dtype, rope_table


class GemmaLayer(Layer):
    __slots__ = ("post_attn_norm", "post_ffw_norm", "window")


def _gelu_mul(gu: torch.Tensor) -> torch.Tensor:
    """GeGLU's gate: gu [T, 2I] -> gelu_tanh(gate) * up [T, I]."""
    g, u = gu.chunk(2, dim=-1)
    return F.gelu(g, approximate="tanh") * u


class GemmaModel(LlamaModel):
    computes_gemma = True

    def __init__(self, config: LlamaConfig, weights: dict, dtype: str | torch.dtype = "fp32",
                 device: str | torch.device = "cpu"):
        if resolve_dtype(dtype, device, config)[1] == torch.float16:
            raise InputError("dtype fp16 cannot run Gemma 3: its activations overflow float16 (transformers "
                             "says so too); use bf16 or fp32")
        super().__init__(config, weights, dtype, device)
        c, dt, dev = config, self.dtype, self.device

        def norm(name):     # 1 + w kept in float32, as transformers' Gemma3RMSNorm computes it (rms)
            return weights[name].to(device=dev, dtype=torch.float32).contiguous()

        self.norm = norm("norm")
        layers = []
        for i, ly in enumerate(self.layers):
            g = GemmaLayer()
            for name in Layer.__slots__:
                setattr(g, name, getattr(ly, name))
            p = f"layers.{i}."
            g.attn_norm, g.ffn_norm = norm(p + "attn_norm"), norm(p + "ffn_norm")
            if c.qk_norm:
                g.q_norm, g.k_norm = norm(p + "q_norm"), norm(p + "k_norm")
            g.post_attn_norm, g.post_ffw_norm = norm(p + "post_attn_norm"), norm(p + "post_ffw_norm")
            g.window = c.sliding_window if i in c.window_layers else 0
            layers.append(g)
        self.layers = layers
        self.windows = [ly.window for ly in layers]
        self.attn_scale = c.attn_scale or None
        # transformers: torch.tensor(sqrt(H)) (float32) cast to the weights' dtype
        self.embed_scale = torch.tensor(c.hidden_size ** 0.5, dtype=torch.float32).to(device=dev, dtype=dt)
        self.silu_mul = _gelu_mul                               # the MLP's gate piece (compiled as llama's)

    def build_rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [P, 2, hd] in the compute dtype: [:, 0] the full layers' rotary, [:, 1] the
        sliding layers' (LlamaModel.__init__ calls this in place of llama's one table)."""
        c = self.config
        cos, sin = (torch.empty(c.max_position, 2, c.head_dim, dtype=self.dtype) for _ in range(2))
        rope_table(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position, out=(cos[:, 0], sin[:, 0]))
        rope_table(c.head_dim, c.rope_local_theta, (), c.max_position, out=(cos[:, 1], sin[:, 1]))
        return cos.to(self.device), sin.to(self.device)

    def rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Gemma3RMSNorm: x normed and times w (1 + w, float32) in float32, then in x's dtype."""
        return self.rms_fn(x.float(), w, self.config.rms_eps).to(x.dtype)

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 2, hd]: the full layers' rotary, then the sliding layers'."""
        return self.cos[positions], self.sin[positions]

    def qkv(self, layer: GemmaLayer, x: torch.Tensor, cos, sin, lora=None):
        kind = 1 if layer.window else 0
        return super().qkv(layer, x, cos[:, kind:kind + 1], sin[:, kind:kind + 1], lora)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.embed) * self.embed_scale

    def attn_out(self, layer: GemmaLayer, a: torch.Tensor, lora=None) -> torch.Tensor:
        return self.rms(super().attn_out(layer, a, lora), layer.post_attn_norm)

    def mlp(self, layer: GemmaLayer, x: torch.Tensor, lora=None) -> torch.Tensor:
        return self.rms(super().mlp(layer, x, lora), layer.post_ffw_norm)   # [T, H]

    def enable_compile(self, force: bool = False) -> None:
        super().enable_compile(force)
        if isinstance(self.silu_mul, Fallback) and self.silu_mul.eager is not _gelu_mul:
            self.silu_mul = Fallback(_gelu_mul)            # the MLP's gate piece is GeGLU's here

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
