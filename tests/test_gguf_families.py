"""A user's own GGUF of another kind runs as transformers runs the same file, or is refused
saying which metadata key and value agp does not run.

The files are tiny and random (tests/tiny_model.py): a llama GGUF with a SentencePiece
vocabulary (Llama 2, Mistral 7B v0.1, TinyLlama: `tokenizer.ggml.model` "llama", scores,
byte pieces <0x00>…<0xFF>, "▁" for spaces), a qwen2 GGUF (qwen2.* keys, biases on Q, K
and V, the qwen2 pre-tokenizer) and a qwen3 GGUF (qwen3.* keys, an RMSNorm over each head of Q
and K, a head size apart from hidden / heads, the qwen2 pre-tokenizer). transformers reads each
file itself (`gguf_file=`): its token ids, decoded text, chat template, fp32 logits and greedy tokens are the reference.
"""

import functools

import pytest
import torch

from pipeline_dsl.engine.models import load_model
from pipeline_dsl.model_files import ModelFileProblem, check_model_path

transformers = pytest.importorskip("transformers")

from tiny_model import assert_same_logits, rewrite_gguf  # noqa: E402

TEXTS = [
    "Hello world", "the cat sat on the mat", "  two leading, two  inner and trailing spaces  ", " ", "",
    "line one\nline two\n\n\tand a tab", "über café naïve — “quotes”", "東京 日本語 中文 你好 こんにちは",
    "emoji 🙂 and a family 👩‍👩‍👧 🇫🇷", "digits 0123456789 3.14159 2024", "</s>after eos<s> and bos",
    "<unk> stays whole", "Don't stop: we're here!", "trailing newline\n", "ÀÉÎÕÜ ß ﬁ Ω ∑ √",
]


@functools.cache
def reference(path):
    """transformers' tokenizer of the file, read once per file (converting a SentencePiece
    vocabulary takes seconds); the checks only encode and decode with it."""
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def ours(path):
    return load_model(str(path), dtype="fp32")


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    from tiny_model import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", tokenizer="spm")


@pytest.fixture(scope="module")
def qwen2_gguf(tmp_path_factory):
    from tiny_model import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("qwen2") / "qwen2.gguf", arch="qwen2")


@pytest.fixture(scope="module")
def qwen3_gguf(tmp_path_factory):
    """Qwen3 as llama.cpp's converter writes it: blk.N.attn_q_norm / attn_k_norm [head size], and
    qwen3.attention.key_length 128 where hidden / heads is 16 (as Qwen3-0.6B: 1024 / 16 heads, 128)."""
    from tiny_model import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("qwen3") / "qwen3.gguf", arch="qwen3", head_dim=128)


@pytest.fixture(scope="module")
def spm(spm_gguf):
    return ours(spm_gguf)[1], reference(spm_gguf)


def test_a_sentencepiece_gguf_encodes_and_decodes_as_transformers_does(spm):
    tok, ref = spm
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert ids[0] == tok.bos_token_id == 1                       # add_bos_token, as Llama 2's files say
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids), text
    pieces = [tok.id_to_token(i) for i in tok.encode("the 🙂", add_special_tokens=False)]
    assert pieces == ["\u2581the", "\u2581", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]   # bytes it has no piece for
    assert tok.eos_token_ids == frozenset({2}) and tok.bos_token == "<s>"


def test_a_sentencepiece_text_keeps_its_spaces_after_special_tokens_written_without_spaces(spm):
    """spaces_between_special_tokens=False puts nothing beside a special token, and takes nothing
    from the text after it: `<s> Hello world</s> next` (its pieces `▁Hello`, `▁next`), as
    transformers' tokenizer gives it either way; the first word after `<s>` lost its space."""
    tok, ref = spm
    for text in TEXTS + ["Hello world</s> next", "a <s> b"]:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False, spaces_between_special_tokens=False) == ref.decode(ids), text


def continued(ref, prompt: list, answer: list) -> str:
    """The text `answer` adds after `prompt` (vLLM's detokenizer: the prompt's tokens as context)."""
    return ref.decode(prompt + answer, skip_special_tokens=True)[len(ref.decode(prompt, skip_special_tokens=True)):]


