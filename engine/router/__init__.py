"""Prefix-aware routing across replicas: an exact per-replica index of cached block hashes
(`index`), the routing policies (`policy`), the HTTP proxy (`app`) and a discrete-event
simulator that replays traces through the same policy objects (`simulator`)."""
