"""Tokenizer: a `tokenizers.Tokenizer` built from GGUF metadata or an HF tokenizer.json,
plus the model's own chat template rendered in jinja2's sandbox.

    tok = Tokenizer.from_gguf_metadata(meta)          # or Tokenizer.from_hf_folder(path)
    ids = tok.encode("hello")                         # list[int]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    tok.eos_token_ids                                 # frozenset of ids that end generation
    dec = tok.incremental_decoder(); dec.add([ids…])  # text deltas, never half a character

GGUF byte-level BPE ("gpt2" model): the vocabulary is already spelled in gpt2's byte
alphabet; the pre-tokenizer follows `tokenizer.ggml.pre` the way llama.cpp does (e.g.
"smollm" splits digits one by one before the gpt2 regex; "qwen2" single digits).
GGUF SentencePiece ("llama" model: Llama 2, Mistral 7B v0.1, TinyLlama): a BPE whose merges
come from the pieces' `tokenizer.ggml.scores`, spaces spelt "▁" (one put before the text
unless `tokenizer.ggml.add_space_prefix` is false), a character it has no piece for spelt
as its UTF-8 bytes <0xNN>; bos is added unless `add_bos_token` is false, eos where
`add_eos_token` is true: what transformers' GGUF tokenizer builds. Tokens typed CONTROL and
the bos/eos/unk/pad tokens become special tokens, USER_DEFINED ones added tokens, so both
are matched whole in text.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import json
import re
import sys
import time
from datetime import datetime
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from pipeline_dsl.engine.errors import InputError
from pipeline_dsl.model_files import GGUF_TOKENIZERS, ModelFileProblem, read_json_object
from pipeline_dsl.model_files.hf import missing_tokenizer

_CONTROL, _USER_DEFINED = 3, 4
_SPACE = "\u2581"          # a SentencePiece vocabulary's space ("▁")

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the regex its text is split with before the merges (llama.cpp's
# groups in llama-vocab.cpp; transformers' GGUF_PRE_TOKENIZER_SPLITS): the names that
# llama.cpp's converter writes for one regex all stand for it
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}


def _byte_of_char() -> dict[str, int]:
    """gpt2's byte alphabet read backwards: the character a byte-level BPE vocabulary spells
    each byte with -> that byte (printable bytes stand for themselves, the rest from U+0100 on)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in kept:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_of_char()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")        # a SentencePiece vocabulary's byte fallback


def _char_size(data: bytes, at: int) -> int:
    """The length in bytes of the whole UTF-8 character `data[at:]` starts with; 0: none does."""
    for size in (1, 2, 3, 4):
        try:
            data[at:at + size].decode("utf-8")
            return size
        except UnicodeDecodeError:
            continue
    return 0


