"""RouterConfig: one frozen dataclass; configs/router.yaml plus `--set key=value` only fill it.

`replicas` and `prefill_replicas` are the list-valued options. engine.config's coercion knows scalars only, so here a
YAML list (or a comma-separated string) is joined into one string before `from_dict`, and
`RouterConfig.replica_urls` splits them again.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from engine.config import DEFAULT_MODEL, ConfigKeyError, from_dict, parse_overrides, read_yaml

POLICIES = ("round_robin", "least_load", "prefix_aware")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    replicas: str = "http://127.0.0.1:8001"  # base URLs, comma-separated (YAML: a list is fine)
    # Prefill/decode disaggregation: replicas that only prefill. A generation request goes to one of these first (its
    # prompt's KV written to the disk tier they share with `replicas`), then to one of `replicas`, which reads it from
    # there and decodes (engine/disaggregation.py; docs/routing.md). "": every replica does both.
    prefill_replicas: str = ""
    # ... only for prompts with at least this many tokens no replica holds (per the index): a request whose prompt is
    # mostly a cached prefix goes straight to a decode replica, which computes its short tail. 0: every request.
    prefill_min_tokens: int = 0
    # Peer fetch: a generation request sent to a replica holding at least this many fewer of its prompt's tokens than
    # another replica up (per the index; the policy chose it for load) carries that replica's offer of the pages it
    # holds, which the chosen replica pulls instead of computing them (replicas with parallel.kv_transfer: jax;
    # docs/routing.md). 0: off.
    peer_fetch_min_tokens: int = 0
    policy: Literal["round_robin", "least_load", "prefix_aware"] = "prefix_aware"
    page_size: int = 16  # the replicas' cache.page_size until they tell it (GET /v1/prompt_format): pages cut alike
    tokenizer: str = DEFAULT_MODEL  # the replicas' model (.gguf, HF dir, pkg:...), or "bytes" (fake replicas)
    replica_api_key: str | None = None  # Bearer key for the router's own calls (cache feeds); else $RADIXLM_API_KEY
    host: str = "127.0.0.1"
    port: int = 8080
    health_interval_s: float = 1.0  # GET /health and /load on every replica
    poll_interval_s: float = 0.2  # GET /v1/cache_events on every replica that is up
    connect_timeout_s: float = 2.0
    request_timeout_s: float = 600.0  # whole upstream request (read timeout for streams)
    max_attempts: int = 3  # replicas tried per request before answering 502/503
    pending_ttl_s: float = 30.0  # optimistic index entries live this long unless events confirm them
    # A chat's pages from its first image on, hashed by the images' sources (no replica's events confirm them), keep
    # sending questions about the same picture to the replica that holds it for this long
    affinity_ttl_s: float = 600.0
    prefill_weight: float = 2.0  # prefix_aware cost: weight of the prefill tokens a replica would compute
    request_cost_tokens: int = 32  # one in-flight request weighs this many prefill tokens in the cost
    hot_spot_ratio: float = 1.25  # prefix choice refused when its load > ratio * mean load + slack
    hot_spot_slack: int = 4  # in-flight requests

    def __post_init__(self):
        if not _urls(self.replicas):
            raise ConfigKeyError("replicas: at least one replica base URL is needed")
        for key in ("replicas", "prefill_replicas"):
            for url in _urls(getattr(self, key)):
                if not url.startswith(("http://", "https://")):
                    raise ConfigKeyError(f"{key}: {url!r} is not an http(s):// base URL")
        if len(set(self.replica_urls)) != len(self.replica_urls):
            raise ConfigKeyError("replicas, prefill_replicas: a URL is listed twice")
        if self.page_size <= 0:
            raise ConfigKeyError(f"page_size must be > 0, got {self.page_size}")
        if not 0 < self.port < 65536:
            raise ConfigKeyError(f"port must be in 1..65535, got {self.port}")
        for key in ("health_interval_s", "poll_interval_s", "connect_timeout_s", "request_timeout_s",
                    "pending_ttl_s", "affinity_ttl_s", "hot_spot_ratio", "prefill_weight"):
            if getattr(self, key) <= 0:
                raise ConfigKeyError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.max_attempts < 1:
            raise ConfigKeyError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if min(self.request_cost_tokens, self.hot_spot_slack, self.prefill_min_tokens, self.peer_fetch_min_tokens) < 0:
            raise ConfigKeyError("request_cost_tokens, hot_spot_slack, prefill_min_tokens and peer_fetch_min_tokens "
                                 "must be >= 0")

    @property
    def replica_urls(self) -> tuple[str, ...]:
        """Every replica the router watches: `replicas`, then `prefill_replicas` (the router's slots, in order)."""
        return _urls(self.replicas) + _urls(self.prefill_replicas)

    @property
    def prefill_slots(self) -> frozenset[int]:
        """The slots of the prefill-only replicas."""
        n = len(_urls(self.replicas))
        return frozenset(range(n, n + len(_urls(self.prefill_replicas))))


def _urls(joined: str) -> tuple[str, ...]:
    return tuple(u.strip().rstrip("/") for u in joined.split(",") if u.strip())


def _join_replicas(data: dict) -> dict:
    for key in ("replicas", "prefill_replicas"):
        value = data.get(key)
        if isinstance(value, (list, tuple)):
            if not all(isinstance(u, str) for u in value):
                raise ConfigKeyError(f"{key}: expected a list of URLs, got {value!r}")
            data = {**data, key: ",".join(value)}
    return data


def router_config_from_dict(data: dict[str, Any] | None) -> RouterConfig:
    return from_dict(RouterConfig, _join_replicas(dict(data or {})))


def load_router_config(path: str | None = None, overrides: list[str] | None = None) -> RouterConfig:
    """YAML at `path` (flat keys, or under a `router:` section) plus `--set key=value` overrides."""
    data = read_yaml(path)
    if set(data) == {"router"} and isinstance(data["router"], dict):
        data = data["router"]
    for key, value in parse_overrides(overrides).items():
        data[key.removeprefix("router.")] = value
    return router_config_from_dict(data)