def test_a_sentencepiece_gguf_streams_whole_characters_and_its_spaces(spm):
    """Generated ids decoded one at a time give the text they add after the prompt: byte pieces
    join into their UTF-8 character, every "▁" piece's space is kept, the first one's too (a
    completion of "The capital of France is" reads " Paris", as vLLM, TGI and llama.cpp's
    server answer; transformers' decode of the answer alone drops it)."""
    tok, ref = spm
    prompt = ref.encode("Say:")
    for text in TEXTS:
        ids = ref.encode(text)[1:]
        dec = tok.incremental_decoder()
        deltas = [dec.add([i]) for i in ids]
        assert "".join(deltas) + dec.flush() == continued(ref, prompt, ids), text
        assert not any("\ufffd" in d for d in deltas), (text, deltas)
    dec = tok.incremental_decoder()
    assert dec.add(ref.encode("Paris", add_special_tokens=False)) == " Paris"     # "▁Paris"


def test_a_sentencepiece_token_alone_keeps_the_space_its_piece_stands_for(spm):
    """Logprobs show each token alone: "▁world" is " world" (as vLLM restores it), a byte piece
    its byte, so the tokens' bytes add up to the text they encode, the prefix's space first."""
    tok, _ = spm
    text = "Hello world  東京 🙂!"
    ids = tok.encode(text, add_special_tokens=False)
    assert [tok.token_text(i) for i in ids[:3]] == [" ", "H", "e"]          # no piece for "▁H"
    assert b"".join(tok.token_bytes(i) for i in ids) == b" " + text.encode()
    assert tok.token_text(tok.token_to_id("\u2581world")) == " world"
    assert tok.token_text(tok.token_to_id("<0x20>")) == " " and tok.token_bytes(tok.token_to_id("<0xF0>")) == b"\xf0"
    assert tok.token_text(2) == "</s>"


def test_a_sentencepiece_gguf_without_the_space_prefix_puts_none_before_the_text(tmp_path, spm):
    """tokenizer.ggml.add_space_prefix false (llama.cpp honours it): no "▁" before the text,
    and a leading space decodes as it is (transformers' LlamaTokenizer(add_prefix_space=False))."""
    from tiny_model import spm_vocab, write_tiny_gguf
    from transformers.tokenization_utils_base import generate_merges

    tokens, _, scores = spm_vocab()
    ref = transformers.LlamaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, add_prefix_space=False,
                                      merges=generate_merges({t: i for i, t in enumerate(tokens)},
                                                             dict(zip(tokens, scores))))
    _, tok = ours(write_tiny_gguf(tmp_path / "m.gguf", tokenizer="spm", add_space_prefix=False))
    assert tok.id_to_token(tok.encode("the", add_special_tokens=False)[0]) == "t"
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert tok.decode(tok.encode("  two spaces first")) == "  two spaces first"


