"""A SentencePiece vocabulary (Llama 2's, TinyLlama's, Mistral 7B v0.1's kind: tests/tiny_model.py's
`spm_vocab`, pieces with "▁" for a space, the 256 byte pieces <0x00>…<0xFF>, <unk> <s> </s>,
scores) read from a GGUF: its text as transformers reads the same file, and that text streamed
token by token, through the engine and over the wire, reading as the whole answer decoded at once.

Whole characters only ever leave the decoder: a character spelt by several byte pieces comes
out when its last byte does, never half. A byte that is no part of a character (a random model
writes them) is one U+FFFD, the characters around it kept, as sentencepiece decodes it; the
`tokenizers` library's ByteFallback makes a whole run of byte pieces U+FFFD for one such byte,
so that a text would no longer start with the text already streamed of it.
"""

import random

import pytest

from pipeline_dsl.engine import SamplingParams
from pipeline_dsl.engine.gguf_loader import load_gguf
from pipeline_dsl.engine.tokenizer import Tokenizer
from tiny_model import tiny_engine, write_tiny_gguf

TEXTS = [
    "Hello world", "   three leading spaces", "two  inner   spaces and trailing  ", " ", "",
    "\nleading newline", "a\n\n  b\n", "\t tab, then a space", "東京 日本語 中文 你好 こんにちは",
    "emoji 🙂 👩‍👩‍👧 🇫🇷!", "no piece for: ÀÉÎ ß ﬁ Ω ∑ √ \u200b\u3000x", "Don't stop: we're here. 3.14159",
    "bos <s> in text</s> and <unk> too", "über café naïve résumé",
]

