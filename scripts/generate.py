#!/usr/bin/env python3
"""Offline batch generation: JSONL in, JSONL out, through the continuous batch.

    python scripts/generate.py --config configs/smollm2-135m.yaml --input in.jsonl --output out.jsonl \
        [--set cache.num_pages=512 ...] [--print]

Input line:  {"id", "prompt"} or {"id", "messages"}, optional max_tokens, min_tokens, temperature, top_p, top_k,
             min_p, seed, stop, ignore_eos, presence_penalty, frequency_penalty, repetition_penalty, logit_bias
             ({"token id": bias}), cache_salt, priority (with scheduler.policy=priority: lower runs first),
             adapter (one of the config's lora.adapters), chat_template_kwargs (with messages: variables for the
             chat template, e.g. {"enable_thinking": false}),
             and one structured-output constraint: response_format (OpenAI's: {"type": "json_object"} or
             {"type": "json_schema", "json_schema": {"schema": {...}}}), guided_json (a JSON schema),
             guided_regex, guided_choice (a list of strings) or guided_grammar (Lark); logprobs /
             prompt_logprobs (0..20) add the generated / prompt tokens' logprobs to the output line
             (scoring texts: prompt_logprobs 0 and max_tokens 1); "embed": true asks for the prompt's embedding
             instead (last-token pooling, unit length; no sampling fields).
Output line: {"id", "text", "token_ids", "finish_reason", "prompt_tokens", "cached_tokens"[, "logprobs"]
             [, "prompt_logprobs" (the first is null)][, "reasoning_content" (messages lines, with
             --set server.reasoning_parser=qwen3 | deepseek_r1: the thinking, "text" the answer)]},
             {"id", "embedding", "prompt_tokens", "cached_tokens"} for an embedding, or {"id", "error"} for a bad line;
             the job goes on.
OpenAI's Batch API format is read too (found from the first line, or --format openai): input lines
{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings", "body"},
output lines {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}; the bodies take every
field the server's endpoints take, and get the responses the server would send (engine/openai_batch.py).
Re-running with the same output file resumes: ids already answered there are skipped. Ctrl-C (SIGINT) or
SIGTERM (a job scheduler's stop) stops cleanly; every line written is whole. A summary ends the run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import ConfigKeyError, load_config  # noqa: E402
from engine import openai_batch, structured  # noqa: E402
from engine.reasoning import split as split_reasoning  # noqa: E402
from engine.request import RequestError, SamplingParams  # noqa: E402

SAMPLING_FIELDS = {
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "ignore_eos",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs", "prompt_logprobs", "logit_bias",
    "min_tokens",
}
LINE_FIELDS = SAMPLING_FIELDS | set(structured.FIELDS) | {"id", "prompt", "messages", "cache_salt", "priority", "adapter",
                                                           "embed", "chat_template_kwargs"}
DEFAULT_MAX_TOKENS = 256


def parse_line(line: str, number: int) -> tuple[str | None, dict | None, str | None]:
    """-> (id, request fields, error). A line that is not a JSON object with an id gets id None."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, None, f"line {number}: not valid JSON ({e.msg})"
    if not isinstance(obj, dict):
        return None, None, f"line {number}: expected a JSON object"
    rid = obj.get("id")
    if rid is None or not isinstance(rid, (str, int)) or isinstance(rid, bool):
        return None, None, f"line {number}: missing or invalid 'id' (a string or integer)"
    rid = str(rid)
    unknown = sorted(set(obj) - LINE_FIELDS)
    if unknown:
        return rid, None, f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(LINE_FIELDS))})"
    if ("prompt" in obj) == ("messages" in obj):
        return rid, None, "exactly one of 'prompt' (text) or 'messages' (chat) is required"
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        return rid, None, "'prompt' must be a string"
    if "messages" in obj and not (
        isinstance(obj["messages"], list)
        and obj["messages"]
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in obj["messages"])
    ):
        return rid, None, "'messages' must be a non-empty list of {role, content} strings"
    if "chat_template_kwargs" in obj and ("messages" not in obj or not isinstance(obj["chat_template_kwargs"], dict)):
        return rid, None, "'chat_template_kwargs' must be an object, with 'messages'"
    if obj.get("cache_salt") is not None and not isinstance(obj["cache_salt"], str):
        return rid, None, "'cache_salt' must be a string or null"
    return rid, obj, None