@pytest.mark.parametrize("space_prefix", [True, False], ids=["space-prefix", "no-space-prefix"])
def test_a_stream_decoded_token_by_token_reads_as_its_ids_decoded_after_a_prompt(tmp_path, space_prefix):
    """Whatever the options (special tokens skipped or kept, spaces between them or not) and
    whether the tokenizer decodes after an anchor token (a SentencePiece "▁") or not, the deltas
    of an incremental decoder add up to decode_continued of the ids: special tokens amid text."""
    from tiny_model import write_tiny_gguf

    _, tok = ours(write_tiny_gguf(tmp_path / "m.gguf", tokenizer="spm", add_space_prefix=space_prefix))
    for text in ["Hello world</s> next", "a <s> b</s></s> 東京 🙂", "</s>after eos<s> and bos"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert any(i in tok.added for i in ids), text
        for skip in (True, False):
            for spaces in (True, False):
                dec = tok.incremental_decoder(skip_special_tokens=skip, spaces_between_special_tokens=spaces)
                streamed = "".join(dec.add([i]) for i in ids) + dec.flush()
                assert streamed == tok.decode_continued(ids, skip, spaces), (text, skip, spaces)


@pytest.mark.parametrize("change", [
    lambda m: m.pop("tokenizer.ggml.add_bos_token") and None,                # older files: bos all the same
    lambda m: m.update({"tokenizer.ggml.add_eos_token": (True,) + m["tokenizer.ggml.add_eos_token"][1:]}),
    lambda m: m.pop("tokenizer.ggml.add_eos_token") and None,                # no key: no eos (llama.cpp's)
], ids=["no-add-bos-key", "add-eos", "no-add-eos-key"])
def test_a_sentencepiece_gguf_adds_bos_and_eos_as_transformers_does(tmp_path, spm_gguf, change):
    path = rewrite_gguf(spm_gguf, tmp_path / "m.gguf", change)
    _, tok = ours(path)
    ref = reference(path)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text


def test_a_sentencepiece_gguf_uses_its_own_chat_template(spm):
    tok, ref = spm
    chat = [{"role": "user", "content": "hi 東京"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "more"}]
    text = tok.apply_chat_template(chat)
    assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "[user] hi 東京</s>[assistant] ok</s>[user] more</s>[assistant]"
    assert tok.apply_chat_template(chat, tokenize=True) == tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("pre", [None, "deepseek-r1-qwen", "llama-bpe", "llama-v3", "falcon3", "dbrx", "tekken",
                                 "gpt-4o"])
def test_a_qwen2_gguf_tokenizes_as_transformers_does(tmp_path, qwen2_gguf, pre):
    """tokenizer.ggml.pre names how text is split before the merges: qwen2's regex (also
    DeepSeek-R1's Qwen distils), Llama 3's (also Falcon 3, DBRX), Mistral NeMo's tekken, GPT-4o's."""
    from tiny_model import write_tiny_gguf

    path = qwen2_gguf if pre is None else write_tiny_gguf(tmp_path / "m.gguf", arch="qwen2", pre=pre)
    _, tok = ours(path)
    ref = reference(path)
    for text in TEXTS + ["a\n\nb  \n c", "IT'S 12345 x.y", "Über.Straße\r\n\r\nok"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


def greedy(path, prompts, n=10):
    """(greedy token ids, text) of each prompt through the whole engine (batched decode, paged
    KV, the text streamed a token at a time)."""
    from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams

    engine = Engine(EngineConfig(model=str(path), dtype="fp32", kv_budget_bytes=1 << 20, batch_timeout_s=0.0,
                                 block_size=8))
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), prompt_token_ids=ids, params=SamplingParams(max_tokens=n, ignore_eos=True))
    got = {str(i): ([], []) for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id][0].extend(out.new_token_ids)
            got[out.request_id][1].append(out.delta_text)
    return [(ids, "".join(text)) for ids, text in (got[str(i)] for i in range(len(prompts)))]


@pytest.mark.parametrize("kind", ["spm", "qwen2", "qwen3"])
def test_the_gguf_gives_transformers_logits_and_greedy_tokens(kind, spm_gguf, qwen2_gguf, qwen3_gguf):
    path = {"spm": spm_gguf, "qwen2": qwen2_gguf, "qwen3": qwen3_gguf}[kind]
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    model, tok = ours(path)
    prompts = [tok.encode(t) for t in ("the cat sat on the mat", "東京 🙂 hello", "Don't stop: we're here!")]
    assert_same_logits(ref, model, prompts[0] + prompts[1] + prompts[2])
    ref_tok = reference(path)
    for p, (out, text) in zip(prompts, greedy(path, prompts)):
        with torch.no_grad():   # transformers' greedy choice after each of our tokens, in one forward
            choice = ref(torch.tensor([p + out])).logits[0, len(p) - 1:-1].argmax(-1).tolist()
        assert out == choice and len(out) == 10
        # the answer's text goes on after its prompt, as vLLM decodes it ("is" + " Paris")
        assert text == continued(ref_tok, p, out)


def test_a_qwen3_gguf_reads_its_qwen2_tokenizer_and_hits_the_prefix_cache_as_transformers_decodes(qwen3_gguf):
    """Qwen3's vocabulary is qwen2's byte-level BPE (tokenizer.ggml.pre "qwen2"); its greedy
    tokens through the engine, prefilled in chunks and read back from the prefix cache, are
    transformers' greedy choices on the same file."""
    from test_model_families import QWEN3_WAVES, assert_greedy_like_transformers

    model, tok = ours(qwen3_gguf)
    assert model.config.qk_norm and model.config.head_dim == 128 and model.config.hidden_size == 64
    ref_tok = reference(qwen3_gguf)
    for text in TEXTS + ["a\n\nb  \n c", "IT'S 12345 x.y"]:
        ids = tok.encode(text)
        assert ids == ref_tok.encode(text), text
        assert tok.decode(ids) == ref_tok.decode(ids, skip_special_tokens=True), text
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(qwen3_gguf.parent), gguf_file=qwen3_gguf.name,
                                                            dtype=torch.float32).eval()
    assert_greedy_like_transformers(ref, qwen3_gguf, QWEN3_WAVES)