def replacing_decoder():
    """A new incremental decoder of UTF-8 bytes fed a piece at a time that reads the bytes of a
    cut character as Python's "replace" does, one U+FFFD for them (as a byte-level BPE's text
    does); bytes that may still become a character wait for the next piece."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


class StrayBytesDecoder:
    """UTF-8 bytes fed a piece at a time, read as a SentencePiece text reads its byte pieces:
    whole characters, each byte that is no part of one a U+FFFD (Python's "replace" makes one
    U+FFFD of the bytes of a cut character, as a byte-level BPE's text does); bytes that may
    still become a character wait for the next piece."""

    def __init__(self):
        self.pending = b""

    def getstate(self) -> tuple[bytes, int]:
        """(the bytes waiting, 0), as a `codecs` incremental decoder says it."""
        return self.pending, 0

    def decode(self, data: bytes, final: bool = False) -> str:
        data, at, out = self.pending + data, 0, []
        while at < len(data):
            size = _char_size(data, at)
            if size:
                out.append(data[at:at + size].decode("utf-8"))
                at += size
                continue
            if not final and _unfinished(data[at:]):
                break
            out.append("\ufffd")
            at += 1
        self.pending = data[at:]
        return "".join(out)


def _unfinished(data: bytes) -> bool:
    """Whether `data` is the start of a UTF-8 character whose other bytes have not come."""
    try:
        return len(data) < 4 and codecs.getincrementaldecoder("utf-8")().decode(data, final=False) == ""
    except UnicodeDecodeError:
        return False


def _whole_characters(pieces: list[str]) -> list[str]:
    """`pieces` with each byte piece (<0xNN>) that is no part of a whole UTF-8 character made
    U+FFFD, the byte pieces of whole characters kept: what a decoder's ByteFallback makes of them
    then is the text sentencepiece decodes (whole characters kept, one U+FFFD a stray byte),
    where a run of byte pieces holding one stray byte would otherwise be all U+FFFD."""
    out, run = [], []                  # run: (piece, byte) of the byte pieces in a row

    def settle():
        data, at = bytes(b for _, b in run), 0
        while at < len(data):
            size = _char_size(data, at)
            out.extend([piece for piece, _ in run[at:at + size]] if size else ["\ufffd"])
            at += size or 1
        run.clear()

    for piece in pieces:
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            run.append((piece, int(m.group(1), 16)))
            continue
        settle()
        out.append(piece)
    settle()
    return out


class TokenizerError(InputError):
    """The model's tokenizer or chat template cannot be built or rendered (for this input)."""


def _spm_merges(vocab: dict, scores) -> list[tuple[str, str]]:
    """The BPE merges of a SentencePiece vocabulary (piece -> id) from its pieces' scores, as
    transformers derives them (tokenization_utils_base.generate_merges): every split of a piece
    into two pieces of the vocabulary, the best-scored piece's first, then the longer left
    part, the longer right part; ties in the order of the vocabulary."""
    merges = []
    for piece, score in dict(zip(vocab, scores)).items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _spm_pipeline(tk: HFTokenizer, add_space_prefix: bool) -> None:
    """A SentencePiece vocabulary's pre-tokenizer and decoder (Llama 2's, as transformers and
    llama.cpp build them): spaces are "▁", one put before the text where the file says
    add_space_prefix (its default); decoding turns "▁" back into spaces, byte pieces <0xNN>
    into the UTF-8 characters they spell, and drops the prefix's space again."""
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="first" if add_space_prefix
                                                else "never", split=False)
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + [decoders.Strip(content=" ", left=1)] * bool(add_space_prefix))


def _pre_tokenizer(pre: str | None):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):  # digits one by one, then gpt2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = _SPLITS.get(pre or "")
    if split:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return byte_level  # gpt2 and anything unknown


# the special tokens transformers' tokenizer classes name where a folder's tokenizer_config.json and
# special_tokens_map.json leave one out (their __init__'s defaults), by the class the config names
_CLASS_TOKENS = {
    "LlamaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "CodeLlamaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "Qwen2Tokenizer": {"eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    "GemmaTokenizer": {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
    "GPT2Tokenizer": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "GPTNeoXTokenizer": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                         "pad_token": "<|padding|>"},
}


def listed_end_tokens(folder: Path, gen: dict, model_cfg: dict | None = None) -> list:
    """The end token ids a folder lists beside its tokenizer's eos: generation_config.json's
    eos_token_id (`gen`: that file as read, {} where there is none), config.json's where the folder
    has no such file (`model_cfg`: it as read, else read here), as transformers' generate and vLLM
    read a folder (GenerationConfig.from_model_config)."""
    if gen or (Path(folder) / "generation_config.json").is_file():
        e, where = gen.get("eos_token_id"), Path(folder) / "generation_config.json"
    else:
        where = Path(folder) / "config.json"
        e = (model_cfg if model_cfg is not None else _read_json(where)).get("eos_token_id")
    ids = list(e) if isinstance(e, list) else [e]
    # a token id is a JSON integer from 0 (null: none listed): a string, a float or true is no id
    # of the vocabulary, and would reach the sampler's masks as one (true as id 1)
    if not all(i is None or (isinstance(i, int) and not isinstance(i, bool) and i >= 0) for i in ids):
        raise TokenizerError(f"{where}: 'eos_token_id' must be a token id (an integer from 0) or a list of "
                             f"them, not {json.dumps(e)[:80]}")
    return ids


