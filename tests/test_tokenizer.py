"""Tokenizer from GGUF metadata (tiny model): byte-level BPE, special tokens, chat
template in the sandbox, incremental decoding."""

import pytest

from pipeline_dsl.engine.gguf_loader import load_gguf
from pipeline_dsl.engine.errors import InputError
from pipeline_dsl.engine.tokenizer import Tokenizer, TokenizerError, open_final_message


@pytest.fixture(scope="module")
def tok(tiny_gguf):
    return Tokenizer.from_gguf_metadata(load_gguf(tiny_gguf).metadata)


def test_merges_apply_and_text_round_trips(tok):
    ids = tok.encode(" the world")
    assert [tok.tk.id_to_token(i) for i in ids] == ["Ġthe", "Ġworld"]
    for text in ["héllo wörld ✓ 日本語 🙂", "  two  spaces\n\n\ttab", "def f(x):\n    return x**2\n", ""]:
        assert tok.decode(tok.encode(text)) == text


def test_digits_are_split_one_by_one_like_llama_cpp_smollm(tok):
    assert [tok.tk.id_to_token(i) for i in tok.encode("x 2024")] == ["x", "Ġ", "2", "0", "2", "4"]


def test_special_tokens_are_matched_whole_and_skipped_in_text(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.eos_token_ids == frozenset({2}) and tok.bos_token == "<|im_start|>"
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)  # add_bos_token is false


@pytest.mark.parametrize("key", ["eot", "eom"])
def test_a_gguf_end_of_turn_token_ends_generation_as_eos_does(tiny_gguf, key):
    """tokenizer.ggml.eot_token_id / eom_token_id (Llama 3's <|eot_id|>, <|eom_id|>) end an answer
    as eos does: an instruct model that ends its turn with one stops there."""
    meta = dict(load_gguf(tiny_gguf).metadata)
    meta[f"tokenizer.ggml.{key}_token_id"] = 0
    assert Tokenizer.from_gguf_metadata(meta).eos_token_ids == frozenset({0, 2})


def test_chat_template_renders_with_generation_prompt(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == ("<|im_start|>system\nYou are a tiny test model.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template([{"role": "system", "content": "S"}], add_generation_prompt=False,
                                  tokenize=True)
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>system\nS<|im_end|>\n"


def test_continue_final_message_cuts_after_the_last_text_whatever_the_template_did_to_its_spaces(tok):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, "}]
    text = tok.apply_chat_template(chat, add_generation_prompt=False)
    assert text.endswith("<|im_start|>assistant\nSure, <|im_end|>\n")
    assert open_final_message(text, "Sure, ").endswith("<|im_start|>assistant\nSure, ")   # its space kept
    trimmed = "<user>hi</user><assistant>Sure,</assistant>"                # a template that trims
    assert open_final_message(trimmed, "  Sure, ") == "<user>hi</user><assistant>Sure,"
    lstripped = "<user>hi</user><assistant>Sure, </assistant>"             # leading spaces trimmed only
    assert open_final_message(lstripped, "  Sure, ") == "<user>hi</user><assistant>Sure, "
    echoed = "<user>ok</user><assistant>ok</assistant>"                     # the last occurrence
    assert open_final_message(echoed, "ok") == "<user>ok</user><assistant>ok"
    with pytest.raises(InputError, match="does not write the last message's text"):
        open_final_message("<assistant>SURE</assistant>", "Sure")
    with pytest.raises(InputError, match="text to go on with"):
        open_final_message(text, "  ")


def test_template_errors_and_sandbox_become_tokenizer_errors(tok):
    bad = Tokenizer(tok.tk, bos_token=None, eos_token=None, eos_token_ids=[],
                    chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TokenizerError, match="roles must alternate"):
        bad.apply_chat_template([{"role": "user", "content": "x"}])
    unsafe = Tokenizer(tok.tk, bos_token=None, eos_token=None, eos_token_ids=[],
                       chat_template="{{ messages.append(1) }}")
    with pytest.raises(TokenizerError):
        unsafe.apply_chat_template([])
    none = Tokenizer(tok.tk, bos_token=None, eos_token=None, eos_token_ids=[], chat_template=None)
    with pytest.raises(TokenizerError, match="no chat template") as err:   # what to do instead, where
        none.apply_chat_template([{"role": "user", "content": "x"}])
    assert "/v1/completions" in str(err.value) and "--chat-template FILE" in str(err.value)


def test_incremental_decoder_never_splits_a_character(tok):
    text = "a 日本 🙂 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # multi-byte characters take several byte tokens
    dec = tok.incremental_decoder()
    deltas = [dec.add([i]) for i in ids]
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)
    assert dec.flush() == ""


