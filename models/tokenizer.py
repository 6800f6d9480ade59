"""Text <-> token ids for every model RadixLM serves, built from a GGUF file or a HF tokenizer directory.

    tok = Tokenizer.load("SmolLM2-135M-Instruct.Q4_1.gguf")      # or a directory with tokenizer.json
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])   # prompt ids, template applied
    detok = tok.detokenizer(ids)                                  # streams generated text
    text = detok.step([next_id]) ... + detok.flush()

Two backends sit behind one interface:
- `tokenizers.Tokenizer` (HF, Rust): a directory's `tokenizer.json`, or a GGUF `gpt2` vocabulary (byte-level
  BPE) rebuilt from its tokens, merges and token types with the pre-tokenizer llama.cpp uses for it, or a
  directory's tiktoken vocabulary (Kimi's `tiktoken.model`: ranks only) rebuilt as byte-level BPE with the merges
  tiktoken's ranks imply and the split regex of the tokenizer class its tokenizer_config.json names.
- `sentencepiece.SentencePieceProcessor`: a directory's `tokenizer.model`, or a GGUF `llama` / `t5`
  vocabulary (SentencePiece BPE / unigram) rebuilt as a SentencePiece ModelProto from tokens, scores, types.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from typing import Any, Iterable, Sequence

from models.chat_template import render_chat_template
from models.detokenizer import IncrementalDetokenizer, StreamDetokenizer

# GGUF token types (llama.cpp `llama_token_type`); SentencePiece uses the same numbers.
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED, _TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Control tokens that end a turn or a generation, by text (llama.cpp marks the same ones end-of-generation).
_END_OF_TURN_TOKENS = frozenset({
    "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "<|return|>", "<|call|>", "<｜end▁of▁sentence｜>",
})  # fmt: skip



def _turn_ends(stop_ids: set[int], text_of: dict[int, str]) -> set[int]:
    """`stop_ids` but harmony's <|end|> (gpt-oss), which ends each message inside a reply (the thinking, then the
    answer): a vocabulary with <|return|> and <|call|> ends its replies with those (as llama.cpp does for it)."""
    texts = {text_of.get(i) for i in stop_ids}
    if {"<|return|>", "<|call|>"} <= texts:
        return {i for i in stop_ids if text_of.get(i) != "<|end|>"}
    return stop_ids


# Pre-tokenizer splits for GGUF byte-level vocabularies, by `tokenizer.ggml.pre` (regexes as llama.cpp's
# llama-vocab.cpp). Each entry: (isolate single digits first, main split regex).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# o200k's (GPT-4o, gpt-oss, Llama 4): words split at case changes, a contraction kept with its word, "/" after
# punctuation
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Kimi's (K2, K2.5, Kimi Linear: tokenization_kimi.py): o200k's split with runs of Han characters split off first
# (and taken out of the letter classes)
_NOT_HAN = "&&[^\\p{Han}]"
_KIMI_SPLIT = (
    r"[\p{Han}]+"
    rf"|[^\r\n\p{{L}}\p{{N}}]?[\p{{Lu}}\p{{Lt}}\p{{Lm}}\p{{Lo}}\p{{M}}{_NOT_HAN}]*[\p{{Ll}}\p{{Lm}}\p{{Lo}}\p{{M}}{_NOT_HAN}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?[\p{{Lu}}\p{{Lt}}\p{{Lm}}\p{{Lo}}\p{{M}}{_NOT_HAN}]+[\p{{Ll}}\p{{Lm}}\p{{Lo}}\p{{M}}{_NOT_HAN}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_PRE_TOKENIZERS: dict[str, tuple[bool, str]] = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "phi-2", "roberta-bpe"), (False, _GPT2_SPLIT)),
    # NOTE: StarCoder-family vocabularies (SmolLM among them) isolate every digit before the GPT-2 split, as
    # their tokenizer.json does (Digits(individual_digits) + ByteLevel) and llama.cpp does.
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone"), (True, _GPT2_SPLIT)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "glm4", "chatglm-bpe"),
                    (False, _LLAMA3_SPLIT)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), (False, _QWEN2_SPLIT)),
    **dict.fromkeys(("gpt-4o", "llama4"), (False, _GPT4O_SPLIT)),
}

# tiktoken vocabularies (a ranks file, no merges) name their split regex only in their tokenizer's Python code: by the
# class tokenizer_config.json names.
_TIKTOKEN_SPLITS = {"TikTokenTokenizer": _KIMI_SPLIT}  # Kimi K2 / K2.5 / Kimi Linear (tokenization_kimi.py)
# Tokenizer classes whose apply_chat_template sorts the keys of the tools' schemas, at every depth, before the
# template renders them (the order the model was trained on)
_SORTS_TOOLS = frozenset({"TikTokenTokenizer"})

_NO_BOS_PRE_TOKENIZERS = ("glm4", "chatglm-bpe")  # GLM-4's GGUFs (GLM-4.5 too): no BOS added, as llama.cpp reads them
_SP_MODEL_TYPES = {"llama": "BPE", "t5": "UNIGRAM"}  # GGUF tokenizer.ggml.model -> SentencePiece model type


# ----------------------------------------------------------------------------------------------------------
# Backends: encode(text, add_special_tokens) -> ids, decode(ids, skip_special_tokens) -> text.


class _HFBackend:
    """A `tokenizers.Tokenizer`; its post-processor adds BOS/EOS when add_special_tokens is set."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # NOTE: encode_batch lets go of the GIL while it runs (encode holds it), so a server or router thread
        # tokenizing a long prompt leaves the event loop free to send other streams; the ids are encode's.
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_pair(self, first: str, second: str) -> list[int]:
        return self.tokenizer.encode(first, second, add_special_tokens=True).ids  # its post-processor's pair template

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def special_tokens(self) -> dict[int, str]:
        return {i: t.content for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}

    def piece_bytes(self) -> list[bytes] | None:
        return None  # the tokenizer JSON says it (byte-level BPE, metaspace, ...)


