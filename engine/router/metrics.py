"""The router's Prometheus metrics (GET /metrics)."""
from __future__ import annotations


class RouterMetrics:
    """Prometheus metrics in a registry of their own (several routers can live in one process)."""

    def __init__(self, urls: tuple[str, ...]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("radixlm_router_requests", "Requests forwarded, per replica", ["replica"], registry=r)
        self.decisions = Counter("radixlm_router_decisions", "Policy decisions", ["policy", "reason"], registry=r)
        self.retries = Counter("radixlm_router_retries", "Attempts that failed before the first byte and were retried",
                               ["replica"], registry=r)
        self.failures = Counter("radixlm_router_failures", "Requests the router could not complete", ["kind"],
                                registry=r)
        self.up = Gauge("radixlm_router_replica_up", "1 if the replica is routable", ["replica"], registry=r)
        self.in_flight = Gauge("radixlm_router_replica_in_flight", "Requests in flight per replica", ["replica"],
                               registry=r)
        self.index_blocks = Gauge("radixlm_router_index_blocks", "Confirmed block hashes indexed per replica",
                                  ["replica"], registry=r)
        self.prompt_tokens = Counter("radixlm_router_prompt_tokens", "Prompt tokens routed", registry=r)
        self.matched_tokens = Counter("radixlm_router_matched_tokens",
                                      "Prompt tokens the chosen replica held, per the index", registry=r)
        self.handoffs = Counter("radixlm_router_prefill_handoffs",
                                "Generation requests sent to a prefill replica first (disaggregation), by outcome",
                                ["outcome"], registry=r)
        self.prefill_seconds = Histogram("radixlm_router_prefill_seconds",
                                         "A prefill replica's answer time (prompt computed and on disk)", registry=r)
        self.peer_fetches = Counter("radixlm_router_peer_fetches",
                                    "Offers of a prompt's cached pages asked of the replica holding the most of it, "
                                    "for the replica chosen (peer_fetch_min_tokens), by outcome", ["outcome"],
                                    registry=r)
        self.hit_rate = Gauge("radixlm_router_hit_rate_estimate", "matched prefix tokens / prompt tokens",
                              registry=r)
        for url in urls:
            self.up.labels(url).set(0)