def test_the_bytes_of_a_text_s_tokens_are_its_utf8_bytes(tok):
    """token_bytes (logprobs' `bytes`): a byte-level token that holds part of a character reads
    its bytes from the gpt2 alphabet, every byte of it (controls, DEL, 0x80-0xA0 and 0xAD are
    the alphabet's U+0100 on), so the tokens' bytes together are the text's."""
    text = " \u2014\t\x7f \u65e5\u672c \U0001f642 \u00ad\u00a0ok"
    ids = tok.encode(text, add_special_tokens=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_flush_returns_the_bytes_of_an_unfinished_character_as_replacement_characters(tok):
    """Ids that end inside a multi-byte character: flush hands out what is left, its bytes shown
    as U+FFFD, as decoding the whole list would; nothing is dropped (an engine's answer leaves
    such trailing bytes out, as vLLM's does: tests/test_engine.py)."""
    ids = tok.encode("ok 日")
    cut = ids[:-1]                                  # the last byte of 日 never comes
    whole = tok.decode(cut)
    assert whole.endswith("\ufffd")
    dec = tok.incremental_decoder()
    held = "".join(dec.add([i]) for i in cut)
    assert "\ufffd" not in held
    assert held + dec.flush() == whole
    assert dec.flush() == ""


def test_a_folder_whose_post_processor_adds_bos_starts_raw_prompts_with_it(tmp_path, tok):
    """Llama 3's folders say nothing of add_bos_token: tokenizer.json's post-processor puts
    <|begin_of_text|> first, and transformers' and vLLM's prompts start with it."""
    from tokenizers import processors

    transformers = pytest.importorskip("transformers")
    tk = tok.tk.__class__.from_str(tok.tk.to_str())
    tk.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}')
    ours = Tokenizer.from_hf_folder(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ("the cat", "hello world"):
        assert ours.encode(text) == theirs(text)["input_ids"]
    assert ours.encode("the cat")[0] == 1
    assert ours.encode("<|im_start|>user")[:2] != [1, 1]     # a prompt that has its bos gets no second
    assert ours.encode("the cat", add_special_tokens=False)[0] != 1


@pytest.mark.parametrize("template, rendered", [
    ("{% for m in messages %}{% if m.role == 'assistant' %}{% break %}{% endif %}{{ m.content }}{% endfor %}",
     "Shi"),
    ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }}|{% endfor %}",
     "hi|yo|"),
    ("{{ messages[0] | tojson(indent=1, sort_keys=True) }}", '{\n "content": "S",\n "role": "system"\n}'),
    ("{{ {'b': 1, 'a': 2} | tojson(separators=(',', ':')) }}", '{"b":1,"a":2}'),
    ("{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}", "[S][hi][yo]"),
    ("{% for m in messages %}\n    {% if m.role != 'system' %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}",
     "hi\nyo\n"),
], ids=["break", "continue", "tojson-sort-keys", "tojson-separators", "generation-block", "trimmed-block-lines"])
def test_chat_templates_render_in_the_environment_transformers_gives_them(tok, template, rendered):
    """Templates use jinja's loop controls, tojson's json.dumps arguments and transformers'
    {% generation %} blocks; each failed to parse or render before. A line holding only a block
    tag writes nothing, neither its indent nor its newline (trim_blocks, lstrip_blocks)."""
    tok.set_chat_template(template)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == rendered