def _add_listed_tokens(tk: HFTokenizer, listed, where: Path) -> None:
    """The tokens tokenizer_config.json's added_tokens_decoder lists that tokenizer.json does not
    add, or adds as not special where the config says special, added to `tk` as it lists them (as
    transformers loads such a folder: matched whole in text, a special one left out of decoded text)."""
    if not isinstance(listed, dict):
        raise TokenizerError(f"{where}: added_tokens_decoder must be an object of id: token, "
                             f"not {type(listed).__name__}")
    have = tk.get_added_tokens_decoder()
    for key, t in listed.items():
        if not (isinstance(t, dict) and isinstance(t.get("content"), str) and str(key).isdigit()):
            raise TokenizerError(f"{where}: added_tokens_decoder[{key!r}] must be a token id naming an object "
                                 "with its \"content\"")
        special, known = bool(t.get("special")), have.get(int(key))
        if known is not None and known.content == t["content"] and (known.special or not special):
            continue
        token = AddedToken(t["content"], special=special, normalized=bool(t.get("normalized", not special)),
                           lstrip=bool(t.get("lstrip")), rstrip=bool(t.get("rstrip")),
                           single_word=bool(t.get("single_word")))
        (tk.add_special_tokens if special else tk.add_tokens)([token])


def template_special_tokens(cfg: dict) -> dict:
    """The special tokens of a tokenizer_config.json that a chat template sees as variables beside
    bos_token and eos_token, as transformers' apply_chat_template passes its special_tokens_map:
    unk_token, sep_token, pad_token, cls_token and mask_token where the config names them, and a
    model's own named ones (an `extra_special_tokens` object, {"image_token": "<image>"}, and any
    other key ending in `_token` whose value is a token: a string, or an AddedToken's object)."""
    def text(v):
        v = v.get("content") if isinstance(v, dict) else v
        return v if isinstance(v, str) else None

    out = {}
    for key, value in cfg.items():
        if key.endswith("_token") and key not in ("bos_token", "eos_token") and text(value) is not None:
            out[key] = text(value)
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, dict):
        out.update({k: text(v) for k, v in extra.items() if isinstance(k, str) and text(v) is not None})
    return out


