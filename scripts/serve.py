#!/usr/bin/env python
"""OpenAI-compatible server for one replica.

    python scripts/serve.py --config configs/serve-smollm2.yaml [--set dotted.key=value ...]

A bad config key or value stops start-up with exit code 2 and the message naming the key. SIGINT or
SIGTERM: stop accepting, end the requests in flight (streams get an error event, then [DONE]), exit.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import uvicorn  # noqa: E402

from engine.config import ConfigKeyError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file filling EngineConfig (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set server.port=8001 cache.num_pages=512")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigKeyError as e:
        print(f"serve.py: config error: {e}", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = config.server.api_key or os.environ.get("RADIXLM_API_KEY") or None
    if config.parallel.data > 1:  # several replicas on this host, the router in front (engine/local_replicas.py)
        from engine.local_replicas import serve

        return serve(args.config, args.overrides, config, api_key)
    from engine.async_engine import AsyncEngine
    from engine.engine import LLMEngine
    from engine.server import create_app

    print(f"serve.py: loading {config.model.path} (then compiling the step buckets) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        llm = LLMEngine(config, progress=True)
    except (ConfigKeyError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"serve.py: cannot start the engine: {e}", file=sys.stderr)
        return 2
    if not llm.is_leader:
        # Another process of a multi-host replica: run process 0's steps until it shuts down.
        print(f"serve.py: process {config.parallel.process_id} following process 0", file=sys.stderr, flush=True)
        llm.follow()
        return 0
    llm.warmup_sampling_filters()  # a server's requests may sample with top-k/top-p: compiled before they come
    stats = llm.stats()
    print(f"serve.py: engine ready in {time.perf_counter() - t0:.1f} s: {stats['pages_total']} KV pages of "
          f"{config.cache.page_size} tokens ({config.cache.kv_dtype}), context {llm.max_model_len} tokens",
          file=sys.stderr, flush=True)

    engine = AsyncEngine(llm, max_waiting=config.server.max_waiting_requests)
    app = create_app(engine, config, api_key)
    server = _Server(uvicorn.Config(app, host=config.server.host, port=config.server.port, log_level="info",
                                    access_log=False, timeout_graceful_shutdown=5), engine)
    print(f"serve.py: serving {config.served_model_name!r} on http://{config.server.host}:{config.server.port}/v1"
          f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
    server.run()
    llm.shutdown()  # releases the followers of a multi-host replica
    return 0


class _Server(uvicorn.Server):
    """uvicorn, plus: a shutdown signal also ends the requests in flight, so open streams close promptly."""

    def __init__(self, config: uvicorn.Config, engine):
        super().__init__(config)
        self._engine = engine

    def handle_exit(self, sig, frame) -> None:
        self._engine.begin_shutdown()
        super().handle_exit(sig, frame)
        # NOTE: uvicorn re-raises captured signals after its graceful shutdown (exit -15, or a
        # KeyboardInterrupt traceback); the shutdown is complete by then, so exit 0 instead.
        self._captured_signals.clear()


if __name__ == "__main__":
    sys.exit(main())
