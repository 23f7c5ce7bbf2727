"""Llama-family decoder in plain PyTorch, and the ModelRunner over the paged KV pool.

`LlamaModel` holds the weights (QKV and gate/up fused, bf16 prepacked for oneDNN on CPU,
or int8 weight-only; a GGUF's own Q4_0/Q4_1 blocks run as int4 for small batches, see
quant.Int4Linear) and knows the per-layer math: RMSNorm, RoPE ("rotate half"),
grouped-query attention, SwiGLU, tied embeddings; Qwen2's Q/K/V biases and Qwen3's RMSNorm
over each head of Q and K before RoPE; Phi-3's partial rotary and longrope live in the cos/sin
tables (frequency 0 for the dims that pass, the attention factor on both: model_files/phi3.py);
Gemma 3's decoder is a subclass (gemma.py: models.build_model picks it; the attention here computes its
sliding windows and query scale). `ModelRunner` owns the KV pool and runs one engine step (see
docs/architecture.md, "Model runner contract"):

    runner = ModelRunner(model, num_blocks, block_size, dtype, device)
    logits = runner.execute(items)      # [n_sample, vocab] float32, rows in item order
    step = runner.prepare(batch)        # or in two phases (an executor that overlaps them):
    logits = runner.run(step)           # batch.StepBatch: the step's arrays

All linear layers run on the flat [T, hidden] tokens of every item (no padding). Attention
has two backends (`attention=`). "flex" (the default on CUDA, flex.py): every row of the step
— decodes, prefill chunks, cached prefixes — in one FlexAttention call that reads the KV pool
in place through a block mask built from the block tables. "sdpa" (CPU, and CUDA where flex
cannot serve): single-token (decode) items attend in one batched SDPA over their gathered
contexts [B, Lmax] with a padding mask; prefill chunks read their keys back from the pool and
attend per sequence. The index tensors are built once per step and reused by every layer. A
decode sequence alone (the memory-bound case) skips the mask, and the gather too when its
blocks are consecutive in the pool.

With the native kernels (pipeline_dsl.engine.native, CPU) an all-decode step of up to
`native_max_batch` sequences runs as ONE native call (the whole forward in one parallel
region: int4/int8 GEMVs, attention reading the paged blocks in place, no gather, no mask,
no padding), and a larger one keeps its GEMMs on oneDNN with one native call for each
piece between them (add+RMSNorm, RoPE+KV write+attention, SwiGLU). Both round to bf16
where the eager path does, so greedy tokens agree with it (tests/test_fast_paths.py).
"""

from __future__ import annotations

import contextlib
import math
import mmap
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline_dsl.model_files.rope import rope_base, rope_inv_freq, rope_magnitudes

from . import native
from .batch import Step, StepBatch, Uploader, prepare_step
from .compute import CPU_CONTENTION, ContentionGuard
from .native.step import NativeDecoder
from .quant import (Int4Blocks, Q8Linear, emulated_half, int4_kernel_works, linear_runs, make_linear,
                    runs_half_gemm)


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_position: int = 2048          # the model's context length
    tie_embeddings: bool = True       # lm_head shares the embedding matrix
    rope_scaling: tuple = ()          # (key, value) pairs of model_files.rope; () = plain RoPE
    qkv_bias: bool = False            # biases on the Q, K, V projections (Qwen2; a llama's attention_bias)
    o_bias: bool = False              # a bias on the attention's output projection (a llama's attention_bias)
    qk_norm: bool = False             # an RMSNorm over each head of Q and of K before RoPE (Qwen3)
    fused: bool = False               # the file holds q/k/v and gate/up fused (Phi-3; engine/phi3.py splits them)
    # Gemma 3 (gemma.py, model_files/gemma.py): scaled embeddings, GeGLU, norms of the attention's and the
    # MLP's outputs; the layers in window_layers attend to the last sliding_window keys and rotate with
    # rope_local_theta; attention scaled by attn_scale (0: head_dim ** -0.5)
    gemma: bool = False
    sliding_window: int = 0
    window_layers: tuple = ()
    rope_local_theta: float = 10000.0
    attn_scale: float = 0.0
    # the dtype the checkpoint states (an HF folder's config.json torch_dtype, else its weights' own):
    # "float16" | "bfloat16" | "float32"; "" where the file states none (a GGUF). dtype = auto on
    # CUDA follows it (auto_dtype)
    checkpoint_dtype: str = ""

    @property
    def group(self) -> int:           # query heads per KV head
        return self.num_heads // self.num_kv_heads


@dataclass
class SeqBatchItem:
    token_ids: list[int]      # tokens fed this step: a prefill chunk or 1 decode token
    start_pos: int            # tokens of this sequence already in the KV cache
    block_table: list[int]    # physical blocks covering [0, start_pos + len(token_ids))
    sample: bool              # logits wanted for the last token
    rows: tuple[str, ...] = ()   # "logits" / "hidden" of every row wanted (prompt_outputs.py)
    lora: str | None = None      # the LoRA adapter of the sequence (ModelRunner.loras), None: the base model


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def auto_dtype(device_type: str, bf16: bool, checkpoint: str = "", gemma: bool = False) -> tuple[torch.dtype, str]:
    """What `dtype = auto` computes in, and why in words (the serve banner's): on CUDA vLLM's
    rule (its _resolve_auto_dtype): the checkpoint's dtype (`checkpoint`: LlamaConfig's
    checkpoint_dtype), a float32 one (or one that states none) downcast to the first the GPU
    supports of bf16 (`bf16`: it has it), fp16 (never for Gemma 3, whose activations overflow
    it), fp32, and a checkpoint dtype the GPU lacks replaced by that same one. On a CPU agp's
    measured choice (docs/engine_benchmarks.md): bf16 where it is in hardware (`bf16`: AMX or
    AVX512-BF16), else fp32, whatever the checkpoint's, as float16 GEMMs and emulated bf16 ones
    run slower there than fp32."""
    stated = DTYPES.get(checkpoint)
    if device_type != "cuda":
        best = torch.bfloat16 if bf16 else torch.float32
        why = "bf16 in hardware on this CPU" if bf16 else "this CPU has no bf16 in hardware (no AMX, no AVX512-BF16)"
        if stated is not None and stated != best:
            why += f"; the checkpoint's {checkpoint} is followed on CUDA only"
        return best, why
    supported = [d for d in (torch.bfloat16 if bf16 else None, None if gemma else torch.float16, torch.float32)
                 if d is not None]
    preferred = supported[0]
    if stated is None:
        return preferred, f"the checkpoint states no dtype: {_NAMES[preferred]}, the first this GPU supports"
    if stated == torch.float32:
        return preferred, f"the checkpoint's float32 downcast to {_NAMES[preferred]}, as vLLM does"
    if stated in supported:
        return stated, f"the checkpoint's {checkpoint}"
    lacks = "Gemma 3 overflows float16" if gemma and stated == torch.float16 else f"this GPU has no {checkpoint}"
    return preferred, f"the checkpoint's {checkpoint}, but {lacks}: {_NAMES[preferred]}"