class Tokenizer:
    def __init__(self, tk: HFTokenizer, *, bos_token: str | None, eos_token: str | None,
                 eos_token_ids, chat_template: str | None, add_bos: bool = False, add_eos: bool = False,
                 tool_template: str | None = None, special_tokens: dict | None = None):
        self.tk = tk
        self.bos_token, self.eos_token = bos_token, eos_token
        # the other named special tokens the chat template sees beside bos_token and eos_token
        # (unk_token, pad_token, ..., a folder's own image_token: template_special_tokens)
        self.special_tokens = dict(special_tokens or {})
        self.bos_token_id = tk.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = tk.token_to_id(eos_token) if eos_token else None
        self.eos_token_ids = frozenset(i for i in eos_token_ids if i is not None)
        self.chat_template = chat_template
        # the model's named "tool_use" template, which renders a request that gives tools (as
        # transformers' and vLLM's get_chat_template pick it; Hermes' folders and GGUF files have one)
        self.tool_template = tool_template
        self.add_bos = add_bos and self.bos_token_id is not None
        self.add_eos = add_eos and self.eos_token_id is not None
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        # added tokens (special or not): id -> their text, matched and decoded whole
        self.added = {i: t.content for i, t in tk.get_added_tokens_decoder().items()}
        self.special_ids = frozenset(i for i, t in tk.get_added_tokens_decoder().items() if t.special)
        self._template = self._tool_compiled = None
        # a decoder that turns byte pieces <0xNN> into characters (a SentencePiece vocabulary's)
        self._byte_fallback = tk.decoder is not None and b'"ByteFallback"' in tk.decoder.__getstate__()
        # the most characters one token can stand for: a text longer than limit * this has more
        # than `limit` tokens, whatever they are (a cheap check before tokenising huge input)
        self.max_token_chars = max((len(t) for t in tk.get_vocab(with_added_tokens=True)), default=1) or 1
        self._anchor = self._find_anchor()
        self._per_byte = _tokens_per_byte(tk, self.added.values())

    def max_tokens(self, text: str, add_special_tokens: bool = True) -> int | None:
        """At most how many ids encode(text, add_special_tokens) gives, from the text's UTF-8
        bytes without tokenising it (a token stands for at least one byte of the text; a byte
        fallback spells a character in its bytes); None where this tokenizer's normalizer may
        lengthen the text (NFKC, lowercasing, ...): only tokenising it tells."""
        if self._per_byte is None:
            return None
        slope, extra = self._per_byte
        specials = (self.add_bos + self.add_eos) if add_special_tokens else 0
        return slope * len(text.encode("utf-8", "surrogatepass")) + extra + specials

    def _find_anchor(self) -> int | None:
        """An ordinary token to decode text after, where the decoder drops the space a text
        starts with (a SentencePiece "▁"): decoded alone, "▁world" is "world", after another
        token " world". None where the text of ids is the texts of their parts (byte-level BPE)."""
        ids = self.tk.encode("a a", add_special_tokens=False).ids
        if len(ids) < 2 or self.tk.decode(ids) == self.tk.decode(ids[:-1]) + self.tk.decode(ids[-1:]):
            return None
        return ids[0] if ids[0] not in self.added else None

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        kind = meta.get("tokenizer.ggml.model")
        if kind not in GGUF_TOKENIZERS:
            known = " and ".join(f"{words} {name!r}" for name, words in GGUF_TOKENIZERS.items())
            raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported ({known} are)")
        tokens = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        vocab = {t: i for i, t in enumerate(tokens)}
        if "tokenizer.ggml.merges" in meta:
            merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        else:   # SentencePiece: the merges its pieces' scores imply
            merges = _spm_merges(vocab, meta.get("tokenizer.ggml.scores") or [])
        if any(len(m) != 2 for m in merges):
            bad = next(m for m in merges if len(m) != 2)
            raise TokenizerError(f"GGUF merge {' '.join(bad)!r} is not two tokens separated by a space")
        spm = kind == "llama"
        try:   # a SentencePiece vocabulary spells a byte it has no piece for <0xNN>
            tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=spm, byte_fallback=spm))
        except Exception as e:  # the tokenizers library raises a bare Exception (a merge of unknown tokens)
            raise TokenizerError(f"the GGUF vocabulary and merges do not make a BPE tokenizer ({e})") from e
        if spm:
            _spm_pipeline(tk, meta.get("tokenizer.ggml.add_space_prefix", True))
        else:
            tk.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
            tk.decoder = decoders.ByteLevel()

        def tok(key):
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        # CONTROL tokens and the named ones (bos, eos, unk, pad) are special, USER_DEFINED ones
        # added: all matched whole in text (transformers' GGUF tokenizer adds the same)
        named = {tok(f"{k}_token_id") for k in ("bos", "eos", "unknown", "padding")} - {None}
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t, k in zip(tokens, types) if k == _CONTROL or t in named])
        tk.add_tokens([AddedToken(t, special=False, normalized=False)
                       for t, k in zip(tokens, types) if k == _USER_DEFINED])
        eos_ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        if meta.get("general.architecture") == "phi3":
            # a Phi-3 file names <|endoftext|> its eos while each chat turn ends with <|end|>
            # (its generation_config.json lists both; llama.cpp ends on <|end|> by its text)
            eos_ids += [vocab.get("<|end|>"), vocab.get("<|endoftext|>")]
        if meta.get("general.architecture") == "gemma3" and "<end_of_turn>" in vocab:
            eos_ids.append(vocab["<end_of_turn>"])    # a Gemma turn ends there, as llama.cpp stops it
        # llama.cpp starts a SentencePiece prompt with bos unless the file says otherwise
        return cls(tk, bos_token=tok("bos_token_id"), eos_token=tok("eos_token_id"),
                   eos_token_ids=eos_ids, chat_template=meta.get("tokenizer.chat_template"),
                   tool_template=meta.get("tokenizer.chat_template.tool_use"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", spm)),
                   add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                   # transformers' reading of a GGUF names these two beside bos and eos
                   special_tokens={name: tok(f"{key}_token_id") for name, key in
                                   (("unk_token", "unknown"), ("pad_token", "padding")) if tok(f"{key}_token_id")})

    @classmethod
    def from_hf_folder(cls, folder: str | Path, generation_config: dict | None = None) -> "Tokenizer":
        """The tokenizer of a Hugging Face folder; `generation_config`: its generation_config.json
        already read (the engine reads it once for the sampling defaults too), else read here."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: {missing_tokenizer(folder)}")
        try:
            tk = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception for any bad file
            raise TokenizerError(f"{path}: not a tokenizer the `tokenizers` library can read ({e})") from e
        cfg = _read_json(folder / "tokenizer_config.json")
        if "added_tokens_decoder" not in cfg:
            # a folder saved before tokenizer_config.json listed its added tokens names its special
            # tokens (bos, eos, unk, pad) in special_tokens_map.json: its keys are read over the
            # config's (null unsets one), as transformers reads such a folder; a config with
            # added_tokens_decoder leaves the map unread, as there too
            cfg = {**cfg, **_read_json(folder / "special_tokens_map.json")}
        else:
            _add_listed_tokens(tk, cfg["added_tokens_decoder"], folder / "tokenizer_config.json")
        kind = cfg.get("tokenizer_class")
        defaults = _CLASS_TOKENS.get(kind.removesuffix("Fast"), {}) if isinstance(kind, str) else {}
        # a token neither file names (not even as null): the class's own, as transformers builds it,
        # where the vocabulary has it
        cfg = {**{k: t for k, t in defaults.items() if k not in cfg and tk.token_to_id(t) is not None}, **cfg}
        gen = _read_json(folder / "generation_config.json") if generation_config is None else generation_config
        model_cfg = _read_json(folder / "config.json")

        def name(v):
            return v.get("content") if isinstance(v, dict) else v

        bos, eos = name(cfg.get("bos_token")), name(cfg.get("eos_token"))
        # a chat_template.jinja beside it is the template, whatever tokenizer_config.json holds (as
        # transformers reads a folder: the file is newer than the config's template it replaces);
        # else a chat_template.json ({"chat_template": …}: a multimodal folder's, as its processor
        # keeps it; transformers' processor reads it after the .jinja, and vLLM prefers the
        # processor's template to the tokenizer's), else the config's
        jinja, tool_template = folder / "chat_template.jinja", None
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
            # the named ones beside it (transformers writes a template list's others there)
            tool_jinja = folder / "additional_chat_templates" / "tool_use.jinja"
            tool_template = tool_jinja.read_text(encoding="utf-8") if tool_jinja.is_file() else None
        else:
            legacy = _read_json(folder / "chat_template.json")
            template = legacy.get("chat_template") or cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": …}, {"name": "tool_use", …}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
            tool_template = named.get("tool_use")
        eos_ids = [tk.token_to_id(eos)] if eos else []
        eos_ids.extend(listed_end_tokens(folder, gen, model_cfg))
        add_bos = cfg.get("add_bos_token")
        if add_bos is None and bos and tk.token_to_id(bos) is not None:
            # no add_bos_token (Llama 3's folders): tokenizer.json's post-processor says whether a
            # prompt starts with bos, as transformers' and vLLM's encode(add_special_tokens=True)
            add_bos = tk.encode("a", add_special_tokens=True).ids[:1] == [tk.token_to_id(bos)]
        return cls(tk, bos_token=bos, eos_token=eos, eos_token_ids=eos_ids, chat_template=template,
                   add_bos=bool(add_bos), tool_template=tool_template if isinstance(tool_template, str) else None,
                   special_tokens=template_special_tokens(cfg))

    # -- use ------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > 2048:   # encode_batch lets go of the GIL while it works: engine threads go on
            ids = self.tk.encode_batch([text], add_special_tokens=False)[0].ids
        else:
            ids = self.tk.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        if add_special_tokens and self.add_eos:
            ids = ids + [self.eos_token_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True) -> str:
        """The text of `ids`. spaces_between_special_tokens=False (vLLM's field) writes each added
        token as its text with nothing put beside it, whatever the decoder would add (a byte-level
        BPE adds nothing: both give the same text); the text between added tokens keeps its own
        spaces (a SentencePiece "▁next" after "</s>" is " next", as in the whole text)."""
        ids = list(ids)
        if spaces_between_special_tokens or not any(i in self.added for i in ids):
            return self._text(ids, skip_special_tokens)
        parts, run = [], []

        def flush():
            if run:                            # text after an added token goes on after it
                parts.append(self.decode_continued(run, skip_special_tokens) if parts
                             else self._text(run, skip_special_tokens))
                run.clear()

        for i in ids:
            if skip_special_tokens and i in self.special_ids:
                continue                       # left out, as if it were not there
            if i not in self.added:
                run.append(i)
                continue
            flush()
            parts.append(self.added[i])
        flush()
        return "".join(parts)

    def _text(self, ids: list, skip_special_tokens: bool) -> str:
        """The decoder's text of `ids`. Byte pieces that are not all whole characters decode as
        sentencepiece decodes them (each stray byte U+FFFD, the whole characters around it kept),
        not all as U+FFFD as the `tokenizers` library's ByteFallback writes a run holding one:
        so the text of a list of ids starts with the text of any shorter list it starts with
        (an answer streamed token by token reads as the whole answer decoded at once)."""
        text = self.tk.decode(ids, skip_special_tokens=skip_special_tokens)
        if "\ufffd" not in text or not self._byte_fallback:
            return text
        pieces = [self.tk.id_to_token(i) for i in ids if not (skip_special_tokens and i in self.special_ids)]
        return self.tk.decoder.decode(_whole_characters([p for p in pieces if p is not None]))

    def bytes_decoder(self):
        """A new incremental decoder (`.decode(data, final=False) -> str`) of the bytes of this
        tokenizer's tokens (token_bytes) that reads them as its text does: it tells where each
        token's text begins when tokens cut characters (logprobs' text_offset)."""
        return StrayBytesDecoder() if self._byte_fallback else replacing_decoder()

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary's own string of one id (a byte-level BPE's "Ġword"), not its text."""
        return self.tk.id_to_token(token_id)

    def decode_continued(self, ids, skip_special_tokens: bool = True,
                         spaces_between_special_tokens: bool = True) -> str:
        """The text of `ids` where they go on after other text, as an answer goes on after its
        prompt: a SentencePiece answer's first "▁" is the space it stands for (vLLM's, TGI's and
        llama.cpp's answers keep it: "The capital of France is" + " Paris"), which `decode`
        drops at the start of a text as transformers does."""
        if self._anchor is None:
            return self.decode(ids, skip_special_tokens, spaces_between_special_tokens)
        lead = self.decode([self._anchor], skip_special_tokens, spaces_between_special_tokens)
        return self.decode([self._anchor, *ids], skip_special_tokens, spaces_between_special_tokens)[len(lead):]

    def continued_decoder(self, skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True):
        """decode_continued with these options as one callable, ids (a list) -> text. Where that is
        the decoder's own decode (no anchor, added tokens spaced as the decoder spaces them), it is
        the decoder's decode itself: an incremental decoder calls it twice a generated token."""
        if self._anchor is None and (spaces_between_special_tokens or not self.added):
            return functools.partial(self._text, skip_special_tokens=skip_special_tokens)
        return functools.partial(self.decode_continued, skip_special_tokens=skip_special_tokens,
                                 spaces_between_special_tokens=spaces_between_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text of one token (logprobs' `token`) as it reads inside a text: a SentencePiece
        piece keeps the space its "▁" stands for, and a byte piece <0x20> its space (vLLM
        restores them too)."""
        if token_id in self.added:
            return self.decode([token_id], skip_special_tokens=False)
        return self.decode_continued([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (OpenAI's logprobs `bytes`). A token holding part of a
        UTF-8 character decodes alone to U+FFFD, so its bytes come from its vocabulary string:
        a byte-level BPE's alphabet or a SentencePiece byte piece (`<0xE2>`)."""
        text = self.token_text(token_id)
        if "\ufffd" not in text or token_id in self.added:
            return text.encode("utf-8")
        piece = self.tk.id_to_token(token_id) or ""
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        if piece and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        return text.encode("utf-8")

    def set_chat_template(self, source: str) -> None:
        """Use `source` (Jinja) instead of the model's chat template; a syntax error is raised now."""
        self.chat_template, self._template = source, compile_chat_template(source, "the chat template given")
        self.tool_template = self._tool_compiled = None      # the template given renders tools too

    def chat_template_for(self, tools) -> str | None:
        """The template that renders a conversation: the model's "tool_use" one where the request
        gives `tools` and the model has one, else its chat template."""
        return self.tool_template if tools is not None and self.tool_template else self.chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **extra):
        """Render the model's chat template (str), or its token ids when tokenize=True."""
        if not self.chat_template:
            raise TokenizerError("this model has no chat template: send a raw `prompt` instead (agp serve: "
                                 "POST /v1/completions), or give one (agp serve --chat-template FILE)")
        if self.chat_template_for(extra.get("tools")) is not self.chat_template:      # the tool_use one
            if self._tool_compiled is None:
                self._tool_compiled = compile_chat_template(self.tool_template, "the model's tool_use chat template")
            template = self._tool_compiled
        else:
            if self._template is None:
                self._template = compile_chat_template(self.chat_template)
            template = self._template
        try:
            with _deadline(TEMPLATE_SECONDS):
                # the special tokens first: a variable the caller gives wins (as transformers' kwargs do)
                names = {**self.special_tokens, "bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                         **extra}
                text = template.render(messages=messages, add_generation_prompt=add_generation_prompt, **names)
        except TokenizerError:
            raise
        except Exception as e:  # a template error is the input's fault (bad roles, …)
            raise TokenizerError(f"chat template failed: {e}") from e
        # the template writes the bos token itself where the model wants one
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def incremental_decoder(self, skip_special_tokens: bool = True,
                            spaces_between_special_tokens: bool = True) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens, spaces_between_special_tokens)


def open_final_message(rendered, content: str) -> str:
    """A rendered conversation cut just after its last message's text, so that what the model
    writes goes on with that message (vLLM's `continue_final_message`: an assistant's answer
    begun by the client). The template may have trimmed the text's outer spaces; whatever it
    put after the text (an end-of-turn token) goes."""
    if not isinstance(rendered, str):
        raise InputError("continue_final_message needs a chat template that renders text")
    core = content.strip()
    if not core:
        raise InputError("continue_final_message needs a last message with text to go on with")
    at = rendered.rfind(core)
    if at < 0:
        raise InputError("continue_final_message: the chat template does not write the last message's text as it is")
    kept = content.lstrip()                      # its trailing spaces too, where the template kept them
    end = at + (len(kept) if rendered.startswith(kept, at) else len(core))
    return rendered[:end]


# normalizers and pre-tokenizers under which each token of a text stands for at least one of its
# bytes (a character-level model's ▁ for a space: one character; a prefix: one more, below)
_KEEPING_NORMALIZERS = {"Prepend", "Replace"}
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "Whitespace",
                           "WhitespaceSplit", "UnicodeScripts", "CharDelimiterSplit"}


def _tokens_per_byte(tk: HFTokenizer, added) -> tuple[int, int] | None:
    """(slope, extra): a text of b UTF-8 bytes encodes (without special tokens) to at most
    slope * b + extra ids; None where the normalizer may lengthen the text. Each model (BPE,
    byte-level or with a byte fallback, Unigram, WordPiece, WordLevel) makes a token of at least
    one character, or one byte; a prefix (a Prepend normalizer, Metaspace's, ByteLevel's
    add_prefix_space) adds one token at most to each run of text between added tokens: at most
    one more than the bytes where every added token is two bytes or more, else twice the bytes."""
    def parts(state: bytes | None, key: str) -> list[dict] | None:
        if state is None:
            return []
        obj = json.loads(state)
        return obj.get(key) if obj.get("type") == "Sequence" else [obj]

    normalizers = parts(tk.normalizer.__getstate__() if tk.normalizer is not None else None, "normalizers")
    pre = parts(tk.pre_tokenizer.__getstate__() if tk.pre_tokenizer is not None else None, "pretokenizers")
    if normalizers is None or pre is None:
        return None
    if not all(n.get("type") in _KEEPING_NORMALIZERS for n in normalizers) or \
            not all(p.get("type") in _KEEPING_PRE_TOKENIZERS for p in pre):
        return None
    byte_level = any(p["type"] == "ByteLevel" for p in pre)
    for n in normalizers:                     # a space as ▁ (one character, a piece of the vocabulary)
        if n["type"] == "Replace" and (n.get("pattern") != {"String": " "} or len(n.get("content", "")) != 1
                                       or byte_level or tk.token_to_id(n["content"]) is None):
            return None
        if n["type"] == "Prepend" and (byte_level or len(n.get("prepend", "")) != 1):
            return None
    if any(p["type"] == "Metaspace" and (byte_level or tk.token_to_id(p.get("replacement", "")) is None)
           for p in pre):
        return None                           # its ▁ for a space, as a piece of the vocabulary
    prefix = any(n["type"] == "Prepend" for n in normalizers) or any(
        (p["type"] == "Metaspace" and (p.get("prepend_scheme", "always") != "never" or p.get("add_prefix_space")))
        or (p["type"] == "ByteLevel" and p.get("add_prefix_space")) for p in pre)
    if not prefix:
        return 1, 0
    shortest = min((len(t.encode("utf-8")) for t in added), default=2)
    return (1, 1) if shortest >= 2 else (2, 1)


class IdTokenizer:
    """Token ids as text ("17 4 9"), no end-of-sequence token: for driving an engine with
    prompt_token_ids alone (engine benchmarks, random-weight models, tests that compare ids)."""
    eos_token_ids = frozenset()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))

    def id_to_token(self, token_id: int) -> str:
        return str(token_id)

    def token_text(self, token_id: int) -> str:
        return str(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        return str(token_id).encode()

    def bytes_decoder(self):
        return replacing_decoder()


class IncrementalDecoder:
    """Text of a growing list of ids, handed out as deltas that never split a character; the
    ids go on after a prompt (Tokenizer.decode_continued: a SentencePiece answer keeps its
    first space)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True):
        self.tok, self.skip, self.spaces = tokenizer, skip_special_tokens, spaces_between_special_tokens
        self._decode = tokenizer.continued_decoder(skip_special_tokens, spaces_between_special_tokens)
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0      # ids before this are settled; decoding restarts here for context
        self._read = 0        # ids before this are already in self.text

    def add(self, new_ids) -> str:
        """Append ids; return the text they complete (may be '' while a char is unfinished)."""
        ids = self.ids
        ids.extend(new_ids)
        before = self._decode(ids[self._prefix:self._read])
        after = self._decode(ids[self._prefix:])
        n = len(before)
        if after.endswith("\ufffd") or len(after) <= n:
            return ""  # an unfinished multi-byte character: wait for more ids
        delta = after[n:]
        self.text += delta
        self._prefix, self._read = self._read, len(ids)
        return delta

    def flush(self) -> str:
        """At the end: whatever remains, replacement characters included."""
        rest = self._decode(self.ids)[len(self.text):]
        self.text += rest
        self._prefix = self._read = len(self.ids)
        return rest


def _raise(message):
    raise TokenizerError(f"chat template: {message}")


TEMPLATE_SECONDS = 2.0           # a chat template renders within this, or its request fails (400)
MAX_TEMPLATE_VALUE = 1 << 22     # longest string or list a template may build with * (4M items)


class TemplateTimeout(TokenizerError):
    """A chat template ran past TEMPLATE_SECONDS (a loop that never ends, say)."""


@contextlib.contextmanager
def _deadline(seconds: float):
    """Abort the template code running on this thread once `seconds` have passed: a trace
    function on this thread only, that counts the lines of the template's compiled code
    (jinja2 names it "<template>") and, every 64, yields the GIL and looks at the clock."""
    end = time.monotonic() + seconds
    lines = [0]

    def local(frame, event, arg):
        lines[0] += 1
        if lines[0] % 64 == 0:           # a long template lets the engine's threads have the GIL
            time.sleep(0)
            if time.monotonic() > end:
                raise TemplateTimeout(f"the chat template did not finish within {seconds:g} s")
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(previous)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _generation_block():
    """A jinja2 extension for `{% generation %}…{% endgeneration %}`, which transformers' templates
    use to mark the assistant's tokens (for training masks); here it renders its body as it is."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    return Generation


def compile_chat_template(source: str, whose: str = "the model's chat template"):
    """A Jinja chat template compiled in agp's sandbox; a syntax error is a TokenizerError that
    names `whose` it is and the template's line."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and \
                            len(seq) * max(n, 0) > MAX_TEMPLATE_VALUE:
                        raise TokenizerError("the chat template builds a value too large to render")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1000:
                raise TokenizerError("the chat template raises a number to a power too large")
            return super().call_binop(context, operator, left, right)

    # the environment transformers renders chat templates in: {% break %} / {% continue %}
    # (loopcontrols), {% generation %} blocks (rendered as their body), its tojson's arguments
    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _generation_block()])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(source)
    except TemplateError as e:
        line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise TokenizerError(f"{whose} does not parse{line}: {e.message}") from e


def _read_json(path: Path) -> dict:
    """An optional JSON object beside tokenizer.json: {} when absent, an error when broken."""
    if not path.is_file():
        return {}
    try:
        return read_json_object(path, path.name)
    except ModelFileProblem as e:
        raise TokenizerError(str(e)) from None
