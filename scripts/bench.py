#!/usr/bin/env python3
"""Serving benchmarks with the metrics of SGLang's and vLLM's: named workloads, side-by-side configurations.

In-process (two engine configurations, interleaved repetitions, each repetition starting from a cold cache):

    python scripts/bench.py --workload shared-prefix --config configs/smollm2-135m.yaml \
        --set-a cache.prefix_caching=false --set-b cache.prefix_caching=true --repeats 2 --max-concurrency 8

Against a running server (OpenAI /v1/completions, streaming; several servers side by side with several --url):

    python scripts/bench.py --workload shared-prefix --url http://127.0.0.1:8000 --max-concurrency 64 --num-requests 500

Overlapped scheduling on vs off, on a random model small enough that host time per step is comparable to
device time (as on a GPU), with the config's tokenizer:

    python scripts/bench.py --workload random --synthetic-model 64,2,8,2,16 --num-requests 64 --max-concurrency 32 \
        --set-a scheduler.overlap=false --set-b scheduler.overlap=true --repeats 5

Decode host overhead (the host's share of each step) at a fixed batch, for one or two configurations:

    python scripts/bench.py --workload decode --decode-batch 32 --config configs/smollm2-135m.yaml

Speculative decoding (n-gram lookup) on vs off, on chat prompts whose answers repeat their text:

    python scripts/bench.py --workload copy --num-requests 16 --max-concurrency 8 --output-len 128 \
        --set-b speculative.method=ngram --repeats 3

Suffix decoding (drafts from earlier requests' answers too) against n-gram lookup, on JSON extraction prompts whose
answers share their layout:

    python scripts/bench.py --workload extraction --num-requests 32 --max-concurrency 4 --output-len 80 \
        --set-a speculative.method=ngram --set-b speculative.method=suffix speculative.num_tokens=8 --repeats 3

LoRA cost: decode with N random rank-R adapters loaded and the batch spread over them (B) vs none (A):

    python scripts/bench.py --workload decode --decode-batch 32 --set-b --lora-b 4,16

Host work of the outputs a request asks for (`add_request(output_kind=...)`): cumulative (A) vs deltas (B, what a
server's streams get), long outputs at batch 256 (`--output-kind-b final`: what LLM.generate and the offline job get):

    python scripts/bench.py --workload decode --synthetic-model 64,2,8,2,16 --decode-batch 256 --output-len 384 \
        --set scheduler.overlap=false scheduler.max_running=256 scheduler.max_batch_tokens=4096 cache.num_pages=20000 \
        --set-b --output-kind-b delta

The host's per-step output work (no model) as 64 outputs grow to 20,000 tokens: flat when a step's cost does not
grow with the output:

    python scripts/bench.py --workload output-growth --decode-batch 64 --output-len 20000

The model step alone (forward + KV write) at fixed decode and prefill shapes:

    python scripts/bench.py --workload steps --repeats 5

Changing a live replica's weights: read a checkpoint, swap it in, sleep and wake up (and the bytes sleep frees):

    python scripts/bench.py --workload weight-swap --repeats 5

Images (a random LLaVA-1.5-shaped vision tower, 336-pixel images in 14-pixel patches: 576 positions each, in front of
the config's model): groups of questions about one picture each, prefix cache off (A) vs on (B):

    python scripts/bench.py --workload shared-image --vision 256,4 --groups 4 --prompts-per-group 8 \
        --question-len 32 --set-a cache.prefix_caching=false --set-b cache.prefix_caching=true --repeats 3

The same with Gemma 3's kind of images (SigLIP, 256 positions an image that attend to each other both ways, so a
step computes an image whole): add --vision-kind gemma3.

Workloads: shared-prefix (SGLang generated-shared-prefix: groups x prompts per group, system prompt + question,
random token ids, shuffled), prefix-repetition (vLLM: a few prefixes, each repeated with random suffixes),
random (no reuse: the control), multi-turn (each conversation's next turn is sent when the previous answer
arrives and carries the whole history), copy (chat prompts asking to repeat a generated paragraph word for word;
ends at the model's end token), extraction (chat prompts asking for a person's details as JSON: answers of one
layout), shared-image (groups x prompts per group: one image, then a question, shuffled).
Metrics: request and token throughput; TTFT, TPOT, ITL, end-to-end at
p50/p90/p99; token hit rate = cached prompt tokens / prompt tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOKEN_LO = 1000  # random ids are drawn from [TOKEN_LO, vocab - 1000): ordinary tokens, never special ones


@dataclasses.dataclass
class Turn:
    prompt: list[int]  # for multi-turn: the new user message only; history is prepended at send time
    max_tokens: int
    ignore_eos: bool = True  # random-id prompts run to max_tokens; natural-text ones (copy) end where the model ends
    images: list | None = None  # one per placeholder token of the prompt (shared-image)


@dataclasses.dataclass
class Session:
    """One request, or one conversation whose turns go out one after another."""

    turns: list[Turn]
    group: int = -1  # shared-prefix group (-1: none)


@dataclasses.dataclass
class Result:
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    ttft_s: float
    e2e_s: float
    itl_s: list[float]
    error: str | None = None


# ----------------------------------------------------------------------------------------- workloads
def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(TOKEN_LO, vocab - 1000) for _ in range(n)]


_SUBJECTS = ("The committee", "Our team", "The new server", "Maria", "The city council", "A small bakery", "The museum",
             "Every student", "The old ferry", "Two engineers")
_VERBS = ("reviewed", "approved", "moved", "painted", "rebuilt", "opened", "tested", "described", "sold", "measured")
_OBJECTS = ("the annual budget", "a wooden bridge", "the east wing", "three old trains", "the main library",
            "a garden of roses", "the river path", "its first exhibit", "the north tower", "a list of names")
_TIMES = ("on Tuesday", "last spring", "in 1998", "before noon", "after the storm", "during the festival", "in early May",
          "at midnight", "twice a year", "without a plan")


def copy_prompts(rng: random.Random, tokenizer, n: int, sentences: int) -> list[list[int]]:
    """Chat prompts asking to repeat a paragraph word for word: outputs that repeat the prompt, the case n-gram
    speculative decoding is for (as editing, extraction and quoting are)."""
    prompts = []
    for _ in range(n):
        text = " ".join(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TIMES)}."
                        for _ in range(sentences))
        prompts.append(tokenizer.encode_chat(
            [{"role": "user", "content": f"Repeat the following text exactly, word for word:\n\n{text}"}]))
    return prompts


_NAMES = ("Alice", "Bob", "Carla", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena", "Mateo",
          "Nadia", "Omar", "Priya")
_JOBS = ("nurse", "teacher", "pilot", "baker", "chemist", "plumber", "lawyer", "farmer", "architect", "journalist")
_CITIES = ("Lisbon", "Osaka", "Nairobi", "Denver", "Krakow", "Lima", "Oslo", "Hanoi", "Austin", "Porto")


def extraction_prompts(rng: random.Random, tokenizer, n: int) -> list[list[int]]:
    """Chat prompts asking for one person's details as JSON, each about another person: every answer has the same
    keys and layout and its own values (tool calls and structured extraction look like this), the case suffix
    decoding is for: the layout is in earlier answers, not in the prompt."""
    return [tokenizer.encode_chat([{"role": "user", "content": (
        "Extract the person's details as JSON with the keys name, age, city and job.\n\n"
        f"{rng.choice(_NAMES)} is a {rng.randrange(22, 70)}-year-old {rng.choice(_JOBS)} who lives in "
        f"{rng.choice(_CITIES)}.")}]) for _ in range(n)]


def make_workload(args, vocab: int, tokenizer=None) -> tuple[list[Session], int]:
    """-> (sessions in send order, ideal number of cached prompt tokens). `tokenizer`: for natural-text workloads."""
    rng = random.Random(args.seed)
    if args.workload == "prompts":  # your own: JSONL prompt / messages lines, as the offline job's
        from scripts.train_eagle3 import read_prompts

        if not args.input:
            raise SystemExit("--workload prompts needs --input FILE.jsonl")
        prompts = read_prompts(args.input, tokenizer)[: args.num_requests]
        return [Session([Turn(p, args.output_len, ignore_eos=False)]) for p in prompts], 0
    if args.workload == "extraction":
        return [Session([Turn(p, args.output_len, ignore_eos=False)])
                for p in extraction_prompts(rng, tokenizer, args.num_requests)], 0
    if args.workload == "copy":
        return [Session([Turn(p, args.output_len, ignore_eos=False)])
                for p in copy_prompts(rng, tokenizer, args.num_requests, args.copy_sentences)], 0
    if args.workload == "shared-prefix":
        systems = [_ids(rng, args.system_len, vocab) for _ in range(args.groups)]
        sessions = [Session([Turn(systems[g] + _ids(rng, args.question_len, vocab), args.output_len)], g)
                    for g in range(args.groups) for _ in range(args.prompts_per_group)]
        rng.shuffle(sessions)
        page = args.page_size
        ideal = (args.prompts_per_group - 1) * args.groups * (args.system_len // page * page)
        return sessions, ideal
    if args.workload == "prefix-repetition":
        prefixes = [_ids(rng, args.system_len, vocab) for _ in range(args.groups)]
        sessions = [Session([Turn(prefixes[i % args.groups] + _ids(rng, args.question_len, vocab), args.output_len)], i % args.groups)
                    for i in range(args.num_requests)]
        rng.shuffle(sessions)
        page = args.page_size
        ideal = (args.num_requests - args.groups) * (args.system_len // page * page)
        return sessions, ideal
    if args.workload == "shared-image":  # (an image's placeholder: vocab - 1, or Gemma 3's vocab - 3: never drawn ids)
        gemma3 = getattr(args, "vision_kind", "llava") == "gemma3"
        images = [_random_image(rng) for _ in range(args.groups)]
        sessions = [Session([Turn([vocab - (3 if gemma3 else 1)] + _ids(rng, args.question_len, vocab),
                                  args.output_len, images=[images[g]])], g)
                    for g in range(args.groups) for _ in range(args.prompts_per_group)]
        rng.shuffle(sessions)
        shared = GEMMA3_POSITIONS + 4 if gemma3 else IMAGE_POSITIONS  # (Gemma 3's: framed by 2 blank lines, boi, eoi)
        ideal = (args.prompts_per_group - 1) * args.groups * (shared // args.page_size * args.page_size)
        return sessions, ideal
    if args.workload == "random":
        return [Session([Turn(_ids(rng, args.system_len + args.question_len, vocab), args.output_len)])
                for _ in range(args.num_requests)], 0
    if args.workload == "multi-turn":
        sessions = [Session([Turn(_ids(rng, args.system_len if t == 0 else args.question_len, vocab), args.output_len)
                             for t in range(args.turns)]) for _ in range(args.num_requests)]
        return sessions, 0
    raise SystemExit(f"unknown workload {args.workload!r}")


IMAGE_SIZE, IMAGE_PATCH = 336, 14  # llava-1.5's: 576 positions per image
IMAGE_POSITIONS = (IMAGE_SIZE // IMAGE_PATCH) ** 2
GEMMA3_SIZE, GEMMA3_POSITIONS = 448, 256  # --vision-kind gemma3: 32 x 32 patches pooled 2 x 2 (Gemma 3's 256 rows)


def _random_image(rng: random.Random):
    import numpy as np
    from PIL import Image

    size = (rng.randrange(300, 800), rng.randrange(300, 800))
    return Image.fromarray(np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (*size, 3), dtype=np.uint8))


def synthetic_vision(spec: str, model_cfg, kind: str = "llava"):
    """(VisionConfig, random params, ImageProcessor) for `--vision HIDDEN,LAYERS`: a CLIP tower of llava-1.5's geometry
    (336-pixel images, 14-pixel patches, the second-to-last layer's features, the class token dropped) and width, its
    projector into the model's hidden size; the placeholder is the model's last id. kind "gemma3": a SigLIP tower of
    448-pixel images through its post-LayerNorm, Gemma 3's projector pooling them to 256 positions that attend to each
    other both ways; the placeholder (<start_of_image>) the model's third-to-last id, then its end and image tokens."""
    import jax

    from engine.images import ImageProcessor
    from models import vision

    try:
        hidden, layers = (int(x) for x in spec.split(","))
    except ValueError:
        raise SystemExit(f"--vision wants two integers HIDDEN,LAYERS, got {spec!r}")
    if kind == "gemma3":
        vcfg = vision.VisionConfig(
            kind="siglip", hidden_size=hidden, intermediate_size=4 * hidden, num_layers=layers,
            num_heads=max(1, hidden // 64), image_size=GEMMA3_SIZE, patch_size=IMAGE_PATCH, num_channels=3,
            layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", feature_layers=(-1,), select_strategy="full",
            projector_act="gelu", projector_bias=False, projector="gemma3", post_norm=True,
            num_pooled_tokens=GEMMA3_POSITIONS, text_hidden_size=model_cfg.hidden_size,
            image_token_id=model_cfg.vocab_size - 1, boi_token_id=model_cfg.vocab_size - 3,
            eoi_token_id=model_cfg.vocab_size - 2)
        processor = ImageProcessor.from_dict({"image_processor_type": "Gemma3ImageProcessor", "size": GEMMA3_SIZE})
        return vcfg, vision.init_params(vcfg, jax.random.key(1)), processor
    vcfg = vision.VisionConfig(
        kind="clip", hidden_size=hidden, intermediate_size=4 * hidden, num_layers=layers, num_heads=max(1, hidden // 64),
        image_size=IMAGE_SIZE, patch_size=IMAGE_PATCH, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu",
        feature_layers=(-2,), select_strategy="default", projector_act="gelu", projector_bias=True,
        text_hidden_size=model_cfg.hidden_size, image_token_id=model_cfg.vocab_size - 1)
    processor = ImageProcessor.from_dict({"image_processor_type": "CLIPImageProcessor",
                                          "size": {"shortest_edge": IMAGE_SIZE},
                                          "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}})
    return vcfg, vision.init_params(vcfg, jax.random.key(1)), processor


# --------------------------------------------------------------------------------------- engine mode
def run_engine(engine, sessions: list[Session], max_concurrency: int, request_rate: float, rng: random.Random,
               options: dict | None = None) -> tuple[list[Result], float]:
    """Drives an in-process LLMEngine: at most `max_concurrency` sessions in flight, Poisson arrivals at `request_rate`;
    `options` apply to every request: "guided_regex" / "guided_json" (structured outputs), "prompt_logprobs", "embed"
    (embedding requests: the prompt's last-token state, nothing generated)."""
    from engine import structured
    from engine.request import SamplingParams

    options = options or {}
    constraint = structured.from_fields(options)

    results: list[Result] = []
    queue = list(sessions)
    active: dict[str, tuple[Session, int, list[int], float]] = {}  # rid -> (session, turn index, history, sent at)
    next_arrival = time.perf_counter()
    t0 = time.perf_counter()

    def send(session: Session, turn: int, history: list[int]) -> None:
        prompt = history + session.turns[turn].prompt
        if options.get("embed"):
            params = SamplingParams.embedding()
        else:
            params = SamplingParams(temperature=0, max_tokens=session.turns[turn].max_tokens,
                                    ignore_eos=session.turns[turn].ignore_eos, structured=constraint,
                                    prompt_logprobs=options.get("prompt_logprobs"))
        rid = engine.add_request(prompt, params, images=session.turns[turn].images)
        active[rid] = (session, turn, prompt, time.perf_counter())

    while queue or active:
        now = time.perf_counter()
        while queue and len(active) < max_concurrency and now >= next_arrival:
            send(queue.pop(0), 0, [])
            if request_rate != float("inf"):
                next_arrival += rng.expovariate(request_rate)
        if not active:
            time.sleep(max(0.0, next_arrival - time.perf_counter()))
            continue
        for out in engine.step():
            if not out.finished:
                continue
            session, turn, prompt, sent = active.pop(out.request_id)
            times = out.token_times_s or []
            results.append(Result(out.prompt_tokens, out.cached_tokens, len(out.token_ids), out.ttft_s, out.e2e_s,
                                  [b - a for a, b in zip(times, times[1:])]))
            if turn + 1 < len(session.turns):
                send(session, turn + 1, prompt + out.token_ids)
    return results, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------- HTTP mode
async def _http_request(client, url: str, model: str, prompt: list[int], max_tokens: int, timeout_s: float,
                        guided: dict | None = None, ignore_eos: bool = True) -> tuple[Result, list[int]]:
    body = {**(guided or {}), "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": ignore_eos,
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": None}
    start = time.perf_counter()
    times, usage, text_ids = [], {}, []
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout_s) as resp:
            if resp.status_code != 200:
                return Result(len(prompt), 0, 0, 0, 0, [], error=f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"), []
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                    times.append(time.perf_counter())
    except Exception as e:  # noqa: BLE001 (every failure is counted as an error of this request)
        return Result(len(prompt), 0, 0, 0, 0, [], error=f"{type(e).__name__}: {e}"), []
    end = time.perf_counter()
    if not times or not usage:
        return Result(len(prompt), 0, 0, 0, 0, [], error="stream ended without tokens or usage"), []
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return Result(usage["prompt_tokens"], cached, usage["completion_tokens"], times[0] - start, end - start,
                  [b - a for a, b in zip(times, times[1:])]), text_ids


async def run_http(url: str, model: str, sessions: list[Session], max_concurrency: int, request_rate: float,
                   rng: random.Random, timeout_s: float, guided: dict | None = None) -> tuple[list[Result], float]:
    import httpx

    sem = asyncio.Semaphore(max_concurrency)
    results: list[Result] = []
    limits = httpx.Limits(max_connections=max_concurrency + 8, max_keepalive_connections=max_concurrency + 8)
    async with httpx.AsyncClient(limits=limits) as client:

        async def one(session: Session) -> None:
            async with sem:
                history: list[int] = []
                for turn in session.turns:
                    prompt = history + turn.prompt
                    res, _ = await _http_request(client, url, model, prompt, turn.max_tokens, timeout_s, guided, turn.ignore_eos)
                    results.append(res)
                    if res.error:
                        return
                    history = prompt + [TOKEN_LO] * res.output_tokens  # ids are not streamed back; see docs

        t0 = time.perf_counter()
        tasks = []
        for s in sessions:
            tasks.append(asyncio.create_task(one(s)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


# -------------------------------------------------------------------------------------------- metrics
def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(results: list[Result], wall_s: float, ideal_cached: int) -> dict:
    ok = [r for r in results if not r.error]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    out_tokens = sum(r.output_tokens for r in ok)
    ttft = [r.ttft_s for r in ok]
    e2e = [r.e2e_s for r in ok]
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl_s]
    hits = [r.ttft_s for r in ok if r.cached_tokens > 0]
    m = {
        "requests": len(ok), "errors": len(results) - len(ok), "wall_s": wall_s,
        "request_throughput": len(ok) / wall_s, "output_throughput": out_tokens / wall_s,
        "total_token_throughput": (prompt + out_tokens) / wall_s,
        "prompt_tokens": prompt, "cached_tokens": cached, "token_hit_rate": cached / prompt if prompt else 0.0,
        "hit_rate_of_ideal": (cached / ideal_cached) if ideal_cached else float("nan"),
        "ttft_with_hit_p50_s": _pct(hits, 0.5),
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
        for q in (0.5, 0.9, 0.99):
            m[f"{name}_p{int(q * 100)}_s"] = _pct(values, q)
    return m


def print_table(names: list[str], runs: dict[str, list[dict]]) -> None:
    """Medians over repetitions; with two configurations also the ratio B/A."""
    med = {n: {k: statistics.median(r[k] for r in runs[n]) for k in runs[n][0]} for n in names}
    keys = list(dict.fromkeys(k for n in names for k in med[n]))  # a metric only one configuration has: nan elsewhere
    med = {n: {k: m.get(k, float("nan")) for k in keys} for n, m in med.items()}
    header = f"{'metric':<24}" + "".join(f"{n:>16}" for n in names) + ("     B/A" if len(names) == 2 else "")
    print(header)
    print("-" * len(header))
    for k in keys:
        row = f"{k:<24}" + "".join(f"{med[n][k]:>16.4g}" for n in names)
        if len(names) == 2 and med[names[0]][k]:
            row += f"{med[names[1]][k] / med[names[0]][k]:>8.3g}"
        print(row)


# ----------------------------------------------------------------------------------------------- main
def synthetic_mtp(cfg, params, kind: str):
    """A GLM-4.5-style model and an MTP layer for it (`--synthetic-mtp`): "right", a model whose next token is a function
    of its last one (attention adds nothing, every layer but the last adds nothing: their outputs' projections zeroed,
    which leaves each step's cost as it was) and a layer that is its last layer reading the embedding alone, so every
    greedy draft is accepted; "random", a random layer, whose drafts almost all fail."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from models import mtp

    cfg = dataclasses.replace(cfg, architecture="glm4_moe")
    mcfg = mtp.mtp_config(cfg)
    if kind == "random":
        return cfg, params, (mcfg, mtp.init_params(mcfg, jax.random.key(1), scale=0.5))
    embed, layers = params["embed"], dict(params["layers"])
    layers["wo"] = jnp.zeros_like(layers["wo"])
    layers["w_down"] = layers["w_down"].at[:-1].set(0)
    params = {**params, "embed": embed / jnp.sqrt(jnp.mean(embed**2, axis=-1, keepdims=True)), "layers": layers}
    h = cfg.hidden_size
    layer = {"layers": {k: v[-1:] for k, v in layers.items()}, "final_norm": params["final_norm"],
             "enorm": jnp.ones(h), "hnorm": jnp.ones(h), "eh_proj": jnp.concatenate([jnp.eye(h), jnp.zeros((h, h))])}
    return cfg, params, (mcfg, layer)


def synthetic_eagle3(cfg, params, kind: str):
    """A model and an EAGLE-3 head for it (`--synthetic-eagle3`; tests/test_eagle3.py): "right", a model whose next
    token is a function of its last one (attention and every layer but the last add nothing: their outputs'
    projections zeroed, which leaves each step's cost as it was; embedding rows of RMS 1) and a head that computes the
    same function, so every greedy draft is accepted: its hidden state's norm is zero (weights 0, the residual stream
    starting from it: `norm_before_residual`), its attention (a value head per query head, per-head RMS-normed
    queries and keys scaled up) carries each position's own embedding through (a position attends to itself, or to
    earlier copies of its token, which hold the same value), then the model's last MLP, final norm and LM head;
    "random", a random head, whose drafts almost all fail. Either reads the default layers (three layers' inputs,
    the embedding's where the model has fewer than 4 layers) and runs its `fc` at full cost."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from models import eagle3

    h, n = cfg.hidden_size, cfg.num_layers
    aux = eagle3.default_aux_layers(n) if n >= 4 else (0, 0, 0)
    layer = dataclasses.replace(cfg, num_layers=1, num_kv_heads=cfg.num_heads, attn_input_size=2 * h,
                                qk_norm=kind == "right")
    if cfg.num_heads * cfg.head_dim != h:
        raise SystemExit("--synthetic-eagle3 wants HEADS x HEAD_DIM == HIDDEN (the head's values carry the embedding)")
    if kind == "random":
        ecfg = eagle3.Eagle3Config(layer, aux, norm_before_residual=False)
        return cfg, params, (ecfg, eagle3.init_params(ecfg, jax.random.key(1), scale=0.5))
    embed, layers = params["embed"], dict(params["layers"])
    layers["wo"] = jnp.zeros_like(layers["wo"])
    layers["w_down"] = layers["w_down"].at[:-1].set(0)
    params = {**params, "embed": embed / jnp.sqrt(jnp.mean(embed**2, axis=-1, keepdims=True)), "layers": layers}
    take = jnp.concatenate([jnp.eye(h), jnp.zeros((h, h))])[None]  # [1, 2h, h]: the embedding's half of the input
    # a query's logit against its own key: scale^2 x head_dim x sm_scale = 256 (others' fall with their cosine)
    scale = jnp.full((1, cfg.head_dim), (256 / (cfg.head_dim * cfg.sm_scale)) ** 0.5)
    head = {"layers": {"attn_norm": jnp.ones((1, h)), "mlp_norm": layers["mlp_norm"][-1:], "wq": take, "wk": take,
                       "wv": take, "wo": jnp.eye(h)[None], "q_norm": scale, "k_norm": scale,
                       **{k: layers[k][-1:] for k in ("w_gate", "w_up", "w_down")}},
            "hnorm": jnp.zeros(h), "fc": jnp.zeros((len(aux) * h, h)), "final_norm": params["final_norm"],
            "lm_head": params["embed"].T if cfg.tie_word_embeddings else params["lm_head"],
            "d2t": jnp.zeros(cfg.vocab_size, jnp.int32)}
    return cfg, params, (eagle3.Eagle3Config(layer, aux, norm_before_residual=True), head)


def synthetic_model(spec: str, config, arch: str = "llama", word_vocab: int = 0):
    """(LlamaConfig, random params, tokenizer) for `--synthetic-model HIDDEN,LAYERS,HEADS,KV_HEADS,HEAD_DIM`; arch
    qwen3_5: three Gated DeltaNet layers per attention layer (HEADS value heads and HEADS / 2 key heads of HEAD_DIM),
    Qwen3.5's gated attention; granite4: three Mamba-2 layers per attention layer (HEADS heads of HEAD_DIM, one B/C
    group, a state of HEAD_DIM), Granite 4.0's attention without RoPE. word_vocab: a word-level tokenizer of that
    many tokens instead of the config's (`Tokenizer.word_level`: a machine without the model's package)."""
    import jax

    from models import llama
    from models.config import LlamaConfig
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer

    try:
        hidden, layers, heads, kv_heads, head_dim = (int(x) for x in spec.split(","))
    except ValueError:
        raise SystemExit(f"--synthetic-model wants five integers HIDDEN,LAYERS,HEADS,KV_HEADS,HEAD_DIM, got {spec!r}")
    tokenizer = Tokenizer.word_level(word_vocab) if word_vocab else Tokenizer.load(tokenizer_source(config.model.path))
    pattern = tuple((i + 1) % 4 != 0 for i in range(layers))
    linear = {} if arch == "llama" else dict(
        linear_layers=pattern, linear_num_key_heads=max(1, heads // 2),
        linear_num_value_heads=heads, linear_key_head_dim=head_dim, linear_value_head_dim=head_dim,
        attn_output_gate=True, qk_norm=True, partial_rotary_factor=0.25) if arch == "qwen3_5" else dict(
        architecture="granitemoehybrid", linear_kind="mamba2", linear_layers=pattern, linear_num_key_heads=1,
        linear_num_value_heads=heads, linear_key_head_dim=head_dim, linear_value_head_dim=head_dim,
        linear_conv_bias=True, rope_layers=(False,) * layers)
    linear.setdefault("architecture", arch)
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                      max_position=config.model.max_model_len, **linear)
    return cfg, llama.init_params(cfg, jax.random.key(0), scale=0.5), tokenizer


def given_model(args, config):
    """`--synthetic-model`'s (LlamaConfig, params, tokenizer) for LLMEngine(model=...), or None: the config's weights;
    and `--synthetic-mtp`'s MTP layer or `--synthetic-eagle3`'s head, or None."""
    if not args.synthetic_model:
        return None, None
    cfg, params, tokenizer = synthetic_model(args.synthetic_model, config, args.synthetic_arch, args.word_vocab)
    if args.synthetic_eagle3:
        cfg, params, head = synthetic_eagle3(cfg, params, args.synthetic_eagle3)
        return (cfg, params, tokenizer), head
    if not args.synthetic_mtp:
        return (cfg, params, tokenizer), None
    cfg, params, layer = synthetic_mtp(cfg, params, args.synthetic_mtp)
    return (cfg, params, tokenizer), layer


def sampling_fields(pairs: list[str]) -> dict[str, float | int]:
    """--sampling / --sampling-b KEY=VALUE pairs -> SamplingParams fields (numbers)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--sampling wants KEY=VALUE pairs (e.g. temperature=0.8 top_p=0.9), got {pair!r}")
        out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
    return out


def random_lora_overrides(spec: str, model_cfg) -> list[str]:
    """--lora-b N,RANK: N random LoRA adapters of rank RANK on every projection, written to a temporary directory,
    as lora.adapters overrides."""
    import tempfile

    from models.lora import write_random_adapter

    n, rank = (int(x) for x in spec.split(","))
    root = tempfile.mkdtemp(prefix="radixlm-lora-")
    return [f"lora.adapters.lora{i}={write_random_adapter(os.path.join(root, f'lora{i}'), model_cfg, rank, 2 * rank, seed=i, std=0.02)}"
            for i in range(n)]


def decode_overhead(args) -> None:
    """Steady decode at a fixed batch, per configuration (A, and B when given; `--repeats` runs interleaved, A, B,
    A, B, ...): median step wall time, the part spent waiting for the device, and the host's share (scheduling,
    packing, dispatch, detokenizing, stop checks). Serial, the device idles through the host's share; overlapped,
    the host's share runs while the device computes the step launched just before."""
    from engine.config import load_config
    from engine.engine import LLMEngine
    from engine.output import OutputKind
    from engine.request import SamplingParams

    kinds = {"A": OutputKind(args.output_kind), "B": OutputKind(args.output_kind_b or args.output_kind)}
    sampling = {"A": sampling_fields(args.sampling), "B": sampling_fields(args.sampling_b or args.sampling)}
    configs = {"A": args.set_a} | ({"B": args.set_common + args.set_b} if args.set_b is not None else {})
    engines, model_cfg = {}, None
    for name, overrides in configs.items():
        if name == "B" and args.lora_b:
            configs[name] = overrides = overrides + random_lora_overrides(args.lora_b, model_cfg)
        config = load_config(args.config, overrides)
        model, _ = given_model(args, config)
        engines[name] = LLMEngine(config, model=model)
        model_cfg = engines[name].model_cfg
    steps: dict[str, list[dict]] = {name: [] for name in engines}
    profiler = None
    if args.profile:  # the host side of every step, on the device's wait too (numpy.asarray: blocked on results)
        import cProfile

        profiler = cProfile.Profile()
    for _ in range(args.repeats):
        for name, engine in engines.items():
            rng = random.Random(args.seed)
            adapters = [None, *engine.adapter_names]  # requests spread over the base model and every adapter
            for i in range(args.decode_batch):
                engine.add_request(_ids(rng, args.decode_prompt_len, engine.model_cfg.vocab_size),
                                   SamplingParams(**{"temperature": 0.0, **sampling[name]},
                                                  max_tokens=args.output_len, ignore_eos=True),
                                   adapter=adapters[i % len(adapters)], output_kind=kinds[name])
            while engine.has_unfinished():
                launched = engine.num_steps
                if profiler is not None:
                    profiler.enable()
                cpu0 = time.thread_time()
                engine.step()
                cpu = time.thread_time() - cpu0
                if profiler is not None:
                    profiler.disable()
                s = engine.last_step
                if engine.num_steps > launched and s["num_decode"] == args.decode_batch and not s["num_prefill"]:
                    steps[name].append(s | {"cpu_s": cpu})
    for name, engine in engines.items():
        total = statistics.median(s["total_s"] for s in steps[name])
        wait = statistics.median(s["wait_s"] for s in steps[name])
        share = statistics.median(1 - s["wait_s"] / s["total_s"] for s in steps[name])
        host = statistics.median(s["total_s"] - s["wait_s"] for s in steps[name])
        cpu = statistics.median(s["cpu_s"] for s in steps[name])
        mode = "overlapped with the device" if engine.config.scheduler.overlap else "the device idles meanwhile"
        label = (f"{' '.join(configs[name]) or 'defaults'}, {kinds[name].value} outputs, sampling "
                 f"{' '.join(f'{k}={v}' for k, v in sampling[name].items()) or 'greedy'}")
        print(f"{name} ({label}): decode batch {args.decode_batch}, {len(steps[name])} pure-decode steps; median step "
              f"{total * 1e3:.2f} ms, waiting for the device {wait * 1e3:.2f} ms, host work {host * 1e3:.2f} ms, "
              f"{share:.1%} of the step ({mode}); the step's thread used {cpu * 1e3:.2f} ms of CPU; "
              f"{args.decode_batch / total:.1f} tok/s")
    if profiler is not None:
        import pstats

        print("\nwhere the steps' time went (cProfile, every configuration and step, by own time):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)


def step_times(args) -> None:
    """Median wall time of the jitted model step (forward + KV write, no head) on the real weights (or
    `--synthetic-model`'s), for fixed decode and prefill shapes: the per-step cost that every workload above is made
    of. Each step runs the program the engine would choose for it (`ModelRunner._decode_kernel`)."""
    import types

    import jax

    from engine.config import load_config
    from engine.engine import LLMEngine
    from engine.runner import bucket_for
    from engine.scheduler import Chunk, StepPlan

    config = load_config(args.config, args.set_a)
    model, _ = given_model(args, config)
    engine = LLMEngine(config, model=model)
    runner = engine.runner

    def inputs(chunks: list[tuple[int, int]]):  # (start, new tokens) per sequence, disjoint pages
        plan_chunks, first_page = [], 0
        for i, (start, n) in enumerate(chunks):
            num_pages = -(-(start + n) // runner.page_size)
            pages = tuple(p % runner.num_pages for p in range(first_page, first_page + num_pages))
            first_page += num_pages
            window = tuple(p % runner.layout.num_window_pages for p in pages) if runner.layout else ()  # hybrid cache
            seq = types.SimpleNamespace(state_slot=i, adapter=0)  # what packing reads of a sequence
            plan_chunks.append(Chunk(seq=seq, token_ids=[7] * n, start=start, pages=pages, sample=True, window_pages=window))
        plan = StepPlan(plan_chunks, [], 0, sum(n for _, n in chunks))
        kernel = runner._decode_kernel(plan, bucket_for(plan.num_tokens, runner.token_buckets))
        return runner.put_inputs(runner.pack(plan)), kernel

    shapes = {
        "decode 8 x 1,152 context": [(1151, 1)] * 8,
        "decode 32 x 1,152 context": [(1151, 1)] * 32,
        "decode 8 x 64 context": [(63, 1)] * 8,
        "prefill 128 over a 1,024 prefix": [(1024, 128)],
        "prefill 512 from position 0": [(0, 512)],
        "prefill 512 over a 512 prefix": [(512, 512)],
        "mixed: 8 decodes + 128 over 1,024": [(1151, 1)] * 8 + [(1024, 128)],
    }
    print(f"\nmodel step (forward + KV write), median of {args.repeats} after one warm-up, backend {runner.backend}:")
    for name, chunks in shapes.items():
        if len(chunks) > runner.max_seqs or sum(n for _, n in chunks) > runner.token_buckets[-1]:
            continue
        (data, kernel), times = inputs(chunks), []
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            hidden, _, _, runner.kv, runner.states = runner._forward(
                runner.params, kv_caches=runner.kv, inputs=data, prev_tokens=runner._prev_tokens, lora=runner.lora,
                draft_params=runner.draft_params, states=runner.states, decode_only=kernel)
            jax.block_until_ready(hidden)
            times.append(time.perf_counter() - t0)
        program = {None: "", True: "  (decode program)", False: "  (ragged program)"}[kernel]
        print(f"  {name:<36} {statistics.median(times[1:]) * 1e3:8.1f} ms{program}")


def output_growth(args) -> None:
    """The host's per-step output work (detokenizing, stop checks, the DELTA output a server streams) for
    `--decode-batch` sequences as their outputs grow to `--output-len` tokens, without a model: median per-step time
    over the last 100 steps of each quarter. Flat: a step's cost does not grow with the output."""
    from engine.config import load_config
    from engine.output import OutputKind, OutputState
    from engine.request import SamplingParams, Sequence
    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_source(load_config(args.config, args.set_a).model.path))
    rng = random.Random(args.seed)
    words = [tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in "the of and to in is was for on at".split()]
    states = [OutputState(Sequence(request_id=str(i), prompt_ids=[1, 2, 3],
                                   params=SamplingParams(max_tokens=args.output_len, stop=("zzzz",))),
                          tokenizer.detokenizer([1, 2, 3]), OutputKind.DELTA) for i in range(args.decode_batch)]
    quarter, times = max(args.output_len // 4, 100), []
    for step in range(args.output_len):
        t0 = time.perf_counter()
        for state in states:
            state.seq.output_ids.append(rng.choice(words))
            state.update(0.0, lambda seq, reason: None)
        times.append(time.perf_counter() - t0)
        if (step + 1) % quarter == 0:
            print(f"tokens {step + 1 - 99}-{step + 1}: median {statistics.median(times[-100:]) * 1e3:.3f} ms per step "
                  f"({args.decode_batch} sequences, DELTA outputs, a 4-character stop string)")


def weight_swap(args) -> None:
    """What changing a live replica's weights costs, median of --repeats: reading and laying out a checkpoint (the
    config's own model.path, while serving goes on), the swap itself, sleep (level 1) and wake-up; and the device
    bytes sleep frees. After each swap, one short request checks that the replica still serves."""
    import jax

    from engine.config import load_config
    from engine.engine import LLMEngine
    from engine.request import SamplingParams
    from models import sharding

    config = load_config(args.config, args.set_a)
    engine = LLMEngine(config)
    probe = SamplingParams(temperature=0, max_tokens=4)
    times: dict[str, list[float]] = {}
    freed = []

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    for _ in range(args.repeats):
        prepared = timed("read + lay out the checkpoint", lambda: engine.load_weights_for_update(config.model.path))
        timed("swap (update_weights)", lambda: engine.update_weights(prepared))
        live = sum(sharding.array_bytes(a) for a in jax.live_arrays())
        timed("sleep (level 1)", lambda: engine.sleep(1))
        freed.append(live - sum(sharding.array_bytes(a) for a in jax.live_arrays()))
        timed("wake_up", engine.wake_up)
        engine.add_request("Hello", probe)
        timed("first request after (4 tokens)", lambda: [engine.step() for _ in iter(engine.has_unfinished, False)])
    print(f"\nweights of {config.model.path} ({jax.numpy.dtype(engine.dtype).name}, quantization "
          f"{engine.config.model.quantization}), "
          f"median of {args.repeats}:")
    for name, values in times.items():
        print(f"  {name:<34} {statistics.median(values) * 1e3:9.1f} ms")
    print(f"  {'device bytes freed by sleep':<34} {statistics.median(freed) / 2**20:9.1f} MiB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["shared-prefix", "prefix-repetition", "random", "multi-turn", "copy", "extraction", "shared-image", "decode", "steps",
                                           "weight-swap", "output-growth", "prompts"], required=True)
    ap.add_argument("--input", help="--workload prompts: a JSONL file of prompt / messages lines (the first "
                    "--num-requests; answers end at EOS or --output-len)")
    ap.add_argument("--config", default="configs/smollm2-135m.yaml")
    ap.add_argument("--set", dest="set_common", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="overrides for every configuration")
    ap.add_argument("--set-a", nargs="*", action="extend", default=[], metavar="KEY=VALUE")
    ap.add_argument("--set-b", nargs="*", action="extend", default=None, metavar="KEY=VALUE", help="a second configuration, run interleaved")
    ap.add_argument("--url", nargs="*", default=None, help="benchmark servers instead (one column each)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--prompts-per-group", type=int, default=8)
    ap.add_argument("--system-len", type=int, default=1024)
    ap.add_argument("--question-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--copy-sentences", type=int, default=6, help="copy workload: sentences in each paragraph to repeat")
    ap.add_argument("--output-kind", choices=["cumulative", "delta", "final"], default="cumulative",
                    help="decode workload: the outputs each request asks for (engine.output.OutputKind): every step's "
                         "totals so far, every step's delta (a server's streams), or the final one only (LLM.generate, "
                         "the offline job)")
    ap.add_argument("--output-kind-b", choices=["cumulative", "delta", "final"],
                    help="decode workload: B's output kind (default: --output-kind)")
    ap.add_argument("--lora-b", metavar="N,RANK", help="decode workload: B also serves N random LoRA adapters of this rank "
                                                       "(requests spread over the base model and every adapter)")
    ap.add_argument("--max-concurrency", type=int, default=8)
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second (inf: all at once)")
    ap.add_argument("--decode-batch", type=int, default=32)
    ap.add_argument("--sampling", nargs="*", default=[], metavar="KEY=VALUE",
                    help="decode workload: the requests' sampling (SamplingParams fields; default greedy)")
    ap.add_argument("--sampling-b", nargs="*", default=None, metavar="KEY=VALUE",
                    help="decode workload: B's requests' sampling instead (e.g. temperature=0.8 top_p=0.9: the head's "
                         "top-k/top-p filters against greedy, with --set-b and nothing else)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="decode workload: profile the steps and print the N functions with the most own time")
    ap.add_argument("--decode-prompt-len", type=int, default=64, help="decode workload: prompt tokens per request")
    ap.add_argument("--page-size", type=int, default=16, help="for the ideal hit rate (HTTP mode)")
    ap.add_argument("--timeout-s", type=float, default=1800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the raw metrics here")
    ap.add_argument("--guided-regex", help="every output must match this regular expression (structured outputs)")
    ap.add_argument("--guided-json", help="every output must follow this JSON schema (given as JSON text)")
    ap.add_argument("--prompt-logprobs", type=int, help="every request also asks for its prompt's logprobs (top k)")
    ap.add_argument("--embed", action="store_true", help="every request is an embedding request (in-process mode)")
    ap.add_argument("--options-only-b", action="store_true",
                    help="--guided-* / --prompt-logprobs apply to configuration B only: their cost side by side")
    ap.add_argument("--vision-kind", choices=["llava", "gemma3"], default="llava",
                    help="--vision's tower: LLaVA-1.5's (576 positions), or Gemma 3's (256 positions seeing each other)")
    ap.add_argument("--vision", metavar="HIDDEN,LAYERS", help="a random LLaVA-1.5-shaped vision tower of this width and "
                    "depth in front of the model (the shared-image workload)")
    ap.add_argument("--synthetic-model", metavar="HIDDEN,LAYERS,HEADS,KV_HEADS,HEAD_DIM",
                    help="a random Llama of this shape (with the config's tokenizer) instead of the config's weights")
    ap.add_argument("--word-vocab", type=int, default=0, metavar="N",
                    help="--synthetic-model's tokenizer: a word-level vocabulary of N tokens instead of the config's "
                         "(a GPU machine, which has no model packages: scripts/gpu_check.sh)")
    ap.add_argument("--synthetic-mtp", choices=["right", "random"], default="",
                    help="--synthetic-model as GLM-4.5 with an MTP layer (for speculative.method=mtp): one whose every "
                         "greedy draft is right (the model's attention and all but its last layer's outputs zeroed, "
                         "the layer its last layer), or a random one")
    ap.add_argument("--synthetic-eagle3", choices=["right", "random"], default="",
                    help="--synthetic-model with an EAGLE-3 head (for speculative.method=eagle3): one whose every greedy "
                         "draft is right (the model's attention and all but its last layer's outputs zeroed, the head "
                         "its last MLP over the embedding), or a random one")
    ap.add_argument("--synthetic-arch", choices=["llama", "qwen3_5", "granite4"], default="llama",
                    help="--synthetic-model's layers: Llama's, Qwen3.5's (Gated DeltaNet around every 4th attention "
                         "layer) or Granite 4.0-H's (Mamba-2 likewise)")
    args = ap.parse_args(argv)
    args.set_a = args.set_common + args.set_a
    guided = {k: v for k, v in (("guided_regex", args.guided_regex),
                                ("guided_json", args.guided_json and json.loads(args.guided_json))) if v}
    options = guided | ({"prompt_logprobs": args.prompt_logprobs} if args.prompt_logprobs is not None else {})
    options |= {"embed": True} if args.embed else {}
    if args.workload == "decode":
        decode_overhead(args)
        return 0
    if args.workload == "steps":
        step_times(args)
        return 0
    if args.workload == "weight-swap":
        weight_swap(args)
        return 0
    if args.workload == "output-growth":
        output_growth(args)
        return 0

    runs: dict[str, list[dict]] = {}
    if args.url:
        tokenizer = None
        if args.workload in ("copy", "extraction", "prompts"):  # natural text: the served model's tokenizer, from --config
            from engine.config import load_config
            from models.loader import tokenizer_source
            from models.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(tokenizer_source(load_config(args.config, args.set_a).model.path))
        sessions, ideal = make_workload(args, vocab=49152, tokenizer=tokenizer)
        for url in args.url:
            res, wall = asyncio.run(run_http(url.rstrip("/"), args.model, sessions, args.max_concurrency,
                                             args.request_rate, random.Random(args.seed), args.timeout_s, guided))
            runs[url] = [summarize(res, wall, ideal)]
        names = list(args.url)
    else:
        from engine.config import load_config
        from engine.engine import LLMEngine

        configs = {"A": load_config(args.config, args.set_a)}
        if args.set_b is not None:
            configs["B"] = load_config(args.config, args.set_common + args.set_b)
        model, mtp_layer = given_model(args, configs["A"])
        vision = None
        if args.vision:  # the tower needs the model's config: its weights as arrays, for both engines
            from models.loader import load_weights, tokenizer_source
            from models.tokenizer import Tokenizer

            path = configs["A"].model.path
            model = model or (*load_weights(path), Tokenizer.load(tokenizer_source(path)))
            vision = synthetic_vision(args.vision, model[0], args.vision_kind)
        elif args.workload == "shared-image":
            raise SystemExit("--workload shared-image needs --vision HIDDEN,LAYERS")
        engines = {name: LLMEngine(cfg, model=model, vision=vision,
                                   draft=mtp_layer if cfg.speculative.method in ("mtp", "eagle3") else None)
                   for name, cfg in configs.items()}
        args.page_size = configs["A"].cache.page_size
        sessions, ideal = make_workload(args, engines["A"].model_cfg.vocab_size, engines["A"].tokenizer)
        for name, cfg in configs.items():
            print(f"{name}: --set {' '.join(args.set_a if name == 'A' else args.set_common + args.set_b) or '(none)'}", file=sys.stderr)
        for rep in range(args.repeats):
            for name, engine in engines.items():  # interleaved: A, B, A, B, ...
                engine.reset_prefix_cache()
                before = engine.stats()
                res, wall = run_engine(engine, sessions, args.max_concurrency, args.request_rate, random.Random(args.seed),
                                       None if args.options_only_b and name == "A" else options)
                runs.setdefault(name, []).append(summarize(res, wall, ideal))
                after = engine.stats()
                drafted = after["spec_draft_tokens"] - before["spec_draft_tokens"]
                if drafted:  # speculative decoding: accepted / verified draft tokens, and steps (hardware-independent)
                    runs[name][-1]["spec_acceptance"] = (after["spec_accepted_tokens"] - before["spec_accepted_tokens"]) / drafted
                    runs[name][-1]["steps"] = after["num_steps"] - before["num_steps"]
                if args.vision:  # images run through the vision tower (a cached image's positions need none)
                    runs[name][-1]["images_encoded"] = after["images_encoded"] - before["images_encoded"]
                print(f"repeat {rep + 1} {name}: {wall:.1f} s, hit rate {runs[name][-1]['token_hit_rate']:.1%}", file=sys.stderr)
        names = list(configs)
    print(f"\nworkload {args.workload}: {len(sessions)} sessions, concurrency {args.max_concurrency}, "
          f"rate {args.request_rate}/s, {args.repeats} repeat(s), medians")
    print_table(names, runs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args) | {"request_rate": str(args.request_rate)}, "runs": runs}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
