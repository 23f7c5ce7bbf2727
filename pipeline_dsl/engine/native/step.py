"""The model and a runner's KV pools as the native kernels' C structs.

    dec = NativeDecoder.create(model, k_pool, v_pool, block_size)   # None: not supported here
    logits = dec.decode(tokens, positions, slots, tables, out_rows)  # [n_out, V] float32
    out = dec.attention(layer, q, tables, lens)                      # [B, nh*hd] in q's dtype

Built once per runner: every pointer stays valid because the tensors it points into are
kept here (`self._keep`) and the pools are preallocated for the runner's lifetime.

A step is one parallel region with a barrier after each phase (~150 a step), on
torch.get_num_threads() threads. When another process competes for the cores, a barrier
waits for a descheduled thread. With libgomp's barrier, which spins for milliseconds before
it sleeps, the thread that arrived first spun through the time slice the other one needed,
and a step that takes 6 ms alone took 100-600 ms (measured on 2 shared cores). The step's own
barrier (kernels.cpp: Barrier) spins at most `spin_us` (BARRIER_SPIN_US) and then sleeps on a
futex, and a thread whose waits mostly outlast the spin sleeps at once (docs/engine_benchmarks.md
has the measurements); the runner's ContentionGuard (engine/compute.py) still runs the next
steps on one thread when one is far slower than the best seen. The work is split by the batch
and its contexts alone, never by the thread count, so a step gives the same logits bit for bit
on any number of threads.
"""

from __future__ import annotations

import ctypes

import torch

from . import Layer, Model, Step, load

BARRIER_SPIN_US = 50     # a quiet step's barrier waits are shorter (its phases split their work finely)


