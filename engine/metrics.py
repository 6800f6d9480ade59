"""Prometheus metrics of one replica (`GET /metrics`), in a registry of its own.

Per-request metrics (tokens, latencies) are recorded when a request finishes; engine-wide numbers
(pages, queue, preemptions, evictions) are read from the latest `engine.stats()` at scrape time.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.engine import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TPOT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _EngineStatsCollector:
    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats

    def collect(self):
        s = self._stats()
        gauges = {
            "radixlm_pages_free": ("KV pages in the free pool", s["pages_free"]),
            "radixlm_pages_total": ("KV pages in the pool", s["pages_total"]),
            "radixlm_pages_used": ("KV pages referenced by the tree or requests", s["pages_total"] - s["pages_free"]),
            "radixlm_pages_tree": ("KV pages held by the radix cache", s["pages_tree"]),
            "radixlm_pages_held_by_requests": ("KV page references held by running requests", s["pages_held_by_requests"]),
            "radixlm_num_requests_waiting": ("requests in the waiting queue", s["num_waiting"]),
            "radixlm_num_requests_running": ("requests in the running batch", s["num_running"]),
            "radixlm_waiting_tokens": ("prompt tokens the waiting requests still have to prefill", s["waiting_tokens"]),
            "radixlm_host_pages_total": ("host-tier page slots", s["host_pages_total"]),
            "radixlm_host_pages_used": ("host-tier slots holding an evicted page", s["host_pages_used"]),
            "radixlm_disk_pages": ("pages with a file in the disk tier (this replica's layout)", s["disk_pages"]),
            "radixlm_disk_state_snapshots": ("snapshots of recurrent states with a file in the disk tier",
                                             s.get("disk_state_snapshots", 0)),
            "radixlm_window_pages_total": ("window slots of a hybrid cache's sliding-window layers", s["window_pages_total"]),
            "radixlm_window_pages_used": ("window slots held by requests or the radix cache",
                                          s["window_pages_total"] - s["window_pages_free"]),
            "radixlm_state_snapshots_total": ("snapshot slots for linear attention layers' recurrent states",
                                              s.get("state_snapshots_total", 0)),
            "radixlm_state_snapshots_used": ("recurrent-state snapshots the prefix cache holds (one per page boundary "
                                             "it can resume at)", s.get("state_snapshots_used", 0)),
            "radixlm_host_state_snapshots_total": ("host-tier slots for snapshots of recurrent states",
                                                   s.get("host_state_snapshots_total", 0)),
            "radixlm_host_state_snapshots_used": ("host-tier slots holding a snapshot of recurrent states",
                                                  s.get("host_state_snapshots_used", 0)),
            "radixlm_spec_suffix_cache_tokens": ("output tokens suffix decoding drafts from (running and kept finished "
                                                 "requests')", s.get("suffix_cache_tokens", 0)),
            "radixlm_cache_hit_rate": (
                "cached prompt tokens / prompt tokens, since start",
                s["cached_prompt_tokens"] / s["prompt_tokens"] if s["prompt_tokens"] else 0.0,
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "radixlm_preemptions": ("requests preempted (recompute)", s["num_preemptions"]),
            "radixlm_evicted_pages": ("pages evicted from the radix cache", s["num_evicted_pages"]),
            "radixlm_requests_aborted": ("requests ended early (client gone, shutdown)", s["num_aborted"]),
            "radixlm_engine_steps": ("engine steps run", s["num_steps"]),
            "radixlm_scheduled_prompt_tokens": ("prompt tokens admitted by the scheduler", s["prompt_tokens"]),
            "radixlm_scheduled_cached_prompt_tokens": ("admitted prompt tokens served from the cache", s["cached_prompt_tokens"]),
            "radixlm_host_hit_tokens": ("prompt tokens copied back from the host tier", s["host_hit_tokens"]),
            "radixlm_host_saved_pages": ("evicted pages copied to the host tier", s["host_saved_pages"]),
            "radixlm_host_state_hits": ("prompts resumed from a snapshot of recurrent states in the host tier",
                                        s.get("host_state_hits", 0)),
            "radixlm_host_saved_states": ("snapshots of recurrent states copied to the host tier",
                                          s.get("host_saved_states", 0)),
            "radixlm_disk_hit_tokens": ("prompt tokens read from the disk tier", s["disk_hit_tokens"]),
            "radixlm_disk_saved_pages": ("pages the radix cache stored that were sent to the disk tier", s["disk_saved_pages"]),
            "radixlm_disk_state_hits": ("prompts resumed from a snapshot of recurrent states read from the disk tier",
                                        s.get("disk_state_hits", 0)),
            "radixlm_disk_saved_states": ("snapshots of recurrent states sent to the disk tier",
                                          s.get("disk_saved_states", 0)),
            "radixlm_disk_read_timeouts": ("prompts that stopped waiting for a disk read and computed their pages",
                                           s["disk_read_timeouts"]),
            "radixlm_kv_transfer_hit_tokens": ("prompt tokens received from a prefill replica instead of computed",
                                               s.get("transfer_hit_tokens", 0)),
            "radixlm_kv_transfer_offered_pages": ("prompt pages offered to decode replicas (prefill replica)",
                                                  s.get("transfer_offered_pages", 0)),
            "radixlm_kv_transfer_received_pages": ("prompt pages received from prefill replicas (decode replica)",
                                                   s.get("transfer_received_pages", 0)),
            "radixlm_kv_transfer_dropped_pages": ("pages received that no admission took before newer ones pushed "
                                                  "them out", s.get("transfer_dropped_pages", 0)),
            "radixlm_kv_transfer_pulls_failed": ("offers a decode replica could not pull (it computed the prompt)",
                                                 s.get("transfer_pulls_failed", 0)),
            "radixlm_window_evicted_pages": ("window slots the radix cache gave up (hybrid cache)", s["window_evicted_pages"]),
            "radixlm_window_recomputed_tokens": ("cached prompt tokens recomputed because their window was evicted",
                                                 s["window_recomputed_tokens"]),
            "radixlm_spec_decode_draft_tokens": ("draft tokens verified (speculative decoding)", s["spec_draft_tokens"]),
            "radixlm_spec_decode_accepted_tokens": ("draft tokens accepted (speculative decoding)", s["spec_accepted_tokens"]),
            "radixlm_spec_decode_branch_tokens": ("accepted draft tokens off a draft tree's first branch (a chain's "
                                                  "proposal would have lost them)", s.get("spec_branch_tokens", 0)),
            "radixlm_images_encoded": ("images run through the vision tower (an image whose positions all come from "
                                       "the prefix cache is not)", s.get("images_encoded", 0)),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("radixlm_requests", "HTTP API requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("radixlm_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("radixlm_cached_tokens", "prompt tokens of finished requests served from the cache",
                                     registry=r)
        self.generated_tokens = Counter("radixlm_generated_tokens", "tokens generated", registry=r)
        self.finished = Counter("radixlm_requests_finished", "engine requests finished, by reason", ["reason"], registry=r)
        self.ttft = Histogram("radixlm_time_to_first_token_seconds", "arrival to first token", registry=r,
                              buckets=_LATENCY_BUCKETS_S)
        self.tpot = Histogram("radixlm_time_per_output_token_seconds", "mean time between output tokens, per request",
                              registry=r, buckets=_TPOT_BUCKETS_S)
        self.e2e = Histogram("radixlm_e2e_request_latency_seconds", "arrival to last token", registry=r,
                             buckets=_LATENCY_BUCKETS_S)
        self.queue = Histogram("radixlm_request_queue_time_seconds", "arrival to first admission into the running batch",
                               registry=r, buckets=_LATENCY_BUCKETS_S)
        self.prefill = Histogram("radixlm_request_prefill_time_seconds", "first admission to first token", registry=r,
                                 buckets=_LATENCY_BUCKETS_S)
        self.decode = Histogram("radixlm_request_decode_time_seconds", "first token to last token", registry=r,
                                buckets=_LATENCY_BUCKETS_S)
        r.register(_EngineStatsCollector(stats))

    def on_finished(self, out: RequestOutput) -> None:
        """Called on the engine thread for each finished request."""
        self.finished.labels(out.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(out.prompt_tokens)
        self.cached_tokens.inc(out.cached_tokens)
        self.generated_tokens.inc(len(out.token_ids))
        if out.ttft_s is not None:
            self.ttft.observe(out.ttft_s)
        if out.queue_s is not None:
            self.queue.observe(out.queue_s)
            if out.ttft_s is not None:
                self.prefill.observe(max(out.ttft_s - out.queue_s, 0.0))
        if out.e2e_s is not None and out.ttft_s is not None:
            self.decode.observe(out.e2e_s - out.ttft_s)
        if out.e2e_s is not None:
            self.e2e.observe(out.e2e_s)
            if out.ttft_s is not None and len(out.token_ids) > 1:
                self.tpot.observe((out.e2e_s - out.ttft_s) / (len(out.token_ids) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