def sampling_params(obj: dict) -> SamplingParams:
    if obj.get("embed", False) is not False:
        given = sorted((SAMPLING_FIELDS | set(structured.FIELDS)) & set(obj))
        if obj["embed"] is not True or given:
            raise RequestError("'embed' must be true, and an embedding line takes no sampling fields"
                               + (f" (got {given[0]!r})" if given else ""))
        return SamplingParams.embedding()
    kwargs = {k: obj[k] for k in SAMPLING_FIELDS if k in obj}
    kwargs.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(kwargs.get("stop"), str):
        kwargs["stop"] = (kwargs["stop"],)
    kwargs["structured"] = structured.from_fields(obj)
    try:
        return SamplingParams(**kwargs)
    except TypeError as e:
        raise RequestError(str(e)) from e


def answered(path: str, key: str = "id") -> tuple[set[str], set[int]]:
    """Ids (`key`: id, or custom_id in OpenAI's format) already in the output file, and the numbers of input lines
    answered without an id.

    A torn last line (killed mid-write) is cut off first."""
    if not os.path.exists(path):
        return set(), set()
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            f.truncate(end)
    ids, lines = set(), set()
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
            if record[key] is None:
                lines.add(int(record["line"]))
            else:
                ids.add(str(record[key]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return ids, lines


def _run_lines(args, config, engine, done: set[str], done_lines: set[int], totals: dict, t0: float) -> None:
    """This job's own line format, fed to the engine directly as the batch drains."""
    from tqdm import tqdm

    max_waiting = 4 * config.scheduler.max_running  # requests are fed as the batch drains, not all at once
    pending: dict[str, str] = {}  # engine request id -> user id
    chat_lines: dict[str, bool] = {}  # engine request id -> the line had messages (a reasoning parser splits those)

    with open(args.input) as src, open(args.output, "a") as out, tqdm(desc="requests", unit="req") as bar:

        def emit(record: dict) -> None:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(1)
            if args.echo and "text" in record:
                tqdm.write(f"[{record['id']}] {record['text']}")

        def drain(limit: int) -> None:
            while len(pending) > limit:
                for r in engine.step():
                    if r.request_id in pending:
                        totals["streamed"] += len(r.delta_token_ids)  # live rate counts unfinished requests too
                    if not r.finished or r.request_id not in pending:
                        continue
                    rid = pending.pop(r.request_id)
                    totals["requests"] += 1
                    totals["prompt"] += r.prompt_tokens
                    totals["cached"] += r.cached_tokens
                    totals["generated"] += len(r.token_ids)
                    record = {"id": rid, "text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
                              "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens}
                    if chat_lines.pop(r.request_id, False) and config.server.reasoning_parser != "none":
                        thinking, record["text"] = split_reasoning(r.text, config.server.reasoning_parser)
                        record["reasoning_content"] = thinking
                    if r.embedding is not None:
                        record = {"id": rid, "embedding": r.embedding.tolist(), "prompt_tokens": r.prompt_tokens,
                                  "cached_tokens": r.cached_tokens}
                    if r.logprobs is not None:
                        record["logprobs"] = r.logprobs
                    if r.prompt_logprobs is not None:
                        record["prompt_logprobs"] = r.prompt_logprobs
                    emit(record)
                elapsed = time.perf_counter() - t0
                hit = totals["cached"] / totals["prompt"] if totals["prompt"] else 0.0
                bar.set_postfix(tok_s=f"{totals['streamed'] / elapsed:.1f}", hit=f"{hit:.0%}", running=len(pending))

        try:
            seen: set[str] = set(done)
            for number, line in enumerate(src, 1):
                if not line.strip():
                    continue
                if number in done_lines:
                    continue
                rid, obj, error = parse_line(line, number)
                if rid is not None and rid in seen:
                    if rid not in done:
                        totals["duplicates"] += 1
                    continue
                if error is None:
                    try:
                        prompt = (engine.tokenizer.encode_chat(obj["messages"], **obj.get("chat_template_kwargs", {}))
                                  if "messages" in obj else obj["prompt"])
                        engine_id = engine.add_request(prompt, sampling_params(obj), namespace=obj.get("cache_salt"),
                                                       priority=obj.get("priority", 0), adapter=obj.get("adapter"))
                        pending[engine_id] = rid
                        chat_lines[engine_id] = "messages" in obj
                    except (RequestError, ValueError) as e:
                        error = str(e)
                if rid is not None:
                    seen.add(rid)
                if error is not None:
                    totals["errors"] += 1
                    emit({"id": rid, "error": error} if rid is not None else {"id": None, "line": number, "error": error})
                drain(max_waiting)
            drain(0)
        except KeyboardInterrupt:
            print(f"\ninterrupted: {len(pending)} requests unanswered; run again to resume", file=sys.stderr)


def _run_openai(args, config, engine, done: set[str], done_lines: set[int], totals: dict, t0: float) -> None:
    """OpenAI's Batch API lines, answered by the server's handlers (engine/openai_batch.py)."""
    import asyncio

    from tqdm import tqdm

    from engine.async_engine import AsyncEngine
    from engine.server import create_app

    app = create_app(AsyncEngine(engine), config)

    def lines():
        seen = set(done)
        with open(args.input) as src:
            for number, raw in enumerate(src, 1):
                if not raw.strip() or number in done_lines:
                    continue
                line = openai_batch.parse_line(raw, number)
                if line.custom_id is not None and line.custom_id in seen:
                    totals["duplicates"] += line.custom_id not in done
                    continue
                if line.custom_id is not None:
                    seen.add(line.custom_id)
                yield line

    with open(args.output, "a") as out, tqdm(desc="requests", unit="req") as bar:

        def emit(record: dict) -> None:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(1)
            response = record["response"]
            if response is None or response["status_code"] != 200:
                totals["errors"] += 1
                return
            totals["requests"] += 1
            usage = response["body"].get("usage", {})
            totals["prompt"] += usage.get("prompt_tokens", 0)
            totals["cached"] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            totals["generated"] += usage.get("completion_tokens", 0)
            if args.echo:
                for choice in response["body"].get("choices", []):
                    text = choice["message"]["content"] if "message" in choice else choice["text"]
                    tqdm.write(f"[{record['custom_id']}] {text}")
            elapsed = time.perf_counter() - t0
            hit = totals["cached"] / totals["prompt"] if totals["prompt"] else 0.0
            bar.set_postfix(tok_s=f"{totals['generated'] / elapsed:.1f}", hit=f"{hit:.0%}")

        concurrency = 4 * config.scheduler.max_running  # requests in flight (the rest wait in the file)
        if not asyncio.run(openai_batch.run(app, lines(), emit, concurrency)):
            print("\ninterrupted: requests in flight dropped; run again to resume", file=sys.stderr)


def _stop_cleanly(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # NOTE: a process inherits an ignored SIGINT (a `cmd &` in a non-interactive shell, some test runners), and
    # Python then leaves it ignored: Ctrl-C and SIGTERM both stop the job cleanly whatever the parent did.
    signal.signal(signal.SIGINT, _stop_cleanly)
    signal.signal(signal.SIGTERM, _stop_cleanly)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--print", dest="echo", action="store_true", help="also print each answer")
    ap.add_argument("--format", choices=("auto", "lines", "openai"), default="auto",
                    help="input format: this job's own lines, or OpenAI's Batch API lines (auto: from the first line)")
    args = ap.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigKeyError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if not os.path.isfile(args.input):
        print(f"input file {args.input} not found", file=sys.stderr)
        return 2

    from engine.engine import LLMEngine

    openai_format = args.format == "openai" or (args.format == "auto" and openai_batch.is_batch_file(args.input))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    done, done_lines = answered(args.output, "custom_id" if openai_format else "id")
    if done or done_lines:
        print(f"resuming: {len(done)} ids already in {args.output}", file=sys.stderr)
    engine = LLMEngine(config, progress=True)
    if not engine.is_leader:  # another process of a multi-host replica: replay process 0's steps
        engine.follow()
        return 0
    totals = dict(requests=0, errors=0, duplicates=0, prompt=0, cached=0, generated=0, streamed=0)
    t0 = time.perf_counter()
    (_run_openai if openai_format else _run_lines)(args, config, engine, done, done_lines, totals, t0)
    engine.shutdown()
    wall = time.perf_counter() - t0
    hit = totals["cached"] / totals["prompt"] if totals["prompt"] else 0.0
    print(
        f"summary: {totals['requests']} requests answered, {totals['errors']} errors, {totals['duplicates']} duplicate ids skipped | "
        f"prompt tokens {totals['prompt']}, cached {totals['cached']} (hit rate {hit:.1%}), generated {totals['generated']} | "
        f"{totals['requests'] / wall:.2f} req/s, {totals['generated'] / wall:.1f} generated tok/s | wall {wall:.1f} s "
        f"(+ start-up {engine.startup_s:.1f} s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