class NativeDecoder:
    spin_us = BARRIER_SPIN_US       # the step's barriers: spin this long, then sleep; -1: libgomp's

    def __init__(self, lib, model, k_pool: torch.Tensor, v_pool: torch.Tensor, block_size: int):
        c = model.config
        bf16 = model.dtype == torch.bfloat16
        self.lib, self.config, self.dtype = lib, c, model.dtype
        self._keep = [k_pool, v_pool]

        def f32(t: torch.Tensor) -> int:
            t = t.float().contiguous()
            self._keep.append(t)
            return t.data_ptr()

        def lin(layer):
            st = layer.native_struct(round_out=bf16)
            if st is None:
                raise ValueError(f"no native form for {type(layer).__name__}")
            return st

        self._norms = [(f32(ly.attn_norm), f32(ly.ffn_norm)) for ly in model.layers]   # glue: rmsnorm weights
        self._final_norm = f32(model.norm)
        self._bf = int(bf16)
        self._layers = (Layer * c.num_layers)()
        for i, ly in enumerate(model.layers):
            self._layers[i] = Layer(f32(ly.attn_norm), f32(ly.ffn_norm), lin(ly.qkv), lin(ly.o),
                                    lin(ly.gate_up), lin(ly.down),
                                    f32(ly.q_norm) if ly.q_norm is not None else None,   # Qwen3's, before RoPE
                                    f32(ly.k_norm) if ly.k_norm is not None else None)
        head = model.lm_head_small if model.lm_head_small is not None else model.lm_head
        # as eager: bf16 logits, except from a head whose native path gives float32 (quant.Q8Linear)
        head_st = head.native_struct(round_out=bf16 and not getattr(head, "logits_f32", False))

        if head_st is None:
            raise ValueError("no native form of the lm_head")
        embed = model.embed.contiguous()
        self._keep.append(embed)
        self.model = Model(c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
                           c.head_dim, c.vocab_size, block_size, c.rms_eps, int(bf16),
                           int(embed.dtype == torch.bfloat16), int(k_pool.dtype == torch.bfloat16),
                           embed.data_ptr(), f32(model.norm), f32(model.cos), f32(model.sin),
                           ctypes.addressof(self._layers), head_st, k_pool.data_ptr(), v_pool.data_ptr(),
                           k_pool[0].numel())

    @classmethod
    def create(cls, model, k_pool, v_pool, block_size):
        """A decoder for this model, or None when the kernels or its weights don't allow one."""
        lib = load()
        c = model.config
        if (lib is None or model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16)
                or k_pool.dtype not in (torch.float32, torch.bfloat16) or c.head_dim % 16 or c.head_dim > 256
                or c.hidden_size % 32 or c.intermediate_size % 32 or c.hidden_size > 4096
                or not k_pool.is_contiguous() or c.qkv_bias or c.o_bias   # the kernels have no bias terms
                or c.gemma):      # nor Gemma 3's norms, GeGLU and sliding windows: the eager path runs it
            return None
        try:
            return cls(lib, model, k_pool, v_pool, block_size)
        except ValueError:
            return None

    def decode(self, tokens, positions, slots, tables, out_rows, prof: torch.Tensor | None = None) -> torch.Tensor:
        """One all-decode step: tokens/positions/slots [B], tables [B, nblk], out_rows [n] (long).
        prof: a float64 [threads, len(native.PHASES)] to which each thread adds its seconds per phase."""
        B, nblk = tables.shape
        n = 0 if out_rows is None else out_rows.shape[0]
        logits = torch.empty(n, self.config.vocab_size, dtype=torch.float32)
        if prof is not None and (prof.dtype != torch.float64 or prof.shape[0] < torch.get_num_threads()
                                 or not prof.is_contiguous()):
            raise ValueError("prof: a contiguous float64 tensor [threads, len(PHASES)]")
        step = Step(B, nblk, n, self.spin_us, tokens.data_ptr(), positions.data_ptr(), slots.data_ptr(),
                    tables.data_ptr(), out_rows.data_ptr() if n else None,
                    prof.data_ptr() if prof is not None else None)
        self.lib.agp_decode_step(ctypes.byref(self.model), ctypes.byref(step), logits.data_ptr(),
                                 torch.get_num_threads())
        return logits

    def attention(self, layer: int, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """q [B, nh, hd] (rows may be strided) over the paged contexts -> [B, nh*hd] in q's dtype."""
        B, nh, hd = q.shape
        if q.stride(2) != 1 or q.stride(1) != hd or q.dtype not in (torch.float32, torch.bfloat16):
            q = q.contiguous().to(self.dtype)
        out = torch.empty(B, nh * hd, dtype=q.dtype)
        self.lib.agp_paged_attention(ctypes.byref(self.model), layer, B, q.data_ptr(), q.stride(0),
                                     int(q.dtype == torch.bfloat16), tables.data_ptr(), tables.shape[1],
                                     lens.data_ptr(), out.data_ptr(), torch.get_num_threads())
        return out

    # ---- glue between the eager GEMMs of a large all-decode batch (one call each) ---------
    # The glued step's pieces (ModelRunner._forward_glued), called once or three times a layer:
    # `threads` (torch.get_num_threads() when None) and the step's index pointers (step_indices)
    # are read once a step by the caller, not once a call.
    def add_rmsnorm(self, x: torch.Tensor, r: torch.Tensor | None, layer: int, which: str,
                    threads: int | None = None) -> torch.Tensor:
        """x [T, H] += r (in place, when given); returns rmsnorm(x) with layer's attn|ffn|final norm."""
        w = self._final_norm if which == "final" else self._norms[layer][which == "ffn"]
        h = torch.empty_like(x)
        T, H = x.shape
        self.lib.agp_add_rmsnorm(r.data_ptr() if r is not None else None, x.data_ptr(), w, h.data_ptr(), T, H,
                                 self.config.rms_eps, self._bf, threads or torch.get_num_threads())
        return h

    def silu_mul(self, gu: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """gu [T, 2I] -> silu(gate) * up [T, I]."""
        T, I2 = gu.shape
        out = torch.empty(T, I2 // 2, dtype=gu.dtype)
        self.lib.agp_silu_mul(gu.data_ptr(), out.data_ptr(), T, I2 // 2, self._bf, threads or torch.get_num_threads())
        return out

    def step_indices(self, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor) -> tuple:
        """A step's positions, KV slots and block tables as attention_block reads them (pointers:
        the tensors must outlive the step's layers)."""
        return ctypes.byref(self.model), positions.data_ptr(), slots.data_ptr(), tables.data_ptr(), tables.shape[1]

    def attention_block(self, layer: int, qkv: torch.Tensor, indices: tuple,
                        threads: int | None = None) -> torch.Tensor:
        """qkv [B, (nh+2kv)*hd] -> RoPE, K/V written at slots, paged attention -> [B, nh*hd].
        indices: step_indices(positions, slots, tables)."""
        c = self.config
        B = qkv.shape[0]
        att = torch.empty(B, c.num_heads * c.head_dim, dtype=qkv.dtype)
        model, positions, slots, tables, width = indices
        self.lib.agp_decode_attention_block(model, layer, B, qkv.data_ptr(), self._bf, positions, slots, tables,
                                            width, att.data_ptr(), threads or torch.get_num_threads())
        return att
