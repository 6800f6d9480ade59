"""Qwen2-VL, Qwen2.5-VL, Qwen3.5 and Qwen3-VL end to end: tiny random checkpoints written by transformers, served by the
engine from their directories (models/qwen_vision.py's tower, engine/qwen_images.py's processor, M-RoPE in
models/llama.py with the positions of engine.multimodal.mrope_positions), against transformers' own forward on the
same patches.

What must hold: the M-RoPE positions of any window of a prompt, and of the tokens generated after it, are
transformers' get_rope_index's; greedy tokens are transformers' argmax (teacher-forced, so the tokens after the
prompt take its shifted positions) with one or two images of different sizes per prompt, whole or split across
prefill chunks; a second question about the same image reuses its pages and features and gives the tokens a cold
engine gives; a chat with image parts renders the template's placeholder and answers as the prepared prompt does.
"""
import numpy as np
import pytest

import fresh
from dense_reference import assert_argmax
from test_multimodal import PAGE, _llm, perturbed, save_checkpoint  # (engines on checkpoint directories, pages of 8)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

IMAGE_TOKEN = 49152  # <|image_pad|>, after SmolLM2's 49,152 ids
# 4 to 30 positions an image, each a cell of 2 x 2 patches (14 pixels; Qwen3.5: 16)
CELLS = (4, 30)
# Qwen2-VL's template shape: an image part as <|vision_start|><|image_pad|><|vision_end|> (here plain-text markers
# around the one special token)
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for part in m['content'] %}"
            "{% if part['type'] == 'image' %}[img]<|image_pad|>[/img]{% else %}{{ part['text'] }}{% endif %}"
            "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _hf_model(kind: str):
    text = dict(vocab_size=IMAGE_TOKEN + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    if kind == "qwen3_vl":  # a Qwen3 (q/k norms), interleaved M-RoPE, DeepStack rows added after layers 0 and 1
        text = {**text, "head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 5e6,
                                                            "mrope_section": [3, 3, 2], "mrope_interleaved": True}}
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                      deepstack_visual_indexes=[0, 2])
        cfg = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                                         video_token_id=IMAGE_TOKEN - 1, vision_start_token_id=IMAGE_TOKEN - 2)
        model_cls = transformers.Qwen3VLForConditionalGeneration
    elif kind == "qwen3_5":  # Gated DeltaNet layers around an attention layer; interleaved M-RoPE on half of each head
        text = {**text, "head_dim": 32, "num_hidden_layers": 4, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                "linear_key_head_dim": 8, "linear_value_head_dim": 12,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5,
                                    "mrope_section": [3, 3, 2], "mrope_interleaved": True}}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
        cfg = transformers.Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                                         video_token_id=IMAGE_TOKEN - 1, vision_start_token_id=IMAGE_TOKEN - 2)
        model_cls = transformers.Qwen3_5ForConditionalGeneration
    elif kind == "qwen2_5_vl":
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                                            video_token_id=IMAGE_TOKEN - 1, vision_start_token_id=IMAGE_TOKEN - 2)
        model_cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=2, hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                                         video_token_id=IMAGE_TOKEN - 1, vision_start_token_id=IMAGE_TOKEN - 2)
        model_cls = transformers.Qwen2VLForConditionalGeneration
    torch.manual_seed(fresh.seed(key=kind))
    return perturbed(model_cls(cfg))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """-> get(kind): (HF model, its checkpoint directory with tokenizer, template and preprocessor config), each
    built once per module."""
    built = {}

    def get(kind):
        if kind not in built:
            model = _hf_model(kind)
            patch = 16 if kind in ("qwen3_5", "qwen3_vl") else 14
            path = save_checkpoint(model, tmp_path_factory.mktemp(kind), TEMPLATE, ["<|image_pad|>"], {
                "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": CELLS[0] * (2 * patch) ** 2,
                "max_pixels": CELLS[1] * (2 * patch) ** 2, "patch_size": patch, "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]})
            built[kind] = model, path
        return built[kind]

    return get


def _image(rng):
    h, w = (int(x) for x in rng.integers(30, 200, 2))
    return PIL.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _reference_logits(model, vocab, prompt_ids, spans, out_ids):
    """transformers' logits for the prompt (each image position as the image token, its patches as the engine
    prepared them) followed by the generated tokens: [len(out_ids), vocab], teacher-forced."""
    ids = torch.tensor([[t if t < vocab else IMAGE_TOKEN for t in prompt_ids] + list(out_ids)])
    kwargs = {}
    if spans:
        m = 2
        kwargs = dict(pixel_values=torch.tensor(np.concatenate([s.pixels for s in spans])),
                      image_grid_thw=torch.tensor([[t, h * m, w * m] for t, h, w in (s.thw for s in spans)]),
                      mm_token_type_ids=(ids == IMAGE_TOKEN).int())
    with torch.no_grad():
        logits = model(input_ids=ids, **kwargs).logits[0].numpy()
    n = len(prompt_ids)
    return logits[n - 1 : n - 1 + len(out_ids)]


def test_mrope_positions_are_transformers_get_rope_index_in_any_window():
    from engine.multimodal import ImageSpan, mrope_positions

    model = _hf_model("qwen2_5_vl")
    rng = fresh.rng()
    for _ in range(6):
        ids, spans, grids = [], [], []
        for i in range(int(rng.integers(1, 4))):  # (images apart: transformers reads adjacent ones as one)
            ids += [5] * int(rng.integers(0 if i == 0 else 1, 6))
            t, h, w = 1, int(rng.integers(1, 6)), int(rng.integers(1, 6))
            spans.append(ImageSpan(len(ids), t * h * w, None, b"", IMAGE_TOKEN, thw=(t, h, w)))
            grids.append([t, 2 * h, 2 * w])
            ids += [IMAGE_TOKEN] * (t * h * w)
        ids += [5] * int(rng.integers(0, 6))
        prompt = torch.tensor([ids])
        want, delta = model.model.get_rope_index(prompt, (prompt == IMAGE_TOKEN).int(), torch.tensor(grids))
        want = want[:, 0].numpy()
        for _ in range(4):
            start = int(rng.integers(0, len(ids)))
            num = int(rng.integers(1, len(ids) - start + 1))
            np.testing.assert_array_equal(mrope_positions(spans, start, num), want[:, start : start + num])
        # generated tokens: their index shifted by transformers' rope delta, on all three
        after = mrope_positions(spans, len(ids), 5)
        np.testing.assert_array_equal(after, np.broadcast_to(np.arange(len(ids), len(ids) + 5) + int(delta), (3, 5)))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen2_vl", "qwen3_5", "qwen3_vl"])
def test_greedy_tokens_with_images_are_transformers_argmax_whole_chunked_and_cached(checkpoints, kind):
    from engine.request import SamplingParams

    model, path = checkpoints(kind)
    rng = fresh.rng()
    word = lambda n: [int(t) for t in rng.integers(3, 40000, n)]  # noqa: E731
    images = [_image(rng) for _ in range(3)]
    prompts = [(word(5) + [IMAGE_TOKEN] + word(7), [images[0]]),
               (word(3) + [IMAGE_TOKEN] + word(2) + [IMAGE_TOKEN] + word(9), [images[1], images[2]]),
               ([IMAGE_TOKEN] + word(11), [images[2]])]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    whole = _llm(path, **{"cache.prefix_caching": False})
    vocab = whole.engine.model_cfg.vocab_size
    outs = whole.generate([p for p, _ in prompts], greedy, images=[im for _, im in prompts])
    for (text_ids, ims), out in zip(prompts, outs):
        ids, spans = whole.engine.image_prompts.prepare(text_ids, ims)
        assert out.prompt_tokens == len(ids) == len(text_ids) - len(ims) + sum(s.num_tokens for s in spans)
        assert_argmax(_reference_logits(model, vocab, ids, spans, out.token_ids), out.token_ids)
    assert whole.engine.runner.images.num_encoded == 3  # images[2] twice: once through the tower
    if kind == "qwen2_vl":
        return

    # Prefill chunks of 8 tokens: images split over steps, each image's grid positions as in one step
    chunked = _llm(path, **{"cache.prefix_caching": False, "scheduler.max_batch_tokens": 8})
    again = chunked.generate([p for p, _ in prompts], greedy, images=[im for _, im in prompts])
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]

    # The prefix cache: another question about the first prompt's image reuses the pages up to the image's last
    # full page (positions there computed once, with the same M-RoPE positions) and its kept features
    cached = _llm(path)
    encoder = cached.engine.runner.images
    first_ids, first_images = prompts[0]
    [base] = cached.generate([first_ids], greedy, images=[first_images])
    follow = first_ids[:6] + word(12)
    [hit] = cached.generate([follow], greedy, images=[first_images])
    ids, spans = cached.engine.image_prompts.prepare(follow, first_images)
    shared = (spans[0].end // PAGE) * PAGE
    # (Qwen3.5's linear layers resume only from a state snapshot: the first prompt took one at its last page
    # boundary, past what the two share unless the image ends on a boundary; the same prompt again hits)
    assert hit.cached_tokens == (0 if kind == "qwen3_5" and spans[0].end % PAGE else shared)
    assert (encoder.num_encoded, encoder.num_reused) == (1, 1)
    [plain] = whole.generate([follow], greedy, images=[first_images])
    assert hit.token_ids == plain.token_ids
    assert_argmax(_reference_logits(model, vocab, ids, spans, hit.token_ids), hit.token_ids)
    [same] = cached.generate([follow], greedy, images=[first_images])
    assert same.token_ids == hit.token_ids and same.cached_tokens >= shared > 0


@pytest.mark.slow
def test_a_chat_with_image_parts_answers_as_its_prepared_prompt(checkpoints):
    from engine.request import SamplingParams

    _, path = checkpoints("qwen2_5_vl")
    llm = _llm(path)
    rng = fresh.rng()
    image = _image(rng)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    [chat] = llm.chat([messages], greedy)
    ids, sources = llm.engine.encode_chat(messages, add_generation_prompt=True)
    assert ids.count(IMAGE_TOKEN) == 1 and len(sources) == 1
    [direct] = llm.generate([ids], greedy, images=[[image]])
    assert chat.token_ids == direct.token_ids and chat.prompt_tokens == direct.prompt_tokens > len(ids)


def test_mm_processor_kwargs_bound_an_images_positions_and_unknown_keys_are_refused(checkpoints):
    from engine.config import ConfigKeyError

    _, path = checkpoints("qwen2_5_vl")
    image = PIL.fromarray(fresh.rng().integers(0, 256, (280, 420, 3), dtype=np.uint8))  # 10 x 15 cells: past 30
    default = _llm(path).engine.image_prompts
    capped = _llm(path, **{"model.mm_processor_kwargs": {"max_pixels": 28 * 28 * 12}}).engine.image_prompts
    [wide] = default.prepare([IMAGE_TOKEN], [image])[1]
    [small] = capped.prepare([IMAGE_TOKEN], [image])[1]
    # scaled down to the most pixels allowed, each side floored to whole cells (smart_resize)
    assert (wide.thw, small.thw) == ((1, 4, 6), (1, 2, 4))
    with pytest.raises(ConfigKeyError, match=r"mm_processor_kwargs: \['patch_size'\] cannot be set"):
        _llm(path, **{"model.mm_processor_kwargs": {"patch_size": 16}})
