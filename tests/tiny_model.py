"""Write a tiny, randomly initialised Llama model as a GGUF file, for fast tests.

    from tiny_model import write_tiny_gguf
    path = write_tiny_gguf(tmp_path / "tiny.gguf")

The file is a complete model as the engine sees it: llama metadata, Q/K rows permuted as
llama.cpp writes them, a byte-level BPE tokenizer (gpt2 style: 3 special tokens, the 256
byte symbols, a few dozen merges) and a ChatML chat template. Token ids 0/1/2 are
<|endoftext|>, <|im_start|> (bos) and <|im_end|> (eos), as in SmolLM2.

    write_tiny_gguf(path, tokenizer="spm")   # a SentencePiece vocabulary (Llama 2's kind)
    write_tiny_gguf(path, arch="qwen2")      # qwen2 metadata, Q/K/V biases, rows not permuted
    write_tiny_gguf(path, arch="qwen3")      # qwen3 metadata, per-head Q/K norms, rows not permuted
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


SPM_SPECIAL = ["<unk>", "<s>", "</s>"]
SPM_TEXT = (  # the text the tiny SentencePiece vocabulary's pieces are learnt from
    "the cat sat on the mat and the dog ran to the park. hello world, hello there! "
    "It is 2024 and 3.14 is pi; numbers 0123456789 in a row. Don't stop: we're here. "
    "The quick brown fox jumps over the lazy dog. über café naïve résumé. "
    "東京 日本語 中文 你好 世界 こんにちは" * 3
)
SPM_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}" \
    "{% if add_generation_prompt %}[assistant]{% endif %}"


def spm_vocab(merges: int = 300) -> tuple[list[str], list[int], list[float]]:
    """(tokens, token types, scores) of a tiny SentencePiece BPE vocabulary as llama.cpp writes
    Llama 2's: <unk> <s> </s>, the 256 byte pieces <0x00>…<0xFF>, then pieces learnt by BPE
    from SPM_TEXT (spaces spelt "▁", each word's first piece with its "▁") scored by their
    merge order, then the single characters, lowest scored."""
    words = [list("\u2581" + w) for w in SPM_TEXT.split()]
    chars = sorted({c for w in words for c in w})
    pieces = []
    for _ in range(merges):
        counts = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                counts[a, b] = counts.get((a, b), 0) + 1
        if not counts:
            break
        a, b = max(counts, key=lambda p: (counts[p], p))
        pieces.append(a + b)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [a + b]
                i += 1
    pieces = list(dict.fromkeys(pieces))
    tokens = SPM_SPECIAL + [f"<0x{b:02X}>" for b in range(256)] + pieces + [c for c in chars if c not in pieces]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)            # UNKNOWN, CONTROL, BYTE, NORMAL
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, types, scores


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's Q/K row permutation: [heads, 2, hd/2, in] -> [heads, hd/2, 2, in]
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, *, seed: int = 0, qtype: str = "F32", embed_scale: float = 1.0,
                    chat_template: str = CHAT_TEMPLATE, embed_qtype: str | None = None,
                    rope_freqs=None, rope_scaling: tuple | None = None, arch: str = "llama",
                    tokenizer: str = "bpe", add_space_prefix: bool | None = None, pre: str | None = None,
                    add_bos: bool = False, control_tokens: tuple = (), rope_dims: int | None = None,
                    longrope: tuple | None = None, rope_metadata: dict | None = None, **overrides) -> Path:
    """Write the tiny model to `path`; qtype F32|F16|Q8_0|Q4_1 for the 2-D weights, embed_qtype
    for the tied embedding when it differs (SmolLM2's file: Q4_1 layers, a Q8_0 embedding). The
    embedding's scale sets how peaked the next-token distribution is: 1.0 makes it almost
    deterministic; about 0.1 gives sampling tests a spread of likely tokens. rope_freqs (head
    size / 2 factors) writes the `rope_freqs.weight` tensor of a Llama 3.1 file, rope_scaling
    (type, factor) the {arch}.rope.scaling metadata (("linear", 4.0)), rope_metadata more of it
    ({"original_context_length": 32, "yarn_beta_fast": 16.0}: an int as uint32, a float as
    float32). arch "qwen2" writes a Qwen2 file (qwen2.* keys, Q/K/V biases, Q/K rows as they are, the qwen2 pre-tokenizer), "qwen3"
    a Qwen3 file (qwen3.* keys, attn_q_norm/attn_k_norm per head, no biases, as llama.cpp's converter
    writes it), "phi3" a Phi-3 file (phi3.* keys, attn_qkv, ffn_up holding gate and up; rope_dims
    rotary dims of each head below its size, longrope (short factors, long factors, original
    context, attention factor) its rope_factors_short/long tensors and metadata), "gemma3" a Gemma 3
    file (gemma3.* keys with gemma3.attention.sliding_window from overrides' `sliding_window`, the q/k
    norms, post_attention_norm and post_ffw_norm, every norm stored as 1 + w as llama.cpp's converter
    stores it); overrides: TINY's sizes and `head_dim` (then {arch}.attention.key_length is written);
    tokenizer "spm" the SentencePiece vocabulary of `spm_vocab` (bos <s>, eos </s>, added at
    the start as Llama 2's files say; add_space_prefix written when not None); `pre` another
    tokenizer.ggml.pre of the byte-level BPE; add_bos: the byte-level BPE's prompts start with
    <|im_start|>, as a Llama tokenizer puts its start token first. control_tokens: more special
    (CONTROL) tokens at the end of the vocabulary (a tool-call marker: "[TOOL_CALLS]")."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    cfg = {**TINY, **overrides}
    H, I, L, nh, nkv = cfg["hidden"], cfg["ffn"], cfg["layers"], cfg["heads"], cfg["kv_heads"]
    hd = cfg.get("head_dim", H // nh)
    if tokenizer == "spm":
        tokens, types, scores = spm_vocab()
    else:
        tokens, types, merges = tiny_vocab()
    tokens, types = tokens + list(control_tokens), types + [3] * len(control_tokens)
    if tokenizer == "spm":
        scores = scores + [0.0] * len(control_tokens)
    V = len(tokens)
    rng = np.random.default_rng(seed)
    path = Path(path)

    w = GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(L)
    w.add_context_length(cfg["context"])
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(cfg["theta"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(rope_dims or hd)
    if longrope is not None:
        short, long, original, attn = longrope
        w.add_uint32(f"{arch}.rope.scaling.original_context_length", original)
        w.add_float32(f"{arch}.rope.scaling.attn_factor", attn)
        w.add_tensor("rope_factors_short.weight", np.asarray(short, dtype=np.float32))
        w.add_tensor("rope_factors_long.weight", np.asarray(long, dtype=np.float32))
    if arch == "gemma3":
        w.add_sliding_window(cfg.get("sliding_window", 4))
    if hd != H // nh:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_vocab_size(V)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if tokenizer == "spm":
        w.add_tokenizer_model("llama")
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        if add_space_prefix is not None:
            w.add_add_space_prefix(add_space_prefix)
        w.add_chat_template(SPM_TEMPLATE if chat_template == CHAT_TEMPLATE else chat_template)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre or ("qwen2" if arch in ("qwen2", "qwen3") else "smollm"))
        w.add_token_merges(merges)
        w.add_pad_token_id(2)
        w.add_add_bos_token(add_bos)
        w.add_chat_template(chat_template)
    if rope_scaling is not None:
        w.add_string(f"{arch}.rope.scaling.type", rope_scaling[0])
        w.add_float32(f"{arch}.rope.scaling.factor", rope_scaling[1])
    for key, value in (rope_metadata or {}).items():
        (w.add_uint32 if isinstance(value, int) else w.add_float32)(f"{arch}.rope.scaling.{key}", value)

    qt = GGMLQuantizationType[qtype]

    def mat(name, out, inp, scale=None, permute_heads=None, qt=qt):
        a = rng.standard_normal((out, inp)).astype(np.float32) * (scale or inp ** -0.5)
        if permute_heads and arch == "llama":   # llama.cpp permutes llama's Q/K rows, not qwen2's
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
        if arch == "phi3":                      # q, k and v in one tensor
            mat(f"blk.{i}.attn_qkv.weight", (nh + 2 * nkv) * hd, H)
        else:
            mat(f"blk.{i}.attn_q.weight", nh * hd, H, permute_heads=nh)
            mat(f"blk.{i}.attn_k.weight", nkv * hd, H, permute_heads=nkv)
            mat(f"blk.{i}.attn_v.weight", nkv * hd, H)
        if arch in ("qwen3", "gemma3"):
            norm(f"blk.{i}.attn_q_norm.weight", hd)
            norm(f"blk.{i}.attn_k_norm.weight", hd)
        if arch == "qwen2":
            for part, n in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
                w.add_tensor(f"blk.{i}.attn_{part}.bias", (0.5 * rng.standard_normal(n)).astype(np.float32))
        mat(f"blk.{i}.attn_output.weight", H, nh * hd)
        norm(f"blk.{i}.ffn_norm.weight", H)
        if arch == "phi3":                      # ffn_up holds gate and up
            mat(f"blk.{i}.ffn_up.weight", 2 * I, H)
        else:
            mat(f"blk.{i}.ffn_gate.weight", I, H)
            mat(f"blk.{i}.ffn_up.weight", I, H)
        mat(f"blk.{i}.ffn_down.weight", H, I)
        if arch == "gemma3":
            norm(f"blk.{i}.post_attention_norm.weight", H)
            norm(f"blk.{i}.post_ffw_norm.weight", H)
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


def write_tiny_hf_folder(folder, gguf, decoder=None) -> Path:
    """The tiny GGUF model `gguf` as a Hugging Face folder (config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json) at `folder`, the same weights and tokenizer;
    `decoder` (a `tokenizers` decoder) replaces the tokenizer's own, for a tokenizer that
    writes its text another way (WordPiece's puts a space between tokens)."""
    import json

    from safetensors.torch import save_file

    from pipeline_dsl.engine.gguf_loader import load_gguf
    from pipeline_dsl.engine.models import load_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = load_gguf(gguf)
    c = g.config
    parts = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
             "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    hf = {"model.embed_tokens.weight": g.weights["embed"], "model.norm.weight": g.weights["norm"]}
    for i in range(c.num_layers):
        for ours, theirs in parts.items():
            hf[f"model.layers.{i}.{theirs}.weight"] = g.weights[f"layers.{i}.{ours}"].contiguous()
    save_file(hf, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_eps, "max_position_embeddings": c.max_position,
        "tie_word_embeddings": True}))
    _, tok = load_model(str(gguf), dtype="fp32")
    if decoder is not None:
        tok.tk.decoder = decoder
    tok.tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "chat_template": tok.chat_template}))
    return folder


def rewrite_gguf(src, dst, change=lambda meta: None, drop=()):
    """A copy of GGUF `src` at `dst`, its metadata changed by `change(dict)` (which may return
    another architecture), the tensors named in `drop` left out."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(str(src))
    meta = {}
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        kind = f.types[0]
        meta[f.name] = (f.contents(), kind, f.types[-1] if kind == GGUFValueType.ARRAY else None)
    arch = change(meta) or r.fields["general.architecture"].contents()
    w = GGUFWriter(str(dst), arch)
    for key, (value, kind, sub) in meta.items():
        w.add_key_value(key, value, kind, sub_type=sub)
    for t in (t for t in r.tensors if t.name not in drop):
        w.add_tensor(t.name, t.data, raw_shape=list(reversed([int(d) for d in t.shape])), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def assert_same_logits(ref, model, ids) -> None:
    """agp's fp32 logits of `ids` from `model` (forward_full) are transformers' from `ref`: real
    logits (not near zero), within 1e-4 of them, the same argmax at every position."""
    import torch

    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]                     # [T, V]
    got = model.forward_full(ids)                                     # [T, V]
    assert want.abs().max() > 1                                       # real logits, not near zero
    assert (got - want).abs().max().item() < 1e-4
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
