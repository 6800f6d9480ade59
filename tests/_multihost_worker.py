"""One process of a two-process replica (tests/test_parallel.py): a tiny Llama (tensor parallel 4: two CPU devices
per process), or a tiny Qwen3.5-shaped model with speculative decoding (tensor parallel 2: one device per process),
over both hosts."""
import json
import os
import sys

MODEL = sys.argv[4] if len(sys.argv) > 4 else "llama"
os.environ["JAX_PLATFORMS"] = "cpu"
# (the other flags as inherited: scripts/test.sh's faster CPU compile among them)
os.environ["XLA_FLAGS"] = " ".join([f for f in os.environ.get("XLA_FLAGS", "").split()
                                    if not f.startswith("--xla_force_host_platform_device_count")]
                                   + [f"--xla_force_host_platform_device_count={2 if MODEL == 'llama' else 1}"])
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # (the tests import each other's helpers)


def main(process_id: int, port: int, out_path: str) -> None:
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.llm import LLM
    from engine.request import SamplingParams
    from tests.test_parallel import BASE, HYBRID, hybrid_model, tiny_model, workload

    config = EngineConfig().replace(**{**BASE, "cache.num_pages": 16, "parallel.tensor": 4, "parallel.num_processes": 2,
                                       "parallel.process_id": process_id, "parallel.coordinator_address": f"127.0.0.1:{port}",
                                       "compilation_cache_dir": ""})
    if MODEL != "llama":
        config = config.replace(**{**HYBRID, "parallel.tensor": 2})
    from engine import multihost

    multihost.initialize(config.parallel)  # before building the model touches a device
    model = tiny_model() if MODEL == "llama" else hybrid_model()
    if process_id != 0:
        engine = LLMEngine(config, progress=False, model=model)
        engine.follow()
        return
    llm = LLM(config, progress=False, model=model)
    outs = llm.generate(workload(model[0].vocab_size), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    llm.engine.shutdown()
    with open(out_path, "w") as f:
        json.dump([o.token_ids for o in outs], f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
