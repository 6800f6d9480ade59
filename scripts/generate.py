#!/usr/bin/env python3
"""Offline batch generation: JSONL in, JSONL out, through the continuous batch.

    python scripts/generate.py --config configs/smollm2-135m.yaml --input in.jsonl --output out.jsonl \
        [--set cache.num_pages=512 ...] [--print]

Input line:  {"id", "prompt"}, {"id", "messages"} or {"id", "prompt_embeds"} (with model.enable_prompt_embeds: a
             .npy or safetensors file of [tokens, hidden] rows, or one base64-encoded), optional max_tokens,
             min_tokens, temperature, top_p, top_k,
             min_p, seed, stop, ignore_eos, presence_penalty, frequency_penalty, repetition_penalty, logit_bias
             ({"token id": bias}), truncate_prompt_tokens (keep the prompt's last k tokens; -1: as many as fit),
             stop_token_ids, allowed_token_ids, bad_words, include_stop_str_in_output, skip_special_tokens (vLLM's),
             cache_salt, priority (with scheduler.policy=priority: lower runs first),
             adapter (one of the config's lora.adapters), chat_template_kwargs (with messages: variables for the
             chat template, e.g. {"enable_thinking": false}),
             and one structured-output constraint: response_format (OpenAI's: {"type": "json_object"} or
             {"type": "json_schema", "json_schema": {"schema": {...}}}), guided_json (a JSON schema),
             guided_regex, guided_choice (a list of strings) or guided_grammar (Lark); logprobs /
             prompt_logprobs (0..20) add the generated / prompt tokens' logprobs to the output line
             (scoring texts: prompt_logprobs 0 and max_tokens 1); return_hidden_states (SGLang's) adds each
             generated token's final hidden state ("hidden_states": [tokens][hidden]); "embed": true asks for the
             prompt's embedding instead (last-token pooling, unit length; no sampling fields).
Output line: {"id", "text", "token_ids", "finish_reason", "prompt_tokens", "cached_tokens"[, "logprobs"]
             [, "prompt_logprobs" (the first is null)][, "hidden_states"][, "reasoning_content" (messages lines, with
             --set server.reasoning_parser=qwen3 | deepseek_r1: the thinking, "text" the answer)]},
             {"id", "embedding", "prompt_tokens", "cached_tokens"} for an embedding, or {"id", "error"} for a bad line;
             the job goes on. On a sequence classifier or reward model (an HF *ForSequenceClassification
             checkpoint) every line is classified instead: {"id", "logits", "label", "prompt_tokens",
             "cached_tokens"}, a "messages" line as the conversation stands (no generation prompt), no sampling
             fields.
Rerank line: {"id", "query", "documents"} (optional cache_salt, priority, adapter) -> {"id", "scores" (one per
             document, in order), "prompt_tokens", "cached_tokens"}: on a cross-encoder or yes / no reranker
             (model.classifier_from_token) each pair's relevance, the query's pages shared by its documents; on any
             other model the cosine similarity of embeddings (POST /v1/rerank's scores).
OpenAI's Batch API format is read too (found from the first line, or --format openai): input lines
{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings", "body"},
output lines {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}; the bodies take every
field the server's endpoints take, and get the responses the server would send (engine/openai_batch.py).
With parallel.data=N the lines go to N replicas, one engine process each on its own devices, routed by prefix
(engine/data_parallel.py). Re-running with the same output file resumes: ids already answered there are skipped. Ctrl-C (SIGINT) or
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
from engine import offline_job, openai_batch  # noqa: E402
from engine.offline_job import parse_line, sampling_params  # noqa: E402,F401 (this job's line format)

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
    job = offline_job.LineJob(engine, config.server.reasoning_parser)
    with open(args.output, "a") as out, tqdm(desc="requests", unit="req") as bar:
        emit = _emitter(args, out, bar, offline_job.count, totals)

        def drain(limit: int) -> None:
            while len(job) > limit:
                for record in job.step():
                    emit(record)
                _progress(bar, totals, job.streamed, t0, running=len(job))

        try:
            for number, rid, obj, error in own_lines(args.input, done, done_lines, totals):
                if error is None:
                    error = job.submit(rid, obj)
                if error is not None:
                    emit({"id": rid, "error": error} if rid is not None else {"id": None, "line": number, "error": error})
                drain(max_waiting)
            drain(0)
        except KeyboardInterrupt:
            print(f"\ninterrupted: {len(job)} requests unanswered; run again to resume", file=sys.stderr)


def own_lines(path: str, done: set[str], done_lines: set[int], totals: dict):
    """(line number, id, fields, error) of each input line still to answer; ids seen before are skipped (a second
    line with an id already used is counted as a duplicate)."""
    seen: set[str] = set(done)
    with open(path) as src:
        for number, line in enumerate(src, 1):
            if not line.strip() or number in done_lines:
                continue
            rid, obj, error = parse_line(line, number)
            if rid is not None and rid in seen:
                totals["duplicates"] += rid not in done
                continue
            if rid is not None:
                seen.add(rid)
            yield number, rid, obj, error


def openai_lines(path: str, done: set[str], done_lines: set[int], totals: dict):
    """The Batch file's lines still to answer (openai_batch.BatchLine), duplicates of a custom_id skipped."""
    seen = set(done)
    with open(path) as src:
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