def test_a_folder_with_named_chat_templates_renders_the_default_one(tmp_path, tok):
    """tokenizer_config.json may hold a list of named templates (Hermes, Command R: "tool_use",
    "rag", "default"): a chat renders the one named default, wherever it stands in the list."""
    import json

    tok.tk.save(str(tmp_path / "tokenizer.json"))
    named = [{"name": "tool_use", "template": "TOOLS{{ messages[0].content }}"},
             {"name": "default", "template": "DEFAULT{{ messages[0].content }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": named}))
    ours = Tokenizer.from_hf_folder(tmp_path)
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "DEFAULThi"


def test_a_user_defined_token_is_text_that_skipping_special_tokens_keeps(tiny_gguf):
    """A GGUF token typed USER_DEFINED is an added token, not a special one: matched whole in
    text and kept in the text when special tokens are skipped, whether or not spaces are put
    between added tokens (vLLM's spaces_between_special_tokens)."""
    meta = dict(load_gguf(tiny_gguf).metadata)
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta["tokenizer.ggml.token_type"])
    types[tokens.index("hello")] = 4                     # USER_DEFINED
    meta["tokenizer.ggml.token_type"] = types
    user = Tokenizer.from_gguf_metadata(meta)
    ids = user.encode("<|im_start|>hello the")
    assert ids[:2] == [1, tokens.index("hello")]
    for spaces in (True, False):
        assert user.decode(ids, spaces_between_special_tokens=spaces) == "hello the"
        assert user.decode(ids, skip_special_tokens=False, spaces_between_special_tokens=spaces) == \
            "<|im_start|>hello the"


@pytest.mark.parametrize("pre, pieces", [
    ("smollm", ["x", "Ġ", "2", "0", "2", "4"]),          # digits one by one, before gpt2's regex
    ("qwen2", ["x", "Ġ", "2", "0", "2", "4"]),           # \p{N}: one digit a word
    ("llama3", ["x", "Ġ", "202", "4"]),                  # \p{N}{1,3}: digits three at a time
    ("gpt2", ["x", "Ġ", "202", "4"]),                    # ` ?\p{N}+`: the space's own merge is missing
])
def test_a_gguf_s_pre_tokenizer_decides_which_digits_may_merge(tiny_gguf, pre, pieces):
    """tokenizer.ggml.pre picks the regex a text is split by before the merges, as llama.cpp
    picks it: with merges "2 0" and "20 2" in the vocabulary, "2024" is one digit a token where
    the split keeps digits apart (smollm, qwen2), and "202" + "4" where it lets three go together."""
    meta = dict(load_gguf(tiny_gguf).metadata)
    meta["tokenizer.ggml.tokens"] = [*meta["tokenizer.ggml.tokens"], "20", "202"]
    meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"], 1, 1]
    meta["tokenizer.ggml.merges"] = [*meta["tokenizer.ggml.merges"], "2 0", "20 2"]
    meta["tokenizer.ggml.pre"] = pre
    tok = Tokenizer.from_gguf_metadata(meta)
    ids = tok.encode("x 2024")
    assert [tok.id_to_token(i) for i in ids] == pieces
    assert tok.decode(ids) == "x 2024"


@pytest.mark.parametrize("key", ["unknown", "padding"])
def test_a_gguf_s_unknown_and_padding_tokens_are_special_whatever_their_type(tiny_gguf, key):
    """The tokens tokenizer.ggml.unknown_token_id and padding_token_id name are special tokens
    even where the file types them NORMAL (as bos and eos are): matched whole in a text, and left
    out of it when special tokens are skipped."""
    meta = dict(load_gguf(tiny_gguf).metadata)
    meta["tokenizer.ggml.tokens"] = [*meta["tokenizer.ggml.tokens"], "<pad>"]
    meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"], 1]      # NORMAL
    pad = len(meta["tokenizer.ggml.tokens"]) - 1
    meta[f"tokenizer.ggml.{key}_token_id"] = pad
    tok = Tokenizer.from_gguf_metadata(meta)
    ids = tok.encode("hello<pad> the")
    assert pad in ids
    assert tok.decode(ids) == "hello the"
    assert tok.decode(ids, skip_special_tokens=False) == "hello<pad> the"