LLAMA2_TEMPLATE = (   # Llama 2 chat's own template: <s> before every [INST]
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    """The tiny model with a SentencePiece vocabulary and spread next-token distributions: a
    sampled answer mixes pieces, byte pieces (whole characters and stray bytes) and <s> </s>."""
    return write_tiny_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", tokenizer="spm", embed_scale=0.2)


@pytest.fixture(scope="module")
def tok(spm_gguf):
    return Tokenizer.from_gguf_metadata(load_gguf(spm_gguf).metadata)


@pytest.fixture(scope="module")
def ref(spm_gguf):
    """transformers' tokenizer of the same file (it builds a LlamaTokenizerFast from the GGUF)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)


@pytest.fixture(scope="module")
def engine(spm_gguf):
    return tiny_engine(spm_gguf)


def byte(tok, b: int) -> int:
    return tok.token_to_id(f"<0x{b:02X}>")


def random_ids(tok, rng, n: int) -> list[int]:
    """Ids as a model may write them: pieces, byte pieces of whole characters, stray bytes, <s> </s>."""
    pieces = [tok.token_to_id(p) for p in ("\u2581the", "\u2581cat", "s", "\u2581", "東京", "\u2581hello",
                                           "\u2581world", ".")]
    ids = []
    while len(ids) < n:
        r = rng.random()
        if r < 0.4:
            ids.append(rng.choice(pieces))
        elif r < 0.5:
            ids.append(rng.choice([1, 2]))
        elif r < 0.8:
            ids += [byte(tok, b) for b in rng.choice("é€😀中\n ").encode()]
        else:
            ids.append(byte(tok, rng.randrange(256)))
    return ids


def streamed(tok, chunks, **options) -> tuple[list[str], str]:
    """(the deltas of an incremental decoder fed `chunks` of ids, then the text flush adds)."""
    dec = tok.incremental_decoder(**options)
    deltas = [dec.add(c) for c in chunks]
    return deltas, dec.flush()


# ---- the tokenizer --------------------------------------------------------------------------

def test_text_encodes_and_decodes_as_transformers_reads_the_same_file(tok, ref):
    """Leading, inner and trailing spaces, newlines, tabs, CJK, emoji and characters the
    vocabulary has no piece for (spelt as their UTF-8 bytes), special tokens written in text."""
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids), text
    assert [tok.id_to_token(i) for i in tok.encode("a ∑", add_special_tokens=False)][-3:] == \
        ["<0xE2>", "<0x88>", "<0x91>"]


@pytest.mark.parametrize("data, text", [
    (b"\xc3\xa9\xa9", "é\ufffd"),           # a whole "é", then a continuation byte with no lead
    (b"5\x93", "5\ufffd"),
    (b"A\xff", "A\ufffd"),                   # 0xFF is never UTF-8
    (b"\xe6\x97", "\ufffd\ufffd"),           # two bytes of a three-byte character: each U+FFFD
    (b"\xc3\xa9\xe6", "é\ufffd"),
    (b"\xe6\x97\xa5\xe6", "日\ufffd"),
    (b"\xed\xa0\x80", "\ufffd\ufffd\ufffd"),  # a UTF-16 surrogate spelt in UTF-8: not a character
])
def test_stray_bytes_are_each_one_replacement_character_beside_whole_characters(tok, data, text):
    """What sentencepiece decodes these byte pieces to (its Llama tokenizer's own text): each byte
    that is no part of a whole character is U+FFFD, the whole characters in the same run of byte
    pieces stay themselves (the `tokenizers` library's ByteFallback gives "\ufffd\ufffd\ufffd"
    for "é" and a stray byte)."""
    ids = [byte(tok, b) for b in data]
    assert tok.decode(ids) == text
    the = tok.token_to_id("\u2581the")
    assert tok.decode([the, *ids, the]) == f"the{text} the"
    assert tok.decode_continued(ids) == text


def test_the_text_of_ids_starts_with_the_text_of_every_list_they_start_with(tok):
    """Decoding more ids never rewrites text already there (but for a character whose bytes
    have not all come): what a stream has handed out stays the start of the whole answer."""
    rng = random.Random(5)
    for _ in range(60):
        ids = random_ids(tok, rng, rng.randint(1, 16))
        for skip in (True, False):
            whole = tok.decode_continued(ids, skip)
            for k in range(len(ids)):
                head = tok.decode_continued(ids[:k], skip).rstrip("\ufffd")
                assert whole.startswith(head), (ids, k, skip)


# ---- the incremental decoder ----------------------------------------------------------------

def test_ids_split_anywhere_stream_the_text_they_decode_to(tok):
    """However a text's ids arrive (split at any one place, or in random chunks), the deltas join
    into the ids' text after a prompt, and none holds half a character."""
    rng = random.Random(0)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        whole = tok.decode_continued(ids)
        splits = [[ids[:k], ids[k:]] for k in range(len(ids) + 1)]
        for _ in range(20):
            chunks, i = [], 0
            while i < len(ids):
                n = rng.randint(0, 4)
                chunks.append(ids[i:i + n])
                i += n
            splits.append(chunks)
        for chunks in splits:
            deltas, rest = streamed(tok, chunks)
            assert "".join(deltas) + rest == whole, (text, chunks)
            assert rest == "" and not any("\ufffd" in d for d in deltas), (text, chunks, deltas)


@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
def test_each_id_streams_all_the_whole_text_so_far_and_holds_an_unfinished_character(tok, skip):
    """Fed one id at a time: after each, the text handed out is the ids' text so far, less only the
    U+FFFD of a character still coming (or of a stray byte, until the next id shows it is one)."""
    rng = random.Random(1)
    for _ in range(40):
        ids = random_ids(tok, rng, rng.randint(1, 24))
        dec, so_far = tok.incremental_decoder(skip_special_tokens=skip), ""
        for k, i in enumerate(ids):
            so_far += dec.add([i])
            assert so_far == tok.decode_continued(ids[:k + 1], skip).rstrip("\ufffd"), (ids, k)
        assert so_far + dec.flush() == tok.decode_continued(ids, skip)


def test_an_answer_keeps_the_space_of_its_first_piece_and_of_every_piece_after(tok):
    """Each "▁" piece is a space wherever it falls in the stream: at the answer's start (the answer
    goes on after its prompt), after a byte piece, after a skipped special token, after a chunk."""
    ids = tok.encode("Paris is 東京 🙂 hello", add_special_tokens=False)
    assert tok.id_to_token(ids[0]).startswith("\u2581")
    deltas, _ = streamed(tok, [[i] for i in ids])
    assert "".join(deltas) == " Paris is 東京 🙂 hello"
    hello = tok.token_to_id("\u2581hello")
    deltas, _ = streamed(tok, [[hello], [2], [hello], [byte(tok, 0x41)], [hello]])
    assert deltas == [" hello", "", " hello", "A", " hello"]
    deltas, _ = streamed(tok, [[hello], [2], [hello]], skip_special_tokens=False)
    assert "".join(deltas) == " hello</s> hello"


def test_a_character_of_several_byte_pieces_comes_out_whole_with_its_last_byte(tok):
    ids = [byte(tok, b) for b in "🙂".encode()]
    dec = tok.incremental_decoder()
    assert [dec.add([i]) for i in ids] == ["", "", "", "🙂"]
    dec = tok.incremental_decoder()
    assert dec.add([tok.token_to_id("\u2581the"), *ids[:2]]) == ""     # the word waits with the character
    assert dec.add(ids[2:]) == " the🙂"
    dec = tok.incremental_decoder()                                    # a stray byte shows when the next id does
    assert [dec.add([i]) for i in (byte(tok, 0x41), byte(tok, 0xFF), byte(tok, 0x42))] == ["A", "", "\ufffdB"]
    assert dec.add([ids[0]]) == "" and dec.flush() == "\ufffd"          # the end: the bytes that came, as they are


# ---- the engine: answers streamed, stop strings, special tokens ------------------------------

def generate(engine, prompts: dict, **params) -> dict:
    """{id: (token ids, joined deltas, final RequestOutput)} of sampled answers."""
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt=prompt, params=SamplingParams(temperature=1.0, seed=int(rid), **params))
    got = {rid: ([], []) for rid in prompts}
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id][0].extend(out.new_token_ids)
            got[out.request_id][1].append(out.delta_text)
            if out.finished:
                done[out.request_id] = out
    return {rid: (ids, "".join(deltas), done[rid]) for rid, (ids, deltas) in got.items()}


