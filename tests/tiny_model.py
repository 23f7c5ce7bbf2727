"""Write a tiny, randomly initialised Llama model as a GGUF file, for fast tests.

    from tiny_model import write_tiny_gguf
    path = write_tiny_gguf(tmp_path / "tiny.gguf")

The file is a complete model as the engine sees it: llama metadata, Q/K rows permuted as
llama.cpp writes them, a byte-level BPE tokenizer (gpt2 style: 3 special tokens, the 256
byte symbols, a few dozen merges) and a ChatML chat template. Token ids 0/1/2 are
<|endoftext|>, <|im_start|> (bos) and <|im_end|> (eos), as in SmolLM2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY = dict(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, context=512, theta=10000.0)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# merges over gpt2's byte alphabet ("Ġ" is the space byte, "Ċ" the newline)
MERGES = [
    ("Ġ", "t"), ("h", "e"), ("Ġ", "a"), ("i", "n"), ("Ġt", "he"), ("e", "r"), ("o", "n"),
    ("Ġ", "s"), ("r", "e"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"), ("l", "d"), ("Ġwor", "ld"),
    ("Ġ", "h"), ("e", "l"), ("Ġh", "el"), ("l", "o"), ("Ġhel", "lo"), ("h", "el"), ("hel", "lo"),
    ("a", "n"), ("Ġa", "n"), ("Ġan", "d"), ("Ġ", "i"), ("Ġi", "s"), ("Ġ", "o"), ("Ġo", "f"),
    ("i", "s"), ("Ġ", "Ġ"), ("ĠĠ", "ĠĠ"), ("Ċ", "Ċ"), ("u", "s"), ("Ġ", "u"), ("Ġu", "s"),
    ("e", "s"), ("a", "t"), ("Ġ", "c"), ("Ġc", "at"), ("i", "t"),
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_alphabet() -> list[str]:
    """gpt2's bytes_to_unicode, as a list indexed by byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of the tiny tokenizer."""
    tokens = SPECIAL + byte_alphabet()
    for a, b in MERGES:
        assert a in tokens and b in tokens, (a, b)
        if a + b not in tokens:
            tokens.append(a + b)
    types = [3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL))  # 3 CONTROL, 1 NORMAL
    return tokens, types, [f"{a} {b}" for a, b in MERGES]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's Q/K row permutation: [heads, 2, hd/2, in] -> [heads, hd/2, 2, in]
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, *, seed: int = 0, qtype: str = "F32", embed_scale: float = 1.0,
                    chat_template: str = CHAT_TEMPLATE, embed_qtype: str | None = None,
                    rope_freqs=None, rope_scaling: tuple | None = None, add_bos: bool = False,
                    **overrides) -> Path:
    """Write the tiny model to `path`; qtype F32|F16|Q8_0|Q4_1 for the 2-D weights, embed_qtype
    for the tied embedding when it differs (SmolLM2's file: Q4_1 layers, a Q8_0 embedding). The
    embedding's scale sets how peaked the next-token distribution is: 1.0 makes it almost
    deterministic; about 0.1 gives sampling tests a spread of likely tokens. rope_freqs (head
    size / 2 factors) writes the `rope_freqs.weight` tensor of a Llama 3.1 file, rope_scaling
    (type, factor) the llama.rope.scaling metadata (("linear", 4.0)); add_bos: a prompt starts
    with <|im_start|>, as a Llama tokenizer puts its start token first."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    cfg = {**TINY, **overrides}
    H, I, L, nh, nkv = cfg["hidden"], cfg["ffn"], cfg["layers"], cfg["heads"], cfg["kv_heads"]
    hd = H // nh
    tokens, types, merges = tiny_vocab()
    V = len(tokens)
    rng = np.random.default_rng(seed)
    path = Path(path)

    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(L)
    w.add_context_length(cfg["context"])
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(cfg["theta"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(chat_template)
    if rope_scaling is not None:
        w.add_string("llama.rope.scaling.type", rope_scaling[0])
        w.add_float32("llama.rope.scaling.factor", rope_scaling[1])

    qt = GGMLQuantizationType[qtype]

    def mat(name, out, inp, scale=None, permute_heads=None, qt=qt):
        a = rng.standard_normal((out, inp)).astype(np.float32) * (scale or inp ** -0.5)
        if permute_heads:
            a = _permute(a, permute_heads)
        if qt == GGMLQuantizationType.F32:
            w.add_tensor(name, a)
        elif qt == GGMLQuantizationType.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, quants.quantize(a, qt), raw_dtype=qt)  # shape from the bytes

    def norm(name, n):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    mat("token_embd.weight", V, H, scale=embed_scale,
        qt=GGMLQuantizationType[embed_qtype] if embed_qtype else qt)
    for i in range(L):
        norm(f"blk.{i}.attn_norm.weight", H)
        mat(f"blk.{i}.attn_q.weight", nh * hd, H, permute_heads=nh)
        mat(f"blk.{i}.attn_k.weight", nkv * hd, H, permute_heads=nkv)
        mat(f"blk.{i}.attn_v.weight", nkv * hd, H)
        mat(f"blk.{i}.attn_output.weight", H, nh * hd)
        norm(f"blk.{i}.ffn_norm.weight", H)
        mat(f"blk.{i}.ffn_gate.weight", I, H)
        mat(f"blk.{i}.ffn_up.weight", I, H)
        mat(f"blk.{i}.ffn_down.weight", H, I)
    norm("output_norm.weight", H)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))   # [hd/2]

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# a JSON schema whose every value has a bounded length: a random model must finish it
BOUNDED_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "n", "ok", "color", "tags"],
}


def tiny_engine(path, **kw):
    """An fp32 Engine on a tiny GGUF with a small KV budget (kw override EngineConfig fields)."""
    from pipeline_dsl.engine import Engine, EngineConfig

    cfg = dict(model=str(path), dtype="fp32", kv_budget_bytes=4 << 20, max_batch_size=8)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))