def test_a_folder_s_chat_template_jinja_is_its_template_over_the_config_s(tmp_path, tok):
    """A folder with a chat_template.jinja renders it, even where tokenizer_config.json still
    holds a chat_template (an older one the file replaced), as transformers and vLLM read it; a
    folder with the config's template alone renders that."""
    import json

    tok.tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                                 "chat_template": "CONFIG{{ messages[0].content }}"}))
    assert Tokenizer.from_hf_folder(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}]) == "CONFIGhi"
    (tmp_path / "chat_template.jinja").write_text("FILE{{ messages[0].content }}", encoding="utf-8")
    assert Tokenizer.from_hf_folder(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}]) == "FILEhi"
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert theirs.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "FILEhi"


def test_a_folder_s_end_tokens_come_from_its_tokenizer_and_generation_config_else_config(tmp_path, tok):
    """An answer ends at the tokenizer's eos token and at every eos_token_id that the folder's
    generation_config.json lists; a folder without that file, at config.json's (Llama 3.1's
    <|eot_id|> is in both lists): as transformers' generate and vLLM read a folder, config.json's
    list is not read where generation_config.json is, even one that lists none."""
    import json

    tok.tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    assert Tokenizer.from_hf_folder(tmp_path).eos_token_ids == frozenset({0, 2})
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1]}))
    assert Tokenizer.from_hf_folder(tmp_path).eos_token_ids == frozenset({1, 2})
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))
    assert Tokenizer.from_hf_folder(tmp_path).eos_token_ids == frozenset({2})


def test_a_folder_s_special_tokens_map_names_its_tokens_as_transformers_reads_it(tmp_path, tok):
    """A folder saved before tokenizer_config.json listed its added tokens may name bos, eos and pad in
    special_tokens_map.json alone: they are its tokens (the answer ends at that eos, a prompt starts
    with that bos, a template sees that pad), the map's over the config's, as transformers (and so
    vLLM) reads them; a config with added_tokens_decoder leaves the map unread, as there."""
    import json

    transformers = pytest.importorskip("transformers")
    tok.tk.save(str(tmp_path / "tokenizer.json"))
    config = {"add_bos_token": True, "chat_template": "{{ bos_token }}{{ messages[0].content }}{{ pad_token }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>", "lstrip": False, "normalized": False, "rstrip": False},
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))

    def both():
        ours, theirs = Tokenizer.from_hf_folder(tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
        assert (ours.bos_token, ours.eos_token) == (theirs.bos_token, theirs.eos_token)
        return ours, theirs

    ours, theirs = both()
    assert (ours.bos_token, ours.eos_token, ours.eos_token_id) == ("<|im_start|>", "<|im_end|>", 2)
    assert 2 in ours.eos_token_ids and ours.encode("the cat")[0] == 1
    hi = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(hi, add_generation_prompt=False) == "<|im_start|>hi<|endoftext|>" == \
        theirs.apply_chat_template(hi, tokenize=False)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}))
    assert both()[0].eos_token == "<|im_end|>"                          # the map's over the config's
    added = {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False} for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>",
                                                                "added_tokens_decoder": added}))
    ours, _ = both()
    assert (ours.bos_token, ours.eos_token) == (None, "<|endoftext|>")    # the map left unread


