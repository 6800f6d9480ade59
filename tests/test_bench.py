"""scripts/bench.py end to end: on a synthetic model, two configurations side by side, one table; the weight-swap timings on SmolLM2."""
from __future__ import annotations

import json

import pytest

from scripts import bench


def test_side_by_side_on_a_synthetic_model(tmp_path, capsys):
    out = tmp_path / "runs.json"
    small = ["scheduler.max_batch_tokens=64", "scheduler.max_running=4", "model.max_model_len=128", "cache.num_pages=64"]
    rc = bench.main(["--workload", "random", "--synthetic-model", "32,1,4,2,8", "--num-requests", "6", "--system-len", "20",
                     "--question-len", "4", "--output-len", "5", "--max-concurrency", "3", "--repeats", "2",
                     "--set", *small, "--set-a", "scheduler.overlap=false", "--set-b", "scheduler.overlap=true",
                     "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "request_throughput" in table and "B/A" in table
    runs = json.loads(out.read_text())["runs"]
    for name in ("A", "B"):
        assert len(runs[name]) == 2
        assert all(r["requests"] == 6 and r["errors"] == 0 for r in runs[name])


def test_embedding_requests_through_the_shared_prefix_workload(tmp_path, capsys):
    """--embed: every request an embedding (no output tokens), the shared prefixes served from the cache in B."""
    out = tmp_path / "runs.json"
    small = ["scheduler.max_batch_tokens=64", "scheduler.max_running=4", "model.max_model_len=128", "cache.num_pages=64"]
    rc = bench.main(["--workload", "shared-prefix", "--embed", "--synthetic-model", "32,1,4,2,8", "--groups", "2",
                     "--prompts-per-group", "3", "--system-len", "32", "--question-len", "4", "--max-concurrency", "3",
                     "--set", *small, "--set-a", "cache.prefix_caching=false", "--set-b", "cache.prefix_caching=true",
                     "--json", str(out)])
    assert rc == 0 and "request_throughput" in capsys.readouterr().out
    runs = json.loads(out.read_text())["runs"]
    assert all(r["requests"] == 6 and r["errors"] == 0 and r["output_throughput"] == 0 for name in "AB" for r in runs[name])
    assert runs["A"][0]["cached_tokens"] == 0 < runs["B"][0]["cached_tokens"]


@pytest.mark.parametrize("workload,method", [("copy", "ngram"), ("extraction", "suffix")])
def test_copy_workload_reports_draft_acceptance(tmp_path, capsys, workload, method):
    """The copy and extraction workloads (natural-text chat prompts, ending at the end token) with speculative decoding
    in B only: the table gains B's draft acceptance, and both configurations produce the same number of tokens."""
    out = tmp_path / "runs.json"
    small = ["scheduler.max_batch_tokens=128", "scheduler.max_running=4", "model.max_model_len=256", "cache.num_pages=64"]
    rc = bench.main(["--workload", workload, "--synthetic-model", "32,1,4,2,8", "--num-requests", "4", "--copy-sentences", "2",
                     "--output-len", "24", "--max-concurrency", "4", "--set", *small,
                     "--set-b", f"speculative.method={method}", "speculative.ngram_min=1", "--json", str(out)])
    assert rc == 0
    assert "spec_acceptance" in capsys.readouterr().out
    runs = json.loads(out.read_text())["runs"]
    assert "spec_acceptance" not in runs["A"][0] and 0 <= runs["B"][0]["spec_acceptance"] <= 1
    tokens = [round(r[0]["output_throughput"] * r[0]["wall_s"]) for r in (runs["A"], runs["B"])]
    assert tokens[0] == tokens[1] > 0


def test_decode_with_random_lora_adapters_in_b(capsys):
    rc = bench.main(["--workload", "decode", "--synthetic-model", "32,1,4,2,8", "--decode-batch", "3", "--output-len", "6",
                     "--set", "scheduler.max_batch_tokens=64", "scheduler.max_running=4", "model.max_model_len=128",
                     "cache.num_pages=32", "--set-b", "--lora-b", "2,4"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("pure-decode steps") == 2 and "lora.adapters.lora1=" in out


def _gpu_check_arguments(name: str, monkeypatch) -> tuple[str, list[str]]:
    """(scripts/gpu_check.sh's text, the bench.py arguments of its array `name`), with the config's tokenizer made
    unloadable: the GPU machine has no model package."""
    import pathlib
    import re
    import shlex

    from models import loader

    script = (pathlib.Path(__file__).parent.parent / "scripts" / "gpu_check.sh").read_text()
    array = re.search(rf"^{name}=\((.*?)\)$", script, re.S | re.M).group(1)
    monkeypatch.setattr(loader, "tokenizer_source", lambda *a: pytest.fail("the config's tokenizer was loaded"))
    return script, shlex.split(array)[1:]


def test_gpu_checks_engine_step_runs_without_a_model_package(monkeypatch, capsys):
    """scripts/gpu_check.sh's engine step, its own arguments, on a machine with no model package (the GPU box): a
    random model with a word-level vocabulary, greedy in A and top-p in B. Here at tiny shapes, on the CPU, through
    the interpret-mode kernels (the later arguments override the GPU's)."""
    import re

    script, gpu_args = _gpu_check_arguments("engine_bench", monkeypatch)
    calls = re.findall(r'"\$\{engine_bench\[@\]\}" (--synthetic-arch \S+ --synthetic-model \S+)', script)
    assert len(calls) == 2
    tiny = {"llama": "32,2,4,2,8", "qwen3_5": "32,4,4,2,8"}
    for call in calls:
        arch = call.split()[1]
        args = gpu_args + call.split()[:2] + [
            "--synthetic-model", tiny[arch], "--decode-batch", "3", "--output-len", "4", "--repeats", "1",
            "--set", "attention.backend=pallas_interpret", "model.dtype=float32", "scheduler.max_running=4",
            "cache.num_pages=64"]
        assert bench.main(args) == 0
        out = capsys.readouterr().out
        assert out.count("pure-decode steps") == 2, out
        assert "sampling greedy" in out and "sampling temperature=0.8 top_p=0.9" in out


def test_gpu_checks_steps_workload_on_a_synthetic_hybrid(monkeypatch, capsys):
    """scripts/gpu_check.sh's `steps` step, its own arguments, on a tiny Qwen3.5-shaped model through the interpret-mode
    kernels: every fixed shape timed, decodes in the decode program, prefills in the ragged one, no model package."""
    _, gpu_args = _gpu_check_arguments("steps_bench", monkeypatch)
    args = gpu_args + ["--synthetic-arch", "qwen3_5", "--synthetic-model", "32,4,4,2,8", "--repeats",
                                     "1", "--set", "attention.backend=pallas_interpret", "model.dtype=float32",
                                     "cache.num_pages=256"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("(decode program)") == 3 and out.count("(ragged program)") == 4, out


@pytest.mark.slow
def test_weight_swap_reports_each_phase(capsys):
    rc = bench.main(["--workload", "weight-swap", "--repeats", "1", "--set-a", "model.max_model_len=256",
                     "cache.num_pages=64", "warmup=false"])
    out = capsys.readouterr().out
    assert rc == 0
    for phase in ("read + lay out the checkpoint", "swap (update_weights)", "sleep (level 1)", "wake_up",
                  "first request after (4 tokens)", "device bytes freed by sleep"):
        assert phase in out
    freed = float(out.split("device bytes freed by sleep")[1].split()[0])
    assert freed > 100  # MiB: SmolLM2's weights (f32, ~540 MiB) and its KV cache leave the device


def test_output_growth_workload_runs(capsys):
    """The output-growth workload prints a per-step time for each quarter of the outputs."""
    assert bench.main(["--workload", "output-growth", "--decode-batch", "4", "--output-len", "400"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tokens ")]
    assert len(lines) == 4 and all("ms per step (4 sequences" in line for line in lines)