class _SentencePieceBackend:
    """A `SentencePieceProcessor`, plus special-token matching in text (SentencePiece never matches control
    pieces in text; HF tokenizers do) and the dummy-prefix rule applied once per text, not per segment."""

    def __init__(self, processor, *, special: dict[str, int], add_bos_id, add_eos_id, add_space_prefix: bool):
        self.processor = processor
        self.vocab_size = processor.get_piece_size()
        self._special = special  # text -> id, matched whole in input text
        self._special_ids = {i: t for t, i in special.items()}
        self._split = (
            re.compile("(" + "|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)) + ")")
            if special
            else None
        )
        self._add_bos_id, self._add_eos_id = add_bos_id, add_eos_id
        self._add_space_prefix = add_space_prefix

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [self._add_bos_id] if add_special_tokens and self._add_bos_id is not None else []
        segments = self._split.split(text) if self._split else [text]
        for n, segment in enumerate(segments):
            if n % 2 == 1:  # a matched special token
                ids.append(self._special[segment])
            elif segment:
                if n == 0 and self._add_space_prefix:
                    segment = " " + segment
                ids.extend(self.processor.encode(segment))
        if add_special_tokens and self._add_eos_id is not None:
            ids.append(self._add_eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        # Runs of ordinary ids go through SentencePiece (byte fallback joins split characters); special ids
        # become their text, or nothing.
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self._special_ids or self.processor.is_control(i):
                if run:
                    parts.append(self.processor.decode(run))
                    run = []
                if not skip_special_tokens:
                    parts.append(self._special_ids.get(i) or self.processor.id_to_piece(i))
            else:
                run.append(i)
        if run:
            parts.append(self.processor.decode(run))
        text = "".join(parts)
        if self._add_space_prefix and text.startswith(" "):
            text = text[1:]
        return text

    def token_to_id(self, token: str) -> int | None:
        if token in self._special:
            return self._special[token]
        i = self.processor.piece_to_id(token)
        return None if i == self.processor.unk_id() and token != self.processor.id_to_piece(i) else i

    def special_tokens(self) -> dict[int, str]:
        return dict(self._special_ids)

    def piece_bytes(self) -> list[bytes]:
        """The bytes each id stands for inside a text: "▁" is a space, <0xNN> pieces are byte NN, control
        and special pieces are empty."""
        p = self.processor
        out = []
        for i in range(self.vocab_size):
            if p.is_byte(i):
                out.append(bytes([int(p.id_to_piece(i)[3:5], 16)]))
            elif i in self._special_ids or p.is_control(i) or p.is_unknown(i):
                out.append(b"")
            else:
                out.append(p.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out


# ----------------------------------------------------------------------------------------------------------


class Tokenizer:
    """Encode, decode, chat templates and streaming detokenization for one model."""

    def __init__(
        self,
        backend: _HFBackend | _SentencePieceBackend,
        *,
        bos_id: int | None,
        eos_id: int | None,
        stop_ids: Iterable[int] = (),
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        source: str = "",
        sorts_tools: bool = False,
    ):
        self._backend = backend
        self.vocab_size: int = backend.vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.stop_ids: frozenset[int] = frozenset(stop_ids) | ({eos_id} if eos_id is not None else set())
        self.chat_template = chat_template
        self._template_tokens = special_tokens or {}  # bos_token, eos_token, ... -> text, for templates
        self._source = source
        self._sorts_tools = sorts_tools

    def __repr__(self) -> str:
        return f"Tokenizer({self._source!r}, vocab_size={self.vocab_size})"

    def with_chat_template(self, template: str) -> Tokenizer:
        """A copy that renders chats with `template` (model.chat_template) instead of the model's own."""
        other = copy.copy(self)
        other.chat_template = template
        return other

    # --- loading ------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """A `.gguf` file or a HF tokenizer directory."""
        path = os.fspath(path)
        if os.path.isdir(path):
            return cls.from_pretrained_dir(path)
        if os.path.isfile(path):
            return cls.from_gguf(path)
        raise FileNotFoundError(f"No tokenizer at {path!r}: expected a .gguf file or a directory with tokenizer.json")

    @classmethod
    def word_level(cls, vocab_size: int) -> Tokenizer:
        """A word-level vocabulary of "w3".."w{vocab_size - 1}" after <s>, </s> and [UNK], for random models where no
        tokenizer files are (benchmarks and tests on a GPU machine, which has `tokenizers` but no model packages)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models as hf_models
        from tokenizers import pre_tokenizers

        vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
        hf = HFTokenizer(hf_models.WordLevel(vocab, unk_token="[UNK]"))
        hf.pre_tokenizer = pre_tokenizers.Whitespace()
        return cls(_HFBackend(hf), bos_id=0, eos_id=1, source=f"word-level vocabulary of {vocab_size}")

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        path = os.fspath(path)
        meta = _read_gguf_tokenizer_metadata(path)
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if model is None or tokens is None:
            missing = "tokenizer.ggml.model" if model is None else "tokenizer.ggml.tokens"
            raise ValueError(f"{path}: GGUF has no tokenizer metadata (field {missing!r} missing)")
        token_types = meta.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)

        def token_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        bos_id, eos_id = token_id("bos_token_id"), token_id("eos_token_id")
        # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise, and never to GLM-4's (their
        # chat template writes [gMASK]<sop> itself; the converter names <|endoftext|> BOS).
        add_bos = (bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
                   and meta.get("tokenizer.ggml.pre") not in _NO_BOS_PRE_TOKENIZERS)
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        if model == "gpt2":
            backend = _HFBackend(_byte_level_bpe_from_gguf(path, meta, tokens, token_types, bos_id, eos_id,
                                                           add_bos, add_eos))  # fmt: skip
        elif model in _SP_MODEL_TYPES:
            backend = _sentencepiece_from_gguf(path, meta, model, tokens, token_types, bos_id, eos_id,
                                               token_id("unknown_token_id"), add_bos, add_eos)  # fmt: skip
        else:
            raise ValueError(
                f"{path}: unsupported tokenizer model {model!r} (tokenizer.ggml.model); "
                f"supported: {sorted(['gpt2', *_SP_MODEL_TYPES])}"
            )

        names = {"bos_token": bos_id, "eos_token": eos_id, "unk_token": token_id("unknown_token_id"),
                 "pad_token": token_id("padding_token_id")}  # fmt: skip
        stop_ids = {token_id(k) for k in ("eot_token_id", "eom_token_id")} - {None}
        stop_ids |= {i for i, (t, k) in enumerate(zip(tokens, token_types))
                     if k == _TOKEN_CONTROL and t in _END_OF_TURN_TOKENS}  # fmt: skip
        stop_ids = _turn_ends(stop_ids, {i: tokens[i] for i in stop_ids if 0 <= i < len(tokens)})
        return cls(
            backend,
            bos_id=bos_id,
            eos_id=eos_id,
            stop_ids=stop_ids,
            chat_template=meta.get("tokenizer.chat_template"),
            special_tokens={name: tokens[i] for name, i in names.items() if i is not None},
            source=path,
        )

    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """A HF directory: `tokenizer.json` (preferred) or `tokenizer.model`, with `tokenizer_config.json`
        (special tokens, add_bos_token, chat template), `chat_template.jinja` and `generation_config.json`
        (extra eos ids) when present."""
        path = os.fspath(path)
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        names = {
            name: _token_text(config.get(name))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if _token_text(config.get(name)) is not None
        }
        json_path, sp_path = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
        if os.path.isfile(json_path):
            backend = _hf_backend_from_json(json_path, config, names)
        elif os.path.isfile(sp_path):
            backend = _sentencepiece_backend_from_file(sp_path, config, names)
        elif tiktoken_path := _tiktoken_file(path):
            backend = _HFBackend(_byte_level_bpe_from_tiktoken(tiktoken_path, config, names))
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json, tokenizer.model or tiktoken vocabulary (tiktoken.model, "
                                    "*.tiktoken) found")

        ids = {name: backend.token_to_id(text) for name, text in names.items()}
        special = backend.special_tokens()
        stop_ids = _turn_ends({i for i, t in special.items() if t in _END_OF_TURN_TOKENS}, special)
        eos_ids = _read_json(os.path.join(path, "generation_config.json")).get("eos_token_id")
        stop_ids |= set(eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else [])
        return cls(
            backend,
            bos_id=ids.get("bos_token"),
            eos_id=ids.get("eos_token"),
            stop_ids=stop_ids,
            chat_template=_dir_chat_template(path, config),
            special_tokens=names,
            source=path,
            sorts_tools=_tokenizer_class(config) in _SORTS_TOOLS,
        )

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes an HF-style directory that `from_pretrained_dir` loads back to an identical tokenizer."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        config: dict[str, Any] = {k: v for k, v in self._template_tokens.items()}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        if self._sorts_tools:  # what the tool sorting is known by
            config["tokenizer_class"] = min(_SORTS_TOOLS)
        backend = self._backend
        if isinstance(backend, _HFBackend):
            backend.tokenizer.save(os.path.join(path, "tokenizer.json"))  # its post-processor keeps BOS/EOS rules
        else:
            from sentencepiece import sentencepiece_model_pb2 as sp_pb2

            proto = sp_pb2.ModelProto()
            proto.ParseFromString(backend.processor.serialized_model_proto())
            proto.normalizer_spec.add_dummy_prefix = backend._add_space_prefix
            with open(os.path.join(path, "tokenizer.model"), "wb") as f:
                f.write(proto.SerializeToString())
            config["add_bos_token"] = backend._add_bos_id is not None
            config["add_eos_token"] = backend._add_eos_id is not None
            config["added_tokens_decoder"] = {str(i): {"content": t, "special": True} for i, t in backend.special_tokens().items()}
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=1)
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": sorted(self.stop_ids)}, f)

    # --- text <-> ids -------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. "<|im_start|>") map to their ids;
        BOS (EOS) is added only when the model asks for it and `add_special_tokens` is set."""
        return self._backend.encode(text, add_special_tokens)

    def encode_pair(self, first: str, second: str) -> list[int]:
        """Token ids of a text pair (a cross-encoder's query and document), as transformers' `tokenizer(first,
        second)` gives them: each text encoded alone, joined by the tokenizer's pair template (a SentencePiece
        vocabulary: the first with BOS / EOS as `encode` adds them, the second after it as is). The first's ids are the
        same whatever follows, so pairs sharing it share a cached prefix."""
        if isinstance(self._backend, _HFBackend):
            return self._backend.encode_pair(first, second)
        return self._backend.encode(first, True) + self._backend.encode(second, False)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token given as its text (a special token's, e.g. "<start_of_image>"); None where there is none."""
        return self._backend.token_to_id(token)

    def hf_json(self) -> str | None:
        """The HF `tokenizers` JSON of this tokenizer (None for the SentencePiece backend)."""
        return self._backend.tokenizer.to_str() if isinstance(self._backend, _HFBackend) else None

    def piece_bytes(self) -> list[bytes] | None:
        """For the SentencePiece backend, the bytes each id stands for inside a text (None for HF tokenizers)."""
        return self._backend.piece_bytes()

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._backend.special_tokens())

    @functools.cached_property
    def special_texts(self) -> frozenset[str]:
        """The special tokens' texts (what decoding with skip_special_tokens drops)."""
        return frozenset(self._backend.special_tokens().values())

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(ids, skip_special_tokens)

    def detokenizer(self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
                    ) -> IncrementalDetokenizer | StreamDetokenizer:
        """A streaming decoder for the ids generated after `prompt_ids` (special tokens skipped unless
        `skip_special_tokens` is False): `tokenizers`' own for HF tokenizers, ours for SentencePiece."""
        if isinstance(self._backend, _HFBackend):
            return StreamDetokenizer(self._backend.tokenizer, prompt_ids, skip_special_tokens)
        return IncrementalDetokenizer(lambda ids: self._backend.decode(ids, skip_special_tokens), prompt_ids)

    # --- chat -----------------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool | None = None,
        continue_final_message: bool = False, **kwargs: Any
    ) -> str:
        """The conversation as the model's template writes it, ending with the assistant's turn opened
        (`add_generation_prompt`, by default unless continuing), or with `continue_final_message` inside the last
        message, an assistant's, so that the model goes on writing it (a prefilled reply: Anthropic's assistant
        prefill, vLLM's flag)."""
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        if not self.chat_template:
            raise ValueError(
                f"{self._source}: the model defines no chat template (GGUF tokenizer.chat_template / "
                "tokenizer_config.json chat_template / chat_template.jinja)"
            )
        if continue_final_message:
            if add_generation_prompt:
                raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
            final = messages[-1] if messages else {}
            if final.get("role") != "assistant" or not isinstance(final.get("content"), str) \
                    or not final["content"].strip():
                raise ValueError("continue_final_message: the last message must be an assistant's, with text")
        if self._sorts_tools and kwargs.get("tools"):
            kwargs["tools"] = _keys_sorted(kwargs["tools"])
        text = render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self._template_tokens,
            **kwargs,
        )
        return _open_final_message(text, messages[-1]["content"]) if continue_final_message else text

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool | None = None,
                    **kwargs) -> list[int]:
        # NOTE: templates write BOS themselves when the model wants it, so (as transformers'
        # apply_chat_template(tokenize=True) does) no special tokens are added on top.
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)