@pytest.mark.parametrize("config", [
    {"tokenizer_class": "Qwen2TokenizerFast"},                           # eos, unk and pad: <|endoftext|>
    {"tokenizer_class": "Qwen2TokenizerFast", "eos_token": "<|im_end|>"},  # the config's eos, the class's pad
    {"tokenizer_class": "Qwen2TokenizerFast", "pad_token": None},          # null: none, not the class's
    {"tokenizer_class": "GPT2Tokenizer"},                                # bos, eos and unk: <|endoftext|>
    {"tokenizer_class": "PreTrainedTokenizerFast"},                      # a class that names none
])
def test_a_token_neither_file_names_is_the_tokenizer_class_s_own_as_in_transformers(tmp_path, tok, config):
    """Where tokenizer_config.json and special_tokens_map.json leave a special token out, transformers'
    tokenizer class (the config's tokenizer_class) names its own (Qwen2's eos, unk and pad are
    <|endoftext|>): the folder's tokens are those (its answers end at that eos, a template sees them)."""
    import json

    transformers = pytest.importorskip("transformers")
    tok.tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = Tokenizer.from_hf_folder(tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (ours.bos_token, ours.eos_token) == (theirs.bos_token, theirs.eos_token)
    assert (ours.special_tokens.get("unk_token"), ours.special_tokens.get("pad_token")) == \
        (theirs.unk_token, theirs.pad_token)
    assert ours.eos_token_ids == ({ours.eos_token_id} if ours.eos_token else set())


def test_tokens_only_tokenizer_config_lists_are_added_as_transformers_adds_them(tmp_path, tok):
    """A token tokenizer_config.json's added_tokens_decoder lists that tokenizer.json lacks is matched
    whole in text, and one the config calls special (tokenizer.json: not) is left out of decoded
    text, as transformers (and so vLLM) loads the folder; a malformed list names the file."""
    import json

    from tokenizers import AddedToken

    transformers = pytest.importorskip("transformers")
    tk = type(tok.tk).from_str(tok.tk.to_str())
    tk.add_tokens([AddedToken("ĠĠ", special=False, normalized=False)])      # in the vocabulary, added: not special
    tk.save(str(tmp_path / "tokenizer.json"))
    spaces, new = tk.token_to_id("ĠĠ"), tk.get_vocab_size(with_added_tokens=True)

    def entry(text, special):
        return {"content": text, "special": special, "lstrip": False, "rstrip": False, "normalized": False,
                "single_word": False}

    listed = {str(i): entry(t, True) for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])}
    listed.update({str(spaces): entry("ĠĠ", True), str(new): entry("<tool>", True), str(new + 1): entry("[x]", False)})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                                 "added_tokens_decoder": listed}))
    ours, theirs = Tokenizer.from_hf_folder(tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "the<tool>cat[x]isĠĠ"
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == theirs.encode(text, add_special_tokens=False) and {new, new + 1, spaces} <= set(ids)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == "thecat[x]is"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"x": entry("a", True)}}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: added_tokens_decoder\['x'\] must be a token id"):
        Tokenizer.from_hf_folder(tmp_path)


def test_a_folder_whose_post_processor_adds_no_bos_starts_raw_prompts_without_it(tmp_path, tok):
    """A folder that names a bos token but neither says add_bos_token nor has a post-processor
    that puts it first (Qwen's) starts a prompt with the text itself, as transformers does."""
    import json

    tok.tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    ours = Tokenizer.from_hf_folder(tmp_path)
    assert ours.encode("the cat") == ours.encode("the cat", add_special_tokens=False)
    assert ours.encode("the cat")[0] != 1


def test_a_template_s_tojson_keeps_text_as_written_and_strftime_now_is_there(tok):
    """transformers' template globals: tojson writes non-ASCII text as it is (not \\u escapes, which
    would change the prompt's tokens), and strftime_now formats the current time."""
    tok.set_chat_template("{{ messages[0].content | tojson }}|{{ strftime_now('%Y') | length }}")
    assert tok.apply_chat_template([{"role": "user", "content": "día ✓"}], add_generation_prompt=False) == \
        '"día ✓"|4'


def test_a_folder_s_chat_template_json_is_its_template_where_no_jinja_is(tmp_path, tok):
    """A multimodal folder (Gemma 3 4B's, as its processor saved it) may keep the template in
    chat_template.json ({"chat_template": …}): it renders that, over tokenizer_config.json's
    (the processor's template, as vLLM prefers it); a chat_template.jinja still wins over both."""
    import json

    tok.tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "JSON{{ messages[0].content }}"}))
    hi = [{"role": "user", "content": "hi"}]
    assert Tokenizer.from_hf_folder(tmp_path).apply_chat_template(hi) == "JSONhi"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                                 "chat_template": "CONFIG{{ messages[0].content }}"}))
    assert Tokenizer.from_hf_folder(tmp_path).apply_chat_template(hi) == "JSONhi"
    (tmp_path / "chat_template.jinja").write_text("FILE{{ messages[0].content }}", encoding="utf-8")
    assert Tokenizer.from_hf_folder(tmp_path).apply_chat_template(hi) == "FILEhi"


