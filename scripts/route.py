#!/usr/bin/env python
"""The prefix-aware router: an OpenAI-compatible proxy in front of N replicas.

    python scripts/route.py --config configs/router.yaml \
        --set replicas=http://127.0.0.1:8001,http://127.0.0.1:8002 --set policy=prefix_aware

Endpoints: /v1/completions, /v1/chat/completions (streaming or not), /v1/models, /health,
/replicas (what the router knows of each replica), /metrics (Prometheus). See docs/routing.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import ConfigKeyError  # noqa: E402
from engine.router.config import load_router_config  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (configs/router.yaml)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_router_config(a.config, a.set)
    except ConfigKeyError as e:
        sys.exit(f"config error: {e}")
    import uvicorn

    from engine.router.app import create_app

    app = create_app(cfg)
    prefill = len(cfg.prefill_slots)
    print(f"router: {cfg.policy} over {len(cfg.replica_urls)} replicas"
          + (f" ({prefill} prefill only, disaggregated)" if prefill else "") + f" on http://{cfg.host}:{cfg.port}",
          flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")


if __name__ == "__main__":
    main()