def _progress(bar, totals: dict, tokens: int, t0: float, **extra) -> None:
    """The bar's live figures: generated tokens per second since `t0`, the prompt tokens' hit rate, and `extra`."""
    hit = totals["cached"] / totals["prompt"] if totals["prompt"] else 0.0
    bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.1f}", hit=f"{hit:.0%}", **extra)


def _emitter(args, out, bar, count, totals: dict):
    """Writes an output line whole (a killed job leaves whole lines), counts it, shows it with --print."""
    from tqdm import tqdm

    def emit(record: dict) -> None:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
        bar.update(1)
        count(record, totals)
        if args.echo:
            for key, text in openai_batch.texts(record) if "custom_id" in record else [(record["id"], record.get("text"))]:
                if text is not None:
                    tqdm.write(f"[{key}] {text}")

    return emit


def _run_openai(args, config, engine, done: set[str], done_lines: set[int], totals: dict, t0: float) -> None:
    """OpenAI's Batch API lines, answered by the server's handlers (engine/openai_batch.py)."""
    import asyncio

    from tqdm import tqdm

    from engine.async_engine import AsyncEngine
    from engine.server import create_app

    app = create_app(AsyncEngine(engine), config)
    with open(args.output, "a") as out, tqdm(desc="requests", unit="req") as bar:
        emit = _emitter(args, out, bar, openai_batch.count, totals)

        def show(record: dict) -> None:
            emit(record)
            _progress(bar, totals, totals["generated"], t0)

        concurrency = 4 * config.scheduler.max_running  # requests in flight (the rest wait in the file)
        lines = openai_lines(args.input, done, done_lines, totals)
        if not asyncio.run(openai_batch.run(app, lines, show, concurrency)):
            print("\ninterrupted: requests in flight dropped; run again to resume", file=sys.stderr)


def _run_replicas(args, config, openai_format: bool, done: set[str], done_lines: set[int], totals: dict):
    """parallel.data replicas, one engine process each (engine.data_parallel); this process reads, routes and writes.
    -> (when the lines started, the slowest replica's start-up)."""
    from tqdm import tqdm

    from engine.data_parallel import Coordinator

    count = openai_batch.count if openai_format else offline_job.count
    lines = (openai_lines if openai_format else own_lines)(args.input, done, done_lines, totals)
    coordinator = Coordinator(args.config, args.overrides, config, openai_format)
    t0, startup_s = time.perf_counter(), 0.0
    try:
        startup_s = coordinator.wait_ready()
        t0 = time.perf_counter()
        with open(args.output, "a") as out, tqdm(desc="requests", unit="req") as bar:
            write = _emitter(args, out, bar, count, totals)

            def show(record: dict) -> None:
                write(record)
                _progress(bar, totals, totals["generated"], t0, replicas=sum(s.up for s in coordinator.states))

            coordinator.run(lines, show)
        print("lines answered per replica: " + ", ".join(f"{i}: {n}" for i, n in enumerate(coordinator.answered)),
              file=sys.stderr)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {coordinator.stop()} requests unanswered; run again to resume", file=sys.stderr)
    return t0, startup_s


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
    ap.add_argument("--set", dest="overrides", nargs="*", action="extend", default=[], metavar="KEY=VALUE")
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
    if config.parallel.prefill_replicas:
        print("config error: parallel.prefill_replicas (prefill/decode disaggregation) is serve.py's; an offline job "
              "is after throughput, which every replica doing both gives", file=sys.stderr)
        return 2

    from engine.engine import LLMEngine

    openai_format = args.format == "openai" or (args.format == "auto" and openai_batch.is_batch_file(args.input))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    done, done_lines = answered(args.output, "custom_id" if openai_format else "id")
    if done or done_lines:
        print(f"resuming: {len(done)} ids already in {args.output}", file=sys.stderr)
    totals = dict(requests=0, errors=0, duplicates=0, prompt=0, cached=0, generated=0)
    if config.parallel.data > 1:
        t0, startup_s = _run_replicas(args, config, openai_format, done, done_lines, totals)
    else:
        engine = LLMEngine(config, progress=True)
        if not engine.is_leader:  # another process of a multi-host replica: replay process 0's steps
            engine.follow()
            return 0
        t0, startup_s = time.perf_counter(), engine.startup_s
        (_run_openai if openai_format else _run_lines)(args, config, engine, done, done_lines, totals, t0)
        engine.shutdown()
    wall = time.perf_counter() - t0
    hit = totals["cached"] / totals["prompt"] if totals["prompt"] else 0.0
    print(
        f"summary: {totals['requests']} requests answered, {totals['errors']} errors, {totals['duplicates']} duplicate ids skipped | "
        f"prompt tokens {totals['prompt']}, cached {totals['cached']} (hit rate {hit:.1%}), generated {totals['generated']} | "
        f"{totals['requests'] / wall:.2f} req/s, {totals['generated'] / wall:.1f} generated tok/s | wall {wall:.1f} s "
        f"(+ start-up {startup_s:.1f} s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