def test_a_chat_template_sees_the_folder_s_other_special_tokens_as_transformers_passes_them(tmp_path, tok):
    """A template that writes pad_token, unk_token or a model's own named token (image_token) renders
    them as transformers' apply_chat_template does (its special_tokens_map), not as empty; a name the
    config leaves out (sep_token) stays undefined in both; a variable the request gives wins."""
    import json

    transformers = pytest.importorskip("transformers")
    tok.tk.save(str(tmp_path / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}{{ m.content }}{{ pad_token }}{% endfor %}[{{ unk_token }}]"
                "[{{ image_token }}][{{ sep_token is defined }}][{{ mask_token }}]{{ eos_token }}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
        "pad_token": "<pad>", "unk_token": {"__type": "AddedToken", "content": "<unk>", "special": True},
        "mask_token": "<|im_end|>", "image_token": "<img>", "chat_template": template}))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ours = Tokenizer.from_hf_folder(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    want = theirs.apply_chat_template(messages, tokenize=False)
    assert "<pad>" in want and "[<unk>][<img>][False][<|im_end|>]" in want
    assert ours.apply_chat_template(messages) == want
    assert ours.apply_chat_template(messages, pad_token="|") == theirs.apply_chat_template(
        messages, tokenize=False, pad_token="|")


def test_max_tokens_bounds_the_ids_of_any_text_from_its_bytes_and_is_none_where_a_normalizer_may_lengthen_it(
        tmp_path, tok):
    """Tokenizer.max_tokens: a byte-level BPE's and a SentencePiece's (its ▁ before the text, its
    byte fallback) ids of any text, special tokens and their text included, are never more than it
    says; a normalizer that may lengthen a text (NFKC: 'ﷺ' is 18 characters) gives no bound."""
    import random

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import normalizers

    from pipeline_dsl.engine.models import load_model
    from tiny_model import write_tiny_gguf

    spm = load_model(str(write_tiny_gguf(tmp_path / "spm.gguf", tokenizer="spm")), dtype="fp32")[1]
    rng = random.Random(0)
    for t in (tok, spm):
        pieces = list("ab 1\n.") + ["é", "中", "😀", "\u0301", "▁", "  "] + list(t.added.values())
        for _ in range(1000):
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
            for special in (True, False):
                assert len(t.encode(text, add_special_tokens=special)) <= t.max_tokens(text, special), text
    assert spm.max_tokens("1") == 1 + 1 + spm.add_bos                      # "▁", "1": the prefix counts
    nfkc = HFTokenizer.from_str(tok.tk.to_str())
    nfkc.normalizer = normalizers.NFKC()
    assert Tokenizer(nfkc, bos_token=None, eos_token=None, eos_token_ids=(), chat_template=None).max_tokens("ﷺ") is None


def test_an_engines_bound_on_a_conversation_is_never_below_the_ids_it_gives(tmp_path):
    """Engine.prompt_tokens_at_most, the bound agp serve checks a chat request against before
    tokenising it: a conversation's as its chat template renders it (every turn's markers, the
    tools, a continued last message, or the contents joined without a template, the start token
    with them) is never below the ids prompt_ids gives it, for a byte-level BPE's and a
    SentencePiece's vocabulary; messages the template cannot render give no bound."""
    import random

    from tiny_model import tiny_engine, write_tiny_gguf

    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}}}}}
    rng = random.Random(0)
    pieces = list("ab 1\n.") + ["é", "中", "😀", "▁", "  ", "<|im_start|>"]
    for kind in ("bpe", "spm"):
        engine = tiny_engine(write_tiny_gguf(tmp_path / f"{kind}.gguf", tokenizer=kind, add_bos=kind == "spm"))
        for i in range(200):
            messages = [{"role": ("user", "assistant")[j % 2],
                         "content": "x" + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 20)))}
                        for j in range(rng.randint(1, 6))]
            how = [{}, {"tools": [tool], "tool_choice": "required"}, {"chat_template": False},
                   {"add_generation_prompt": False, "continue_final_message": True}][i % 4]
            ids = engine.prompt_ids(messages=messages, allow_empty=True, **how)
            assert len(ids) <= engine.prompt_tokens_at_most(messages=messages, **how), (kind, messages, how)
        assert engine.prompt_tokens_at_most(messages=[{"role": "user"}]) is None
