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

@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    """The tiny model with a SentencePiece vocabulary and spread next-token distributions: a
    sampled answer mixes pieces, byte pieces (whole characters and stray bytes) and <s> </s>."""
    return write_tiny_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", tokenizer="spm", embed_scale=0.2)


@pytest.fixture(scope="module")
def tok(spm_gguf):
    return Tokenizer.from_gguf_metadata(load_gguf(spm_gguf).metadata)


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


# ---- the engine ------------------------------------------------------------------------------

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