def _keys_sorted(value):
    """`value` with every dict's keys in sorted order, at every depth."""
    if isinstance(value, dict):
        return {k: _keys_sorted(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_keys_sorted(v) for v in value]
    return value


def _open_final_message(text: str, content: str) -> str:
    """`text` (a rendered conversation) cut right after the last message's `content`: whatever the template writes to
    close the turn goes. Templates that strip a message's surrounding whitespace are followed: the cut comes after
    the content as it was rendered."""
    core = content.strip()
    at = text.rfind(core)
    if at < 0:
        raise ValueError("continue_final_message: the chat template does not write the last message's text verbatim")
    end = at + len(core)
    trailing = content[len(content.rstrip()):]
    if trailing and text.startswith(trailing, end):  # the template kept the message's trailing whitespace
        end += len(trailing)
    return text[:end]


# ----------------------------------------------------------------------------------------------------------
# GGUF


def _read_gguf_tokenizer_metadata(path: str) -> dict[str, Any]:
    """The `tokenizer.*` key-value pairs of a GGUF file, from its header only (no tensor is touched)."""
    from models.gguf_loader import read_gguf

    meta, _ = read_gguf(path, tensors=False)
    return {k: v for k, v in meta.items() if k.startswith("tokenizer.")}


def _byte_level_bpe_from_gguf(path, meta, tokens, token_types, bos_id, eos_id, add_bos, add_eos):
    """A `tokenizers.Tokenizer` for a GGUF `gpt2` vocabulary: byte-level BPE from the file's merges, control
    tokens as special tokens, user-defined ones as added tokens, BOS/EOS added as the file says."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _GGUF_PRE_TOKENIZERS:
        raise ValueError(
            f"{path}: unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: {sorted(_GGUF_PRE_TOKENIZERS)}"
        )
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise ValueError(f"{path}: byte-level BPE vocabulary without merges (tokenizer.ggml.merges missing)")

    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    tokenizer = HFTokenizer(
        models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    )
    isolate_digits, split = _GGUF_PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if isolate_digits else []
    steps += [
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()

    # Byte-level tokens are spelled in the 256-character byte alphabet; a "control" token outside it is a
    # converter mislabel (it could never be produced), so it is not matched in text.
    alphabet = _byte_level_alphabet()
    tokenizer.add_special_tokens([
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, token_types) if k == _TOKEN_CONTROL and set(t) <= alphabet
    ])  # fmt: skip
    tokenizer.add_tokens([
        AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types) if k == _TOKEN_USER_DEFINED
    ])  # fmt: skip
    tokenizer.post_processor = _bos_eos_processor(
        (tokens[bos_id], bos_id) if add_bos and bos_id is not None else None,
        (tokens[eos_id], eos_id) if add_eos and eos_id is not None else None,
    )
    return tokenizer


def _bos_eos_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None):
    """A post-processor writing `bos` (text, id) before and `eos` after the text; None: not written."""
    from tokenizers import processors

    pieces = [*([bos[0]] if bos else []), "$A", *([eos[0]] if eos else [])]
    specials = list(dict(t for t in (bos, eos) if t).items())
    return processors.TemplateProcessing(single=pieces, pair=[*pieces, "$B:1"], special_tokens=specials)


def _byte_level_alphabet() -> set[str]:
    return set(_byte_level_chars())


@functools.cache
def _byte_level_chars() -> tuple[str, ...]:
    """GPT-2's reversible byte -> printable character map, by byte: printable Latin-1 bytes stand for themselves,
    the other 68 bytes are shifted to U+0100 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return tuple(chr(b) if b in printable else chr(next(shifted)) for b in range(256))


def _sentencepiece_from_gguf(path, meta, model, tokens, token_types, bos_id, eos_id, unk_id, add_bos, add_eos):
    """A SentencePiece model rebuilt from a GGUF `llama` (BPE) or `t5` (unigram) vocabulary."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    proto = sp_pb2.ModelProto()
    proto.trainer_spec.model_type = getattr(sp_pb2.TrainerSpec, _SP_MODEL_TYPES[model])
    proto.trainer_spec.vocab_size = len(tokens)
    proto.trainer_spec.byte_fallback = any(k == _TOKEN_BYTE for k in token_types)
    proto.trainer_spec.unk_id = unk_id if unk_id is not None else 0
    proto.trainer_spec.bos_id = bos_id if bos_id is not None else -1
    proto.trainer_spec.eos_id = eos_id if eos_id is not None else -1
    proto.trainer_spec.pad_id = -1
    # The dummy prefix is applied by the backend (once per text, not once per segment between special tokens).
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.escape_whitespaces = True
    proto.normalizer_spec.remove_extra_whitespaces = bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False))
    if meta.get("tokenizer.ggml.precompiled_charsmap"):
        proto.normalizer_spec.name = "nmt_nfkc"
        proto.normalizer_spec.precompiled_charsmap = meta["tokenizer.ggml.precompiled_charsmap"]

    special: dict[str, int] = {}
    for i, (token, kind, score) in enumerate(zip(tokens, token_types, scores)):
        kind = int(kind)
        if kind in (_TOKEN_NORMAL, _TOKEN_USER_DEFINED):
            # NOTE: llama.cpp's converter writes U+2581 in user-defined pieces (Gemma's space runs) as real
            # spaces; SentencePiece matches pieces in whitespace-escaped text, so restore U+2581.
            token = token.replace(" ", "\u2581")
        if kind == _TOKEN_CONTROL:
            special[token] = i
        piece = proto.pieces.add()
        piece.piece, piece.score = token, float(score)
        piece.type = kind if kind in (1, 2, 3, 4, 5, 6) else _TOKEN_NORMAL
    if unk_id is None and not any(p.type == _TOKEN_UNKNOWN for p in proto.pieces):
        raise ValueError(f"{path}: SentencePiece vocabulary without an unknown token")

    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto.SerializeToString())
    return _SentencePieceBackend(
        processor,
        special=special,
        add_bos_id=bos_id if add_bos else None,
        add_eos_id=eos_id if add_eos else None,
        add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
    )


def _tokenizer_class(config: dict) -> str | None:
    """The tokenizer class tokenizer_config.json names: `tokenizer_class`, else the class its `auto_map` points
    AutoTokenizer to (`tokenization_kimi.TikTokenTokenizer` -> TikTokenTokenizer)."""
    auto = (config.get("auto_map") or {}).get("AutoTokenizer")
    auto = auto[0] if isinstance(auto, list) and auto else auto
    return config.get("tokenizer_class") or (auto.rsplit(".", 1)[-1] if isinstance(auto, str) else None)


def _tiktoken_file(path: str) -> str | None:
    """A directory's tiktoken vocabulary: `tiktoken.model` (Kimi) or a `*.tiktoken` file; None where there is none."""
    names = sorted(n for n in os.listdir(path) if n == "tiktoken.model" or n.endswith(".tiktoken"))
    return os.path.join(path, names[0]) if names else None


def _read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """A tiktoken vocabulary file: a line per token, its bytes in base64 then its rank (merge priority and id)."""
    import base64
    import binascii

    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(f"{path}:{n}: not a tiktoken vocabulary line (base64 token, space, rank): "
                                 f"{line[:80]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the ranks of a tiktoken vocabulary must be 0..{len(ranks) - 1}, each once")
    return ranks


def _tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges that rebuild a tiktoken vocabulary as BPE, in rank order: each token of two or more bytes is the
    pair its own bytes reach when merged as tiktoken merges them (the lowest-ranked adjacent pair first) with only
    the tokens ranked below it."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            best = min(pair_ranks)
            if best >= rank:
                break
            at = pair_ranks.index(best)
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def _byte_level_bpe_from_tiktoken(path: str, config: dict, names: dict[str, str]):
    """A `tokenizers.Tokenizer` for a tiktoken vocabulary (Kimi's `tiktoken.model`), encoding as tiktoken does: the
    tokenizer's split regex, byte-level BPE over the ranks (a piece that is a token whole stays whole), then the
    special tokens after the ranks, named by tokenizer_config.json's added_tokens_decoder (gaps filled with
    `<|reserved_token_ID|>`, as the model's own tokenizer names them)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    cls = _tokenizer_class(config)
    if cls not in _TIKTOKEN_SPLITS:
        raise ValueError(f"{path}: a tiktoken vocabulary's split regex is known by its tokenizer class; "
                         f"tokenizer_config.json names {cls!r} (supported: {sorted(_TIKTOKEN_SPLITS)})")
    ranks = _read_tiktoken_ranks(path)
    chars = _byte_level_chars()

    def spell(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    try:
        merges = _tiktoken_merges(ranks)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    tokenizer = HFTokenizer(models.BPE(
        vocab={spell(t): r for t, r in ranks.items()}, merges=[(spell(a), spell(b)) for a, b in merges],
        fuse_unk=False, ignore_merges=True,
    ))  # fmt: skip
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_TIKTOKEN_SPLITS[cls]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()

    added = {int(i): t for i, t in (config.get("added_tokens_decoder") or {}).items()}
    if added and min(added) < len(ranks):
        raise ValueError(f"{path}: added token {min(added)} ({added[min(added)].get('content')!r}) falls inside the "
                         f"vocabulary's {len(ranks)} ranks")
    for i in range(len(ranks), max(added, default=len(ranks) - 1) + 1):
        token = added.get(i, {"content": f"<|reserved_token_{i}|>", "special": True})
        tokenizer.add_tokens([AddedToken(token["content"], special=bool(token.get("special", True)), normalized=False)])
        if tokenizer.token_to_id(token["content"]) != i:
            raise ValueError(f"{path}: added token {i} ({token['content']!r}) is named twice")
    tokenizer.post_processor = _bos_eos_processor(*(
        (names[name], tokenizer.token_to_id(names[name])) if config.get(f"add_{name}") and name in names else None
        for name in ("bos_token", "eos_token")
    ))  # fmt: skip
    return tokenizer


# ----------------------------------------------------------------------------------------------------------
# HF directories


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(value) -> str | None:
    # tokenizer_config.json writes a special token as its text or as an AddedToken dict.
    return value.get("content") if isinstance(value, dict) else value


def _dir_chat_template(path: str, config: dict) -> str | None:
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template") or _read_json(os.path.join(path, "chat_template.json")).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


def _hf_backend_from_json(json_path: str, config: dict, names: dict[str, str]) -> _HFBackend:
    from tokenizers import Tokenizer as HFTokenizer

    tokenizer = HFTokenizer.from_file(json_path)
    # As transformers: an explicit add_bos_token / add_eos_token in the config (or no post-processor at all)
    # replaces the tokenizer.json post-processor with BOS? $A EOS?.
    if "add_bos_token" in config or "add_eos_token" in config or tokenizer.post_processor is None:
        bos, eos = (
            (names[name], tokenizer.token_to_id(names[name]))
            if config.get(f"add_{name}") and tokenizer.token_to_id(names.get(name, "")) is not None
            else None
            for name in ("bos_token", "eos_token")
        )
        tokenizer.post_processor = _bos_eos_processor(bos, eos)
    return _HFBackend(tokenizer)


def _sentencepiece_backend_from_file(sp_path: str, config: dict, names: dict[str, str]) -> _SentencePieceBackend:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    with open(sp_path, "rb") as f:
        proto.ParseFromString(f.read())
    add_space_prefix = proto.normalizer_spec.add_dummy_prefix
    proto.normalizer_spec.add_dummy_prefix = False  # applied by the backend, see _SentencePieceBackend
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto.SerializeToString())

    special = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == _TOKEN_CONTROL}
    for i, token in (config.get("added_tokens_decoder") or {}).items():
        if token.get("special"):
            special[token["content"]] = int(i)
    bos = processor.piece_to_id(names["bos_token"]) if "bos_token" in names else processor.bos_id()
    eos = processor.piece_to_id(names["eos_token"]) if "eos_token" in names else processor.eos_id()
    return _SentencePieceBackend(
        processor,
        special=special,
        add_bos_id=bos if config.get("add_bos_token", True) and bos >= 0 else None,
        add_eos_id=eos if config.get("add_eos_token", False) and eos >= 0 else None,
        add_space_prefix=add_space_prefix,
    )