PROMPTS = {str(i): p for i, p in enumerate(["the cat", "東京 🙂", "Hello world", "über", "x"] * 2)}


@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
def test_a_streamed_answer_is_its_tokens_decoded_after_the_prompt(engine, tok, skip):
    """The deltas of a sampled answer join into its text, and that is its ids decoded after the
    prompt (a length cut drops only the bytes of a character that had not all come), special
    tokens in it or left out as skip_special_tokens says."""
    answers = generate(engine, PROMPTS, max_tokens=24, ignore_eos=True, skip_special_tokens=skip)
    ids_seen = set()
    for rid, (ids, joined, out) in answers.items():
        assert joined == out.text and out.finish_reason == "length"
        assert out.text == tok.decode_continued(ids, skip).rstrip("\ufffd"), rid
        ids_seen.update(ids)
    assert ids_seen & tok.special_ids and any(tok.id_to_token(i).startswith("<0x") for i in ids_seen)


def token_ends(tok, ids) -> list[int]:
    """Where each token's text ends in the answer's text."""
    return [len(tok.decode_continued(ids[:k + 1]).rstrip("\ufffd")) for k in range(len(ids))]


def is_spelt_by_bytes(tok, char: str, ids: list[int]) -> bool:
    """Whether `ids` hold the byte pieces of `char` one after another."""
    spelt = [byte(tok, b) for b in char.encode()]
    return any(ids[k:k + len(spelt)] == spelt for k in range(len(ids)))


