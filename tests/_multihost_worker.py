"""One process of a two-process replica (tests/test_parallel.py): tiny Llama, tensor parallel over both hosts."""
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(process_id: int, port: int, out_path: str) -> None:
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.llm import LLM
    from engine.request import SamplingParams
    from tests.test_parallel import BASE, tiny_model, workload

    config = EngineConfig().replace(**{**BASE, "cache.num_pages": 16, "parallel.tensor": 4, "parallel.num_processes": 2,
                                       "parallel.process_id": process_id, "parallel.coordinator_address": f"127.0.0.1:{port}",
                                       "compilation_cache_dir": ""})
    from engine import multihost

    multihost.initialize(config.parallel)  # before building the model touches a device
    model = tiny_model()
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