def has_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 in hardware: a GPU's, or a CPU's AMX / AVX512-BF16."""
    if device.type == "cuda":
        with torch.cuda.device(device):          # that device's, not the current one's (cuda:N)
            return torch.cuda.is_bf16_supported()
    return native.fast_bf16()


def resolve_dtype(name: str | torch.dtype, device: str | torch.device = "cpu",
                  config: "LlamaConfig | None" = None) -> tuple[str, torch.dtype, str | None]:
    """'auto'|'fp32'|'bf16'|'fp16'|'int8' -> (weight kind 'dense'|'int8', compute dtype, why auto
    chose it: None for another name); auto as auto_dtype chooses for `config`'s checkpoint dtype
    and model (None: one that states none)."""
    if isinstance(name, torch.dtype):
        return "dense", name, None
    device = torch.device(device)
    fast_bf16 = has_bf16(device)
    if name == "auto":
        return ("dense", *auto_dtype(device.type, fast_bf16, config.checkpoint_dtype if config else "",
                                     bool(config and config.gemma)))
    if name == "int8":
        return "int8", torch.bfloat16 if fast_bf16 else torch.float32, None
    if name in DTYPES:
        return "dense", DTYPES[name], None
    raise ValueError(f"unknown dtype {name!r}: expected auto, fp32, bf16, fp16 or int8")


LINEAR_WEIGHTS = ("q", "k", "v", "o", "gate", "up", "down")


def int4_runs_natively(weights, config: LlamaConfig, device: torch.device) -> bool:
    """Whether every linear of a CPU model is the file's own 4-bit blocks and agp's native int8
    kernels can run them (native.int8_dot_products(): AVX512-VNNI, or AVX2 without AVX-512).
    Then `dtype = auto` takes bf16 even where bf16 is not in hardware: those kernels compute in
    int8 and steps of every row count go through them (bf16 is the storage of the KV pool and
    the glue), against dense fp32 GEMMs reading 8x the bytes; on the embedded model here one
    request alone decodes ~4x faster and W32 ~1.6x (AVX-512; docs/engine_benchmarks.md has the
    AVX2 figures)."""
    int4 = getattr(weights, "int4", {})
    return (device.type == "cpu" and not config.gemma and native.int8_activations() and native.load() is not None
            and all(f"layers.{i}.{n}" in int4 for i in range(config.num_layers) for n in LINEAR_WEIGHTS)
            and int4_kernel_works())


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, hd] rotated by position: x*cos + rotate_half(x)*sin, where
    rotate_half(x) = [-x2, x1]; `sin` comes with its first half negated ([-s, s]), so the
    halves only swap places (one flip: fewer ops than slicing, negating and concatenating).
    Same roundings as the textbook form (no addcmul): greedy bf16 output does not move."""
    *lead, hd = x.shape
    swapped = x.view(*lead, 2, hd // 2).flip(-2).view(*lead, hd)   # [x2, x1]
    return x * cos + swapped * sin


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in dtype, without a call into torch when it already is (the hot loop's common case)."""
    return x if x.dtype == dtype else x.to(dtype)


def _silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: gu [T, 2I] -> silu(gate) * up [T, I]."""
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


class Fallback:
    """A torch.compile'd function that turns back into the eager one if compiling fails: said
    once at WARNING (logger agp.model) with the reason, and kept in `failed` (the engine's stats
    show it as `compile_fallbacks`)."""

    def __init__(self, fn):
        self.eager, self.fn = fn, torch.compile(fn, dynamic=True)
        self.failed: str | None = None

    def __call__(self, *args):
        if self.failed is not None:
            return self.eager(*args)
        try:
            return self.fn(*args)
        except Exception as e:  # noqa: BLE001 - compilation is an optimisation, never a failure
            import logging

            self.failed = f"{self.eager.__name__}: {type(e).__name__}: {str(e)[:200]}"
            logging.getLogger("agp.model").warning("torch.compile failed (%s); running it eagerly from now on",
                                                   self.failed)
            return self.eager(*args)


class Layer:
    __slots__ = ("attn_norm", "qkv", "qkv_bias", "q_norm", "k_norm", "o", "o_bias", "ffn_norm", "gate_up", "down")


def rope_table(head_dim: int, theta: float, scaling: tuple, max_position: int,
               dtype: torch.dtype = torch.float64, out: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables cos, sin [max_position, head_dim] in `dtype` ("rotate half": halves share a
    frequency; sin's first half negated, see _rope), computed in float64 a block of positions at a
    time: no float64 [max_position, head_dim] temporaries. out: two [max_position, head_dim]
    tensors (views too) to fill instead."""
    half = head_dim // 2
    inv_freq = torch.tensor(rope_inv_freq(head_dim, theta, scaling), dtype=torch.float64)   # [hd/2]
    mag = torch.tensor(rope_magnitudes(head_dim, scaling), dtype=torch.float64)   # longrope's attention factor, else 1
    dynamic = dict(scaling).get("rope_type") == "dynamic"
    cos, sin = out if out is not None else (torch.empty(max_position, head_dim, dtype=dtype) for _ in range(2))
    for a in range(0, max_position, 4096):
        b = min(max_position, a + 4096)
        pos = torch.arange(a, b, dtype=torch.float64)
        if dynamic:     # position p: the base of a sequence of p + 1 tokens (model_files/rope.py, dynamic)
            bases = torch.tensor([rope_base(theta, scaling, head_dim, p + 1) for p in range(a, b)],
                                 dtype=torch.float64)
            exps = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
            freqs = pos[:, None] * bases[:, None] ** -exps                        # [n, hd/2]
        else:
            freqs = torch.outer(pos, inv_freq)                                   # [n, hd/2]
        c, s = freqs.cos() * mag, freqs.sin() * mag
        cos[a:b, :half], cos[a:b, half:] = c, c
        sin[a:b, :half], sin[a:b, half:] = -s, s
    return cos, sin


class LlamaModel:
    """Weights + math. Build with `LlamaModel(config, weights, dtype="bf16", device="cpu")`
    (models.build_model for any config: Gemma 3's is a subclass)."""

    computes_gemma = False      # gemma.GemmaModel: the pieces Gemma 3 differs in
    attn_scale: float | None = None   # the attention's scale (None: head_dim ** -0.5)
    windows: list | None = None       # per layer: the keys a sliding layer attends to (0: all); None: none has

    def __init__(self, config: LlamaConfig, weights: dict, dtype: str | torch.dtype = "fp32",
                 device: str | torch.device = "cpu"):
        if config.gemma and not self.computes_gemma:
            raise ValueError("a Gemma 3 config needs gemma.GemmaModel (models.build_model picks it)")
        self.config = c = config
        self.device = torch.device(device)
        # dtype_reason: why dtype = auto chose this one (the serve banner says it); None: another was asked
        self.weight_kind, self.dtype, self.dtype_reason = resolve_dtype(dtype, self.device, config)
        if dtype == "auto" and self.dtype == torch.float32 and int4_runs_natively(weights, config, self.device):
            self.dtype = torch.bfloat16     # the file's 4-bit blocks on int8 kernels: bf16 is only storage
            self.dtype_reason = "bf16 storage: the file's 4-bit blocks run on agp's int8 kernels here"
        kind, dt, dev = self.weight_kind, self.dtype, self.device

        def vec(name):
            return weights[name].to(device=dev, dtype=dt).contiguous()

        self.embed = weights["embed"].to(device=dev, dtype=dt).contiguous()  # [V, H]
        self.norm = vec("norm")
        head = weights.get("lm_head", weights["embed"]) if not c.tie_embeddings else weights["embed"]
        # A few rows (decode) read the head as int8 blocks of 32 when that is the file's own
        # form (a Q8_0 embedding, as llama.cpp runs it: half the bytes of bf16), or when the
        # weights are int8 anyway (efficient: then no bf16 copy is kept at all).
        q8 = None
        if dev.type == "cpu" and dt == torch.bfloat16 and native.load() is not None and c.hidden_size % 32 == 0:
            q8 = Q8Linear(head, dt)
            q8 = q8 if (kind == "int8" or q8.lossless) else None
        if q8 is not None and kind == "int8":
            self.lm_head = q8                                   # alone: large batches dequantise
        else:
            self.lm_head = make_linear(head, "dense", dt, dev)  # kept in the compute dtype: accuracy
            if q8 is not None:
                q8.dense = self.lm_head
        self.lm_head_small = q8
        int4 = getattr(weights, "int4", {})   # the file's own 4-bit blocks (GGUF Q4_0/Q4_1)

        def linear(*names):
            parts = [weights[n] for n in names]
            if kind == "dense":     # each part in the compute dtype before they are joined: with bf16 half
                parts = [p.to(dtype=dt) for p in parts]   # the bytes to copy, the same values (elementwise)
            w = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            q4 = Int4Blocks.cat([int4[n] for n in names]) if all(n in int4 for n in names) else None
            return make_linear(w, kind, dt, dev, int4=q4)

        self.layers = []
        for i in range(c.num_layers):
            p = f"layers.{i}."
            layer = Layer()
            layer.attn_norm = vec(p + "attn_norm")
            layer.qkv = linear(p + "q", p + "k", p + "v")        # [(nh+2kv)*hd, H]
            layer.qkv_bias = torch.cat([vec(p + n) for n in ("q_bias", "k_bias", "v_bias")]) \
                if c.qkv_bias else None                         # [(nh+2kv)*hd]
            layer.q_norm, layer.k_norm = (vec(p + "q_norm"), vec(p + "k_norm")) if c.qk_norm else (None, None)  # [hd]
            layer.o = linear(p + "o")
            layer.o_bias = vec(p + "o_bias") if c.o_bias else None   # [H]
            layer.ffn_norm = vec(p + "ffn_norm")
            layer.gate_up = linear(p + "gate", p + "up")         # [2I, H]
            layer.down = linear(p + "down")
            self.layers.append(layer)
        self.cos, self.sin = self.build_rope()
        self.rope, self.silu_mul, self.rms_fn = _rope, _silu_mul, _rms

    def emulates_half(self) -> torch.dtype | None:
        """The half type (bf16, fp16) the layers' GEMMs of a step of many rows (beyond the native
        step's: a batch of over 8 decodes, a prefill) read their weights in on a CPU that emulates
        it (bf16: no AMX, no AVX512-BF16; fp16: no AMX-FP16, no AVX512-FP16), or None: converted
        to fp32 every call (DenseLinear) or emulated GEMMs (PackedLinear), slower than fp32
        weights there. dtype = bf16 or fp16 with dense weights does; auto never takes a half type
        for them on such a CPU."""
        for layer in self.layers:
            for n in ("qkv", "o", "gate_up", "down"):
                dtype = runs_half_gemm(getattr(layer, n))
                if dtype is not None and emulated_half(dtype, self.device):
                    return dtype
        return None

    def linears_text(self, native_step: bool = False) -> str:
        """What runs the layers' linears, one line for the startup banner: their weights' form, the
        kernels of steps of up to 8 rows and of more, and the compute dtype ('storage' where every
        step's linears are agp's int8 kernels: it then only holds the activations and the KV
        cache), e.g. "4-bit block weights on agp's int8 kernels (AVX2), bfloat16 storage". native_step:
        whether the runner's native decode step (agp's kernels) takes all-decode steps of up to
        8 sequences."""
        lins = [getattr(layer, n) for layer in self.layers for n in ("qkv", "o", "gate_up", "down")]
        decodes = native_step and all(lin.native_struct() is not None for lin in lins)
        dtype = str(self.dtype).replace("torch.", "")
        parts, int8_only = [], True
        for form, small, large in sorted({linear_runs(lin) for lin in lins}):
            int8_only = int8_only and small == large and small.startswith("agp's int8 kernels")
            steps = small + (f" up to 8 rows, {large} past" if large != small else "")
            if decodes and not small.startswith("agp's"):
                steps = f"agp's kernels in decode steps of up to 8 sequences, else {steps}"
            parts.append(f"{form} weights on {steps}")
        return "; ".join(parts) + f", {dtype} {'storage' if int8_only else 'compute'}"

    def weight_bytes(self) -> int:
        """Bytes of the tensors the model holds (weights in every form its layers keep: dense,
        prepacked, quantised; the RoPE tables), each storage counted once."""
        seen: set = set()
        total = 0
        todo: list = [self.embed, self.norm, self.lm_head, self.lm_head_small, self.cos, self.sin, *self.layers]
        visited: set = set()
        while todo:
            x = todo.pop()
            if x is None or id(x) in visited:
                continue
            visited.add(id(x))
            if isinstance(x, torch.Tensor):
                if x.is_mkldnn:                 # oneDNN's packed layout has no storage to read
                    key, size = ("packed", id(x)), x.element_size() * x.numel()
                else:
                    storage = x.untyped_storage()
                    key, size = (x.device, storage.data_ptr()), storage.nbytes()
                if key not in seen:
                    seen.add(key)
                    total += size
            elif isinstance(x, (list, tuple)):
                todo.extend(x)
            elif type(x).__module__.startswith("pipeline_dsl.engine"):   # a layer, a linear, its blocks
                slots = [getattr(x, n, None) for c in type(x).__mro__ for n in getattr(c, "__slots__", ())]
                todo.extend([*getattr(x, "__dict__", {}).values(), *slots])
        return total

    def build_rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables cos, sin [max_position, head_dim] ("rotate half": halves share a
        frequency) that rope_tables reads, in the compute dtype (no cast per step) on the device."""
        c = self.config
        cos, sin = rope_table(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position, dtype=self.dtype)
        return cos.to(self.device), sin.to(self.device)        # sin: [-sin, sin], see _rope

    # -- pieces -----------------------------------------------------------------------
    def rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.rms_fn(x, w, self.config.rms_eps)

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, hd] in the compute dtype for positions [T] (sin's first half negated)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def enable_compile(self, force: bool = False) -> None:
        """Fuse the elementwise pieces (RMSNorm, RoPE, SwiGLU gate) with torch.compile; the
        matmuls stay on oneDNN/cuBLAS and attention on SDPA. Falls back to eager on failure.
        On CPU this is skipped unless forced: measured here (torch 2.13, 2 threads) the
        compiled pieces made a decode step slower, not faster."""
        if (self.device.type == "cpu" and not force) or self.compiled():
            return                      # a second engine on these weights (models.LoadedModels): done
        self.rope = Fallback(_rope)
        self.silu_mul = Fallback(_silu_mul)
        self.rms_fn = Fallback(_rms)

    def compiled(self) -> bool:
        """Whether any piece runs through torch.compile (enable_compile took effect)."""
        return isinstance(self.rope, Fallback) or isinstance(self.silu_mul, Fallback) or \
            isinstance(self.rms_fn, Fallback)                  # asked every step: no generator

    def compile_fallbacks(self) -> list[str]:
        """The compiled pieces that failed and run eagerly, with the reasons."""
        pieces = (getattr(self, name, None) for name in ("rope", "silu_mul", "rms_fn"))
        return [f.failed for f in pieces if isinstance(f, Fallback) and f.failed is not None]

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T] -> their embeddings [T, H]."""
        return F.embedding(tokens, self.embed)

    def attn_out(self, layer: Layer, a: torch.Tensor, lora=None) -> torch.Tensor:
        """The attention's output a [T, nh*hd] as the residual stream adds it [T, H].
        lora: the step's LoRA adapters at this layer (lora.LayerLora), added to their rows."""
        y = layer.o(a)
        if lora is not None:
            y = lora.add("o", y, a)
        if layer.o_bias is not None:
            y = y + layer.o_bias
        return y

    def mlp(self, layer: Layer, x: torch.Tensor, lora=None) -> torch.Tensor:
        """lora: the step's LoRA adapters at this layer (lora.LayerLora), added to their rows."""
        h = self.rms(x, layer.ffn_norm)
        gu = layer.gate_up(h)                                   # [T, 2I]
        if lora is not None:
            gu = lora.add("gate_up", gu, h)
        a = self.silu_mul(gu)                                   # [T, I]
        y = layer.down(a)                                       # [T, H]
        if lora is not None:
            y = lora.add("down", y, a)
        return y

    def qkv(self, layer: Layer, x: torch.Tensor, cos, sin, lora=None):
        """x [T, H] -> q [T, nh, hd], k/v [T, kv, hd] (q, k rotated; Qwen3's: each head normed first).
        lora: the step's LoRA adapters at this layer (lora.LayerLora), added to their rows."""
        c = self.config
        h = self.rms(x, layer.attn_norm)
        qkv = layer.qkv(h)                                      # [T, (nh+2kv)*hd]
        if lora is not None:
            qkv = lora.add("qkv", qkv, h)
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        T = qkv.shape[0]
        qk, v = qkv.split([(c.num_heads + c.num_kv_heads) * c.head_dim, c.num_kv_heads * c.head_dim], dim=-1)
        qk = qk.view(T, c.num_heads + c.num_kv_heads, c.head_dim)
        if layer.q_norm is not None:                            # Qwen3: RMSNorm over each head, before RoPE
            qk = torch.cat([self.rms(qk[:, :c.num_heads], layer.q_norm),
                            self.rms(qk[:, c.num_heads:], layer.k_norm)], dim=1)
        qk = self.rope(qk, cos, sin)                            # one rotation for both
        q, k = qk.split([c.num_heads, c.num_kv_heads], dim=1)  # [T, nh, hd], [T, kv, hd]
        return q, k, v.view(T, c.num_kv_heads, c.head_dim)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [n, H] final hidden states -> [n, V] float32."""
        head = self.lm_head_small if self.lm_head_small is not None else self.lm_head
        return head(self.rms(h, self.norm)).float()

    @torch.inference_mode()
    def forward_full(self, token_ids: list[int]) -> torch.Tensor:
        """Reference forward of one sequence without any cache: logits [T, V] float32."""
        c = self.config
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        T = ids.shape[0]
        cos, sin = self.rope_tables(torch.arange(T, device=self.device))
        x = F.embedding(ids, self.embed)                        # [T, H]
        for layer in self.layers:
            q, k, v = self.qkv(layer, x, cos, sin)
            q = q.transpose(0, 1)                               # [nh, T, hd]
            k = k.transpose(0, 1).repeat_interleave(c.group, dim=0)  # [nh, T, hd]
            v = v.transpose(0, 1).repeat_interleave(c.group, dim=0)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [nh, T, hd]
            x = x + self.attn_out(layer, a.transpose(0, 1).reshape(T, -1))
            x = x + self.mlp(layer, x)
        return self.logits(x)


def zeroed_pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor for a KV pool. On CPU, pages of an anonymous private mapping: zero as the
    kernel hands them out, so the pool costs neither the load's time to write its zeros (a third
    of a second for the default 256 MiB) nor resident memory until its blocks are used;
    page-aligned, as the native kernels' loads want. MemoryError where the mapping is refused."""
    if device.type != "cpu" or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    try:
        pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as e:                 # ENOMEM: more than the kernel will commit
        raise MemoryError(f"can't allocate memory: {nbytes} bytes ({e.strerror or e})") from None
    return torch.frombuffer(pages, dtype=dtype).view(shape)   # the tensor holds the mapping


class ModelRunner:
    """Runs steps of the engine on a LlamaModel over a paged KV pool."""

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int,
                 dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                 *, pad_decode: bool = False, compile: bool = False, batch_invariant: bool = False,
                 attention: str = "auto"):
        c = model.config
        if batch_invariant:           # invariant.py: fixed-tile GEMMs, on a view of the weights of its own
            from .invariant import make_invariant

            model = make_invariant(model)
        self.model = model
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = torch.device(device) if device is not None else model.device
        kv_dtype = model.dtype if dtype in (None, "auto", "int8") else resolve_dtype(dtype, self.device)[1]
        self.dtype = kv_dtype
        self.num_slots = num_blocks * block_size
        shape = (c.num_layers, self.num_slots + 1, c.num_kv_heads, c.head_dim)  # +1: scratch slot for padding
        self._k_pool = zeroed_pool(shape, kv_dtype, self.device)
        self._v_pool = zeroed_pool(shape, kv_dtype, self.device)
        self.k_cache = self._k_pool[:, : self.num_slots]   # [layers, num_blocks*block_size, kv, hd]
        self.v_cache = self._v_pool[:, : self.num_slots]
        # why no CUDA graph can replay this model's steps (None: they can): its decode batches are
        # then never padded to a bucket, as padding buys nothing without a graph to replay it
        self.graphs_refused = "CUDA graphs capture llama's layers, not Gemma 3's: every step runs eagerly" \
            if c.gemma else None
        self.pad_decode = pad_decode and self.graphs_refused is None
        self.compile = compile
        if compile:
            model.enable_compile()
        # the native kernels (CPU): whole decode steps of up to native_max_batch sequences, and
        # paged attention in place for larger ones; None: the eager path alone
        self.native = NativeDecoder.create(model, self._k_pool, self._v_pool, block_size) \
            if self.device.type == "cpu" and not batch_invariant else None
        # CPU: a step that another process slowed down sends the next ones to one thread, every
        # engine's of the process at once (their steps share the cores: compute.Contention)
        self.guard = ContentionGuard(contention=CPU_CONTENTION) if self.device.type == "cpu" else None
        self.upload = Uploader(self.device)   # host index arrays -> device (pinned, one copy, on CUDA)
        # batch-invariant mode (invariant.py): fixed-tile GEMMs, one attention path, no native kernels
        self.batch_invariant = batch_invariant
        if batch_invariant:
            self.pad_decode = False
        self.graphs = None                    # cuda_graphs.DecodeGraphs once captured (capture_graphs)
        self.graphs_fallback: str | None = None   # why the capture failed at load, if it did
        # attention: "sdpa" gathers each sequence's keys and runs SDPA (the native kernels on CPU);
        # "flex" reads the pool in place, every row of a step in one FlexAttention call (flex.py);
        # "auto": flex on CUDA where it can serve, sdpa elsewhere
        self.flex = None
        self.attention_fallback: str | None = None    # why flex was dropped at load, if it was
        self._choose_attention(attention)
        # LoRA adapters (lora.py), name -> LoraWeights: a step with any row of one runs eagerly
        # (hidden), where each linear adds its adapters' deltas to their rows
        self.loras: dict = {}

    def add_lora(self, adapter) -> None:
        """Fit a LoRA adapter (lora.read_adapter's) to the model and keep it in `loras`;
        lora.LoraError where its matrices don't fit the model."""
        from .lora import LoraWeights

        self.loras[adapter.name] = LoraWeights(adapter, self.model.config, self.model.dtype, self.device)

    def _choose_attention(self, attention: str) -> None:
        if attention not in ("auto", "flex", "sdpa"):
            raise ValueError(f"attention must be auto, flex or sdpa, not {attention!r}")
        if attention == "sdpa" or self.batch_invariant or (attention == "auto" and self.device.type != "cuda"):
            return
        from .flex import unusable

        why = unusable(self.block_size, self.dtype, self.device) if not self.model.config.gemma else \
            "flex attention here computes no sliding window and no query scale of Gemma 3's: gather + SDPA does"
        if why is not None:
            if attention == "flex":
                raise ValueError(f"attention = flex cannot serve here: {why}")
            self.attention_fallback = why
            return
        self.use_attention("flex")

    def use_attention(self, name: str) -> None:
        """Switch the attention backend ("flex" or "sdpa"); before graphs are captured."""
        if name == "flex":
            from .flex import FlexPaged

            self.flex, self.native = FlexPaged(self), None     # the native kernels have their own
        else:
            self.flex = None

    @property
    def attention(self) -> str:
        return "flex" if self.flex is not None else "sdpa"

    def capture_graphs(self, max_batch: int, max_len: int, graph_factory=None, max_tokens: int | None = None) -> dict:
        """Capture the padded all-decode step as CUDA graphs for every batch and context bucket the
        scheduler can produce (at load, so no capture lands inside a request), and with
        max_tokens the piecewise graphs of steps of up to that many rows (mixed prefill + decode:
        dense parts captured, attention eager); steps that fit no graph run eagerly. Returns
        {"graphs": n, "piece_graphs": n, "capture_s": seconds}. CUDA only unless a graph_factory
        is given (tests run the same bookkeeping with an eager stand-in). A capture that fails
        leaves no graph at all: every step runs eagerly, and `graphs_fallback` (also in the
        returned dict as "fallback") says why, as a flex compile that fails at load does."""
        import time

        if self.graphs_refused is not None:     # the graphs' own embedding and layer pieces are llama's
            import logging

            self.graphs_fallback = self.graphs_refused
            logging.getLogger("agp.model").warning("%s", self.graphs_fallback)
            return {"graphs": 0, "piece_graphs": 0, "capture_s": 0.0, "fallback": self.graphs_fallback}
        from .cuda_graphs import DecodeGraphs   # CUDA-only code: imported only here

        self.pad_decode = True                  # static shapes: the decode batch padded to a bucket
        self.graphs = DecodeGraphs(self, graph_factory)
        t0 = time.perf_counter()
        try:
            return self.graphs.capture_all(max_batch, max_len, max_tokens)
        except Exception as e:  # noqa: BLE001 - graphs are an optimisation, never a failure
            import logging

            self.graphs = None                  # the graphs captured so far go with it (and their pool)
            self.graphs_fallback = f"{type(e).__name__}: {str(e)[:200]}"
            logging.getLogger("agp.model").warning("CUDA graph capture failed at load (%s); every step runs "
                                                   "eagerly", self.graphs_fallback)
            return {"graphs": 0, "piece_graphs": 0, "capture_s": time.perf_counter() - t0,
                    "fallback": self.graphs_fallback}

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Run two prefill-shaped steps that write only the scratch slot, so that lazy work
        (torch.compile of the pieces, cuBLAS handles, allocator growth) happens at load and
        not inside the first request's TTFT. Returns the seconds it took."""
        import time

        t0 = time.perf_counter()
        try:
            with self.flex.compiling() if self.flex is not None else contextlib.nullcontext():
                for batch in self._warm_up_batches():
                    step = self.prepare(batch)
                    step.slots.fill_(self.num_slots)            # K/V to the scratch slot only
                    self.run(step, graphs=False)
        except Exception as e:  # noqa: BLE001 - the flex kernel is an optimisation, never a failure
            if self.flex is None:
                raise
            import logging

            self.attention_fallback = f"{type(e).__name__}: {str(e)[:200]}"
            logging.getLogger("agp.model").warning("flex attention failed at load (%s); reading the "
                                                   "pool with gather + SDPA instead", self.attention_fallback)
            self.use_attention("sdpa")
            return self.warm_up()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def _warm_up_batches(self) -> list[StepBatch]:
        """Two steps that differ in every size a compiled kernel sees (rows, items, table width,
        blocks per query block), so the second compiles the dynamic kernel that later steps and
        the graphs reuse, and a third of at least flex.DECODE_KERNEL_ROWS rows: the compiled flex
        kernel is guarded on being below that, so the first longer step (a prompt of 113+
        tokens when decode graphs stop at 32 rows) would otherwise compile inside its request.
        Last, one decode row: torch.compile specialises a size of 1, so performance mode's fused
        pieces compile a version for it, which a lone request's eager decode step (no graphs)
        would otherwise make (flex pads it to the first step's sizes: no new kernel). They read
        the first blocks of the pool and write only the scratch slot."""
        from .flex import DECODE_KERNEL_ROWS

        bs, nb = self.block_size, self.num_blocks
        shapes = [[(0, min(8, bs))]]                            # (start, tokens) per item
        shapes.append([(0, 2 * bs + 8), (min(5, bs - 1), 1), (bs, min(9, bs))])  # whole, decode, chunk
        shapes.append([(0, DECODE_KERNEL_ROWS + 8)])            # past the guard: a long prompt
        shapes.append([(min(3, bs - 1), 1)])                    # one decode row
        out, used = [], 0
        for shape in shapes:
            items, used = [], 0
            for start, n in shape:
                blocks = -(-(start + n) // bs)
                items.append(SeqBatchItem([0] * n, start, list(range(used, used + blocks)), n > 1 or start > 0))
                used += blocks
            if used <= nb and max(s + n for s, n in shape) <= self.model.config.max_position:
                out.append(StepBatch.from_items(items))
        return out

    returns_rows = True    # run() fills step.rows for items that want every row (prompt outputs)
    native_max_batch = 8   # measured: above this the batched GEMMs of the eager path win

    # -- step preparation (host side, once per step) -------------------------------------
    def prepare(self, batch: StepBatch) -> Step:
        """The step's index tensors (positions, slots, sample rows, tables), vectorised over the
        batch and on CUDA uploaded in one non-blocking copy (batch.prepare_step)."""
        return prepare_step(self, batch)

    # -- the forward pass ----------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, items, pad_to: int | None = None, rows: dict | None = None) -> torch.Tensor:
        """Run one step; logits [n_sample, vocab] float32 for the items with sample=True.
        pad_to: pad an all-decode batch to this many rows (static shapes); padding rows
        write to a scratch slot and produce no logits. rows: a dict that receives, per index
        of an item with `rows`, {"logits": [n, V], "hidden": [n, H]} of every row it fed."""
        if not items:
            return torch.empty(0, self.model.config.vocab_size)
        step = self.prepare(StepBatch.from_items(items, pad_to))
        if step.sample_rows is None:
            self.run(step, want_logits=False)
            out = torch.empty(0, self.model.config.vocab_size, device=self.device)
        else:
            out = self.run(step)
        if rows is not None and step.rows:
            rows.update(step.rows)
        return out

    def run(self, step: Step, want_logits: bool = True, graphs: bool = True) -> torch.Tensor | None:
        """The forward of a prepared step: logits [n_sample, V] float32 (None: want_logits=False
        or no row sampled). Rows still in flight (step.fills) must have been filled in step.tokens
        first. `graphs`: replay a captured CUDA graph where one fits (capture_graphs)."""
        if step.sample_rows is None:
            want_logits = False
        if graphs and self.graphs is not None and step.lora is None:
            x = self.graphs.replay(step)                        # [T, H] hidden states, or None: no graph fits
            if x is not None:
                if step.row_items:                              # prompt outputs: every row of those items
                    step.rows = self._row_outputs(step, x)
                return self.model.logits(x.index_select(0, step.sample_rows)) if want_logits else None
        if self.guard is None or self.compiled():
            return self._forward_step(step, want_logits)
        # A stretch on one thread must leave a row's arithmetic as it was: the native step's is the
        # same on any number of threads; torch's GEMMs split a row's sum by the threads for some
        # shapes (measured: bf16 256 x 1536 -> 576, fp32 4-15 x 576 -> 960), so the eager step of
        # one sequence (a lone request's prefill; its decode without the native kernels) keeps
        # every thread. With several sequences the rows already follow which requests share the
        # step, which timing decides (reproducible answers: AGP_BATCH_INVARIANT=1).
        key = (step.all_decode, step.tokens.shape[0])
        return self.guard.run(key, self._forward_step, step, want_logits, solo=step.native or step.items > 1)

    def compiled(self) -> bool:
        """Whether steps run torch.compile'd code (fused pieces forced on CPU, a compiled flex
        backend). The contention guard leaves those steps on every thread: dynamo guards each
        compiled version on the thread count, so a one-thread stretch would compile new versions
        inside requests (and, with fullgraph flex, hit the recompile limit)."""
        return self.model.compiled() or (self.flex is not None and self.flex.compiled)

    def _forward_step(self, step: Step, want_logits: bool) -> torch.Tensor | None:
        m = self.model
        if step.native:
            logits = self.native.decode(step.tokens, step.positions, step.slots, step.dec_tables,
                                        step.sample_rows if want_logits else None)  # [n_sample, V]
            return logits if want_logits else None
        if step.all_decode and step.dec_tables is not None and step.lora is None:
            return self._forward_glued(step, want_logits)
        x = self.hidden(step)                                   # [T, H]
        if step.row_items:                                      # prompt outputs: every row of those items
            step.rows = self._row_outputs(step, x)
        if not want_logits:
            return None
        return m.logits(x.index_select(0, step.sample_rows))   # [n_sample, V]

    def hidden(self, step: Step) -> torch.Tensor:
        """The eager layers over a step (K/V written to the pool): final hidden states [T, H],
        before the last norm. Static in shape for a padded decode step: what a graph captures."""
        m = self.model
        x = m.embed_tokens(step.tokens)                         # [T, H]
        for li, layer in enumerate(m.layers):
            lora = step.lora.layer(li) if step.lora is not None else None   # LoRA adapters on some rows (lora.py)
            q, k, v = m.qkv(layer, x, step.cos, step.sin, lora)  # [T, nh, hd], [T, kv, hd] x2
            a = self.attend(step, li, q, k, v)                  # [T, nh*hd]
            x = x + m.attn_out(layer, a, lora)
            x = x + m.mlp(layer, x, lora)
        return x

    def attend(self, step: Step, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Layer li's attention of a step: k/v [T, kv, hd] written to the pool at step.slots, then
        q [T, nh, hd] against each row's context read from the pool -> [T, nh*hd]. The part of a
        layer that a piecewise graph leaves eager (cuda_pieces.py)."""
        kc, vc = self._k_pool[li], self._v_pool[li]             # [slots, kv, hd]
        kc.index_copy_(0, step.slots, _as(k, kc.dtype))
        vc.index_copy_(0, step.slots, _as(v, vc.dtype))
        return self._attention(step, q, k, v, kc, vc, li)

    def _row_outputs(self, step: Step, x: torch.Tensor) -> dict:
        """Every row of the items that want them: logits [n, V] and/or normed hidden [n, H]."""
        m, out = self.model, {}
        for index, row0, n, wanted in step.row_items:
            xs = x[row0:row0 + n]                                       # [n, H] before the final norm
            got = {}
            if "hidden" in wanted:
                got["hidden"] = m.rms(xs, m.norm).float()               # [n, H]
            if "logits" in wanted:
                got["logits"] = m.logits(xs)                            # [n, V] float32
            out[index] = got
        return out

    def _forward_glued(self, step: Step, want_logits: bool) -> torch.Tensor | None:
        """A large all-decode batch: the GEMMs on oneDNN/int4 as eager, everything between
        them one native call each (add+RMSNorm, RoPE+KV write+paged attention, SwiGLU)."""
        m, nat = self.model, self.native
        threads = torch.get_num_threads()                       # the step's, read once (not per call)
        indices = nat.step_indices(step.positions, step.slots, step.dec_tables)   # step holds the tensors
        x = F.embedding(step.tokens, m.embed).contiguous()     # [B, H], updated in place
        h = nat.add_rmsnorm(x, None, 0, "attn", threads)
        last = len(m.layers) - 1
        for li, layer in enumerate(m.layers):
            a = nat.attention_block(li, layer.qkv(h).contiguous(), indices, threads)   # [B, nh*hd]
            h = nat.add_rmsnorm(x, layer.o(a).contiguous(), li, "ffn", threads)
            d = layer.down(nat.silu_mul(layer.gate_up(h).contiguous(), threads)).contiguous()
            h = nat.add_rmsnorm(x, d, li + 1, "final" if li == last else "attn", threads)
        if not want_logits:
            return None
        h = h.index_select(0, step.sample_rows)                 # [n_sample, H], normed
        head = m.lm_head_small if m.lm_head_small is not None else m.lm_head   # Q8: the dense copy above its rows
        return head(h).float()                                  # [n_sample, V]

    def _attention(self, step: Step, q, k, v, kc, vc, li: int = 0) -> torch.Tensor:
        c = self.model.config
        nkv, g, hd = c.num_kv_heads, c.group, c.head_dim
        T = q.shape[0]
        scale = self.model.attn_scale                           # None: head_dim ** -0.5
        window = self.model.windows[li] if self.model.windows else 0   # a sliding layer's keys (Gemma 3)
        if step.invariant is not None:
            from .invariant import attention
            key_slots, item_of = step.invariant
            return attention(q, kc, vc, key_slots, item_of, step.positions, g, scale, window)   # [T, nh*hd]
        if step.flex is not None:                               # every row, the pool read in place
            return self.flex.attention(step.flex, q, kc, vc)    # [T, nh*hd]
        if step.all_decode:
            if step.dec_tables is not None:                     # native: the blocks read in place
                return self.native.attention(li, q, step.dec_tables, step.dec_lens)  # [B, nh*hd]
            return self._decode_attention(q, kc, vc, step.dec_gather, _decode_mask(step, window), step.dec_len,
                                          step.dec_first, scale, window).reshape(T, -1)
        out = torch.empty(T, c.num_heads * hd, dtype=q.dtype, device=q.device)
        if step.dec_rows is not None:
            qd = q.index_select(0, step.dec_rows)               # [B, nh, hd]
            if step.dec_tables is not None:
                a = self.native.attention(li, qd, step.dec_tables, step.dec_lens)   # [B, nh*hd]
            else:
                a = self._decode_attention(qd, kc, vc, step.dec_gather, _decode_mask(step, window), step.dec_len,
                                           step.dec_first, scale, window)
            out.index_copy_(0, step.dec_rows, a)
        for row0, n, gather, mask in step.prefills:
            if gather is None:      # (warm-up only) the chunk's own keys, causal
                qs4 = q[row0:row0 + n].transpose(0, 1)                     # [nh, n, hd]
                ks = k[row0:row0 + n].transpose(0, 1).repeat_interleave(g, dim=0)  # [nh, n, hd]
                vs = v[row0:row0 + n].transpose(0, 1).repeat_interleave(g, dim=0)
                a = F.scaled_dot_product_attention(qs4, ks, vs.to(qs4.dtype), is_causal=True, scale=scale)
                out[row0:row0 + n] = a.transpose(0, 1).reshape(n, -1)     # [n, nh*hd]
                continue
            qs = q[row0:row0 + n].view(n, nkv, g, hd).permute(1, 2, 0, 3).reshape(nkv, g * n, hd)
            ks = kc.index_select(0, gather).transpose(0, 1).to(q.dtype)   # [kv, L, hd]
            vs = vc.index_select(0, gather).transpose(0, 1).to(q.dtype)
            if window:                                          # a sliding layer: the chunk's last keys only
                mask = _window_mask(step, row0, n, mask, window, g)
            a = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)  # [kv, g*n, hd]
            out[row0:row0 + n] = a.view(nkv, g, n, hd).permute(2, 0, 1, 3).reshape(n, -1)
        return out

    def _decode_attention(self, q, kc, vc, blocks, mask, length=None, first=None, scale=None,
                          window: int = 0) -> torch.Tensor:
        """q [B, nh, hd] against the contexts in blocks [B*nblk] -> [B, nh*hd]. length: B = 1
        and its context is the first `length` gathered slots (then mask is None); first: and
        they are the pool's slots [first, first + length). window: with `length`, only its last
        `window` keys (a sliding layer; a mask says so itself)."""
        c = self.model.config
        B, bs = q.shape[0], self.block_size
        qg = q.view(B, c.num_kv_heads, c.group, c.head_dim)    # [B, kv, g, hd]: group as query rows
        lo = max(0, length - window) if window and length is not None else 0
        if first is not None:
            ks, vs = kc[None, first + lo:first + length], vc[None, first + lo:first + length]  # [1, L, kv, hd]
            a = F.scaled_dot_product_attention(qg, _as(ks.transpose(1, 2), q.dtype),
                                               _as(vs.transpose(1, 2), q.dtype), scale=scale)  # [1, kv, g, hd]
            return a.reshape(B, -1)
        kb = kc[: self.num_slots].view(self.num_blocks, bs * c.num_kv_heads * c.head_dim)  # [blocks, bs*kv*hd]
        vb = vc[: self.num_slots].view(self.num_blocks, bs * c.num_kv_heads * c.head_dim)
        ks = kb.index_select(0, blocks).view(B, -1, c.num_kv_heads, c.head_dim)  # [B, Lmax, kv, hd]
        vs = vb.index_select(0, blocks).view(B, -1, c.num_kv_heads, c.head_dim)
        if length is not None:
            ks, vs = ks[:, lo:length], vs[:, lo:length]         # [1, L, kv, hd]
        a = F.scaled_dot_product_attention(qg, _as(ks.transpose(1, 2), q.dtype), _as(vs.transpose(1, 2), q.dtype),
                                           attn_mask=mask, scale=scale)     # [B, kv, g, hd]
        return a.reshape(B, -1)


def _decode_mask(step: Step, window: int) -> torch.Tensor | None:
    """The decode rows' additive mask [B, 1, 1, Lmax], for a sliding layer also -inf on the keys
    `window` or more positions back (built once a step, for every sliding layer)."""
    if not window or step.dec_mask is None:
        return step.dec_mask
    masks = step.window_masks if step.window_masks is not None else {}
    step.window_masks = masks
    if ("decode", window) not in masks:
        pos = step.positions if step.all_decode else step.positions.index_select(0, step.dec_rows)   # [B]
        keys = torch.arange(step.dec_mask.shape[-1], device=pos.device)                          # [Lmax]
        far = keys[None, :] <= (pos - window)[:, None]                        # [B, Lmax]
        masks[("decode", window)] = step.dec_mask.masked_fill(far[:, None, None, :], float("-inf"))
    return masks[("decode", window)]


def _window_mask(step: Step, row0: int, n: int, mask: torch.Tensor, window: int, group: int) -> torch.Tensor:
    """A prefill chunk's mask [g*n, L] (key <= query) less the keys `window` or more positions before
    each query (a sliding layer's), built once a step."""
    masks = step.window_masks if step.window_masks is not None else {}
    step.window_masks = masks
    if (row0, window) not in masks:
        pos = step.positions[row0:row0 + n]                                                      # [n]
        near = torch.arange(mask.shape[-1], device=pos.device)[None, :] > (pos - window)[:, None]   # [n, L]
        masks[(row0, window)] = mask & near.repeat(group, 1)
    return masks[(row0, window)]