@pytest.mark.parametrize("change, words", [
    (lambda m: "gemma", "metadata 'general.architecture' 'gemma' is not supported"),
    (lambda m: "phi2", "metadata 'general.architecture' 'phi2' is not supported: this engine runs llama-family "
                       "models \\('llama', 'qwen2', 'qwen3', 'phi3', 'gemma3'\\)"),
    (lambda m: m.update({"tokenizer.ggml.model": ("t5",) + m["tokenizer.ggml.model"][1:]}),
     "metadata 'tokenizer.ggml.model' 't5' is not supported: agp builds byte-level BPE 'gpt2' and "
     "SentencePiece 'llama' tokenizers"),
    (lambda m: m.pop("tokenizer.ggml.scores") and None, "lacks 'tokenizer.ggml.scores'"),
    (lambda m: m.update({"tokenizer.ggml.scores": (m["tokenizer.ggml.scores"][0][:-5],) + m["tokenizer.ggml.scores"][1:]}),
     "'tokenizer.ggml.scores' has 465 entries, but 'tokenizer.ggml.tokens' 470"),
    (lambda m: m.update({"tokenizer.ggml.token_type": (m["tokenizer.ggml.token_type"][0][:9],)
                         + m["tokenizer.ggml.token_type"][1:]}),
     "'tokenizer.ggml.token_type' has 9 entries, but 'tokenizer.ggml.tokens' 470"),
], ids=["architecture", "phi2", "tokenizer", "no-scores", "short-scores", "short-types"])
def test_a_gguf_variant_agp_does_not_run_is_a_check_error_naming_key_and_value(tmp_path, spm_gguf, change, words):
    path = rewrite_gguf(spm_gguf, tmp_path / "m.gguf", change)
    with pytest.raises(ModelFileProblem, match=words):
        check_model_path(path)


def test_bias_tensors_of_a_llama_gguf_are_refused_and_a_qwen2_gguf_needs_its_own(tmp_path, qwen2_gguf):
    """llama.cpp runs the biases a llama GGUF may carry; agp's linear layers have none (but
    qwen2's Q, K, V), so such a file is refused rather than run without them."""
    def as_llama(meta):
        for key in [k for k in meta if k.startswith("qwen2.")]:
            meta["llama." + key[len("qwen2."):]] = meta.pop(key)
        return "llama"

    llama = rewrite_gguf(qwen2_gguf, tmp_path / "llama.gguf", as_llama)
    with pytest.raises(ModelFileProblem, match="tensor 'blk.0.attn_q.bias' is a bias"):
        check_model_path(llama)
    check_model_path(qwen2_gguf)
    unbiased = rewrite_gguf(qwen2_gguf, tmp_path / "q.gguf", drop={"blk.1.attn_k.bias"})
    with pytest.raises(ModelFileProblem, match="missing tensors: blk.1.attn_k.bias"):
        check_model_path(unbiased)


def test_qk_norm_tensors_of_a_llama_gguf_are_refused_and_a_qwen3_gguf_needs_its_own(tmp_path, qwen3_gguf):
    """A per-head Q/K norm is Qwen3's alone: a file of another architecture carrying one would
    run without it, and a qwen3 file without one is missing a tensor."""
    def as_qwen2(meta):
        for key in [k for k in meta if k.startswith("qwen3.")]:
            meta["qwen2." + key[len("qwen3."):]] = meta.pop(key)
        return "qwen2"

    other = rewrite_gguf(qwen3_gguf, tmp_path / "qwen2.gguf", as_qwen2)
    with pytest.raises(ModelFileProblem, match="tensor 'blk.0.attn_q_norm.weight' is an RMSNorm over each head "
                                               "of q, which only a qwen3 model has"):
        check_model_path(other)
    check_model_path(qwen3_gguf)
    unnormed = rewrite_gguf(qwen3_gguf, tmp_path / "q.gguf", drop={"blk.1.attn_k_norm.weight"})
    with pytest.raises(ModelFileProblem, match="missing tensors: blk.1.attn_k_norm.weight"):
        check_model_path(unnormed)


def test_a_qwen2_gguf_rotary_kind_agp_does_not_compute_is_refused_under_its_own_key(tmp_path):
    from tiny_model import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "m.gguf", arch="qwen2", rope_scaling=("longrope", 4.0))
    with pytest.raises(ModelFileProblem, match="metadata 'qwen2.rope.scaling.type' 'longrope' is not supported"):
        check_model_path(path)