def test_stop_strings_that_span_tokens_cut_the_answer_whole_and_streamed(engine, tok):
    """A stop string that starts inside one token and ends inside another, or is a character
    spelt by byte pieces: the answer ends before its first occurrence (or just after it with
    include_stop_str_in_output), the stream never shows any of it."""
    full = generate(engine, PROMPTS, max_tokens=24, ignore_eos=True)
    stops = {}
    for rid, (ids, _, out) in full.items():
        text = out.text
        ends = [e for e in token_ends(tok, ids) if 2 <= e <= len(text) - 2]
        spanning = [text[e - 2:e + 2] for e in ends if text[e - 2:e + 2].strip() and "\ufffd" not in text[e - 2:e + 2]]
        spelt = [c for c in text if len(c.encode()) > 1 and c != "\ufffd" and is_spelt_by_bytes(tok, c, ids)]
        stops[rid] = (spanning or [text[-3:]])[len(spanning) // 2], (spelt or [None])[0]
    assert any(c is not None for _, c in stops.values())
    for which in (0, 1):
        for keep in (False, True):
            asked = {rid: PROMPTS[rid] for rid in PROMPTS if stops[rid][which] is not None}
            for rid in asked:
                engine.add_request(rid, prompt=asked[rid], params=SamplingParams(
                    temperature=1.0, seed=int(rid), max_tokens=24, ignore_eos=True, stop=[stops[rid][which]],
                    include_stop_str_in_output=keep))
            done, joined = {}, {rid: "" for rid in asked}
            while engine.has_unfinished():
                for out in engine.step():
                    joined[out.request_id] += out.delta_text
                    if out.finished:
                        done[out.request_id] = out
            for rid in asked:
                stop, text = stops[rid][which], full[rid][2].text
                end = text.index(stop) + len(stop) * keep
                assert (done[rid].finish_reason, done[rid].stop_reason) == ("stop", stop), (rid, stop)
                assert done[rid].text == joined[rid] == text[:end], (rid, stop, keep)


# ---- over the wire: logprobs, echo, chat ------------------------------------------------------

@pytest.fixture(scope="module")
def server(spm_gguf):
    from test_serve import LiveServer

    s = LiveServer(spm_gguf)
    yield s
    s.close()


def test_logprob_tokens_and_bytes_spell_the_answer_whole_and_streamed(server):
    """Chat logprobs of an answer with a character spelt by byte pieces: each token's `bytes`
    are its own, so they join into the answer's text; each "▁" piece's token keeps its space;
    streamed, the same entries and the same text."""
    pytest.importorskip("llguidance")
    kw = dict(model="tiny", messages=[{"role": "user", "content": "where"}], max_tokens=16, logprobs=True,
              top_logprobs=2, extra_body={"guided_choice": ["東京 🙂 hello world"]})
    r = server.client.chat.completions.create(**kw)
    content, text = r.choices[0].logprobs.content, r.choices[0].message.content
    assert text == "東京 🙂 hello world"
    spelt = [e for e in content if e.token != "</s>"]
    assert b"".join(bytes(e.bytes) for e in spelt) == text.encode()
    assert [e.token for e in spelt if "\ufffd" not in e.token][-2:] == [" hello", " world"]
    assert sum(e.token == "\ufffd" for e in spelt) == 4                     # 🙂's four bytes, each alone
    chunks = list(server.client.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]


def test_echo_streams_the_prompt_and_answer_as_the_whole_completion(server):
    """echo: the prompt as written (its first word without the space its "▁" stands for), then
    the answer, the same whole and streamed; logprobs' text_offset points at each token's text."""
    kw = dict(model="tiny", prompt="東京 🙂 the cat", max_tokens=12, echo=True, logprobs=1, temperature=1.0,
              seed=3, extra_body={"ignore_eos": True})
    whole = server.client.completions.create(**kw).choices[0]
    assert whole.text.startswith("東京 🙂 the cat") and len(whole.text) > len("東京 🙂 the cat")
    chunks = list(server.client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    lp = whole.logprobs
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert lp.tokens[:2] == ["<s>", " 東京"] and lp.text_offset[:3] == [0, 0, 2]
    for offset, token in zip(lp.text_offset[2:], lp.tokens[2:]):
        if "\ufffd" not in token:
            assert whole.text[offset:offset + len(token)] == token, (offset, token)


def test_a_chat_template_that_writes_bos_gives_the_prompt_one_bos(engine, spm_gguf, tok, ref):
    """A template that writes <s> itself (Llama 2's) starts the prompt with one <s>, not two: the
    rendered text is tokenised without adding another, as transformers and vLLM do. A raw prompt
    gets the <s> add_bos_token asks for, once, whether or not its text starts with "<s>"."""
    chat = [{"role": "user", "content": "hi 東京"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "more"}]
    bos = tok.bos_token_id
    engine.tokenizer.set_chat_template(LLAMA2_TEMPLATE)
    try:
        ids = engine.prompt_ids(messages=chat)
    finally:
        engine.tokenizer.set_chat_template(load_gguf(spm_gguf).metadata["tokenizer.chat_template"])
    want = ref.apply_chat_template(chat, chat_template=LLAMA2_TEMPLATE, tokenize=True, add_generation_prompt=True)
    assert ids == list(getattr(want, "input_ids", want))
    assert ids[:2] == [bos, byte(tok, ord("["))] and ids.count(bos) == 2    # one before each [INST]
    assert tok.decode(ids, skip_special_tokens=False) == "<s>[INST] hi 東京 [/INST] ok </s><s>[INST] more [/INST]"
    assert engine.prompt_ids(prompt="hi") == ref.encode("hi") == [bos, *tok.encode("hi", add_special_tokens=False)]
    for prompt in ("<s>hi", "<s> hi"):          # transformers puts a second <s> before the text's own
        assert engine.prompt_ids(prompt=prompt) == ref.encode(prompt, add_special_tokens=False), prompt
    assert engine.prompt_ids(messages=[{"role": "user", "content": "hi"}])[0] != bos   # its own template writes none


@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
def test_text_offsets_of_sampled_answers_point_at_each_tokens_text(server, skip):
    """Sampled answers full of byte pieces (whole characters, characters cut short, stray bytes)
    and special tokens: each token's text_offset is where its text stands in the answer, whole and
    streamed (a special token skipped takes none); the U+FFFD of a character that never came stands
    before the token after it, one a stray byte; the streamed text is the whole one."""
    special = {"<s>", "</s>", "<unk>"}
    checked = shown = 0
    for seed in range(8):
        kw = dict(model="tiny", prompt="the cat", max_tokens=24, logprobs=1, temperature=1.0, seed=seed,
                  extra_body={"ignore_eos": True, "skip_special_tokens": skip})
        whole = server.client.completions.create(**kw).choices[0]
        lp = whole.logprobs
        for offset, token in zip(lp.text_offset, lp.tokens):
            if "\ufffd" not in token and not (skip and token in special):
                assert whole.text[offset:offset + len(token)] == token, (seed, offset, token, whole.text)
                checked += 1
                shown += token in special
        chunks = list(server.client.completions.create(**kw, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == whole.text
        assert [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == \
            lp.text_offset
    assert checked > 80 and (shown > 0) == (not skip)


def test_a_token_after_a_character_that_never_came_begins_after_its_replacement_character():
    """The bytes of a cut character are U+FFFD in the text before the token that shows they end
    there: that token's offset is after it (a byte-level BPE's text, Python's "replace")."""
    from pipeline_dsl.serve.protocol import TextOffsets

    pieces = {1: b"\xe6\x97", 2: b"1", 3: b"\xa5", 4: b"\xe6", 5: b"\x97\xa5", 6: b"x"}
    offsets = TextOffsets(pieces.__getitem__)
    assert [offsets.next(i) for i in (6, 1, 2, 6)] == [0, 1, 2, 3]        # "x", "\ufffd", "1", "x"
    offsets = TextOffsets(pieces.__getitem__)
    assert [offsets.next(i) for i in (4, 5, 6)] == [0, 0, 1]              # 日 cut over two tokens: both at it
    offsets = TextOffsets(pieces.__getitem__)
    assert [offsets.next(i) for i in (1, 3, 6)] == [0, 0, 1]              # 日 whole after all
