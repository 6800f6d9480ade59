"""Which replica stored which response (`POST /v1/responses` with `store`, engine/openai_responses.py).

A replica keeps its responses in its own memory, so a request continuing one (`previous_response_id`) and
`GET` / `DELETE /v1/responses/{id}` must reach that replica. The router learns the id -> replica mapping from the
responses that pass through it: a whole response's body, or a stream's opening bytes (its `response.created` event
carries the id first). The map is a bounded LRU; an id it does not hold (evicted, or the router restarted) is asked of
the replicas (`Router.response_owner`).
"""
from __future__ import annotations

import collections
import re

MAX_OWNERS = 100_000  # ids remembered (~100 bytes each); older ones are found again by asking the replicas
_ID = re.compile(rb'"id"\s*:\s*"(resp_[^"\\]+)"')


class ResponseOwners:
    """response id -> replica slot, least recently used first out past `capacity`."""

    def __init__(self, capacity: int = MAX_OWNERS):
        self.capacity = capacity
        self._slots: collections.OrderedDict[str, int] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._slots)

    def learn(self, data: bytes, slot: int) -> bool:
        """Records the first response id in `data` (a response body, or a stream's first bytes) as stored on `slot`.
        -> whether one was found."""
        m = _ID.search(data)
        if m is not None:
            self.record(m.group(1).decode(), slot)
        return m is not None

    def record(self, response_id: str, slot: int) -> None:
        self._slots[response_id] = slot
        self._slots.move_to_end(response_id)
        while len(self._slots) > self.capacity:
            self._slots.popitem(last=False)

    def get(self, response_id: str) -> int | None:
        slot = self._slots.get(response_id)
        if slot is not None:
            self._slots.move_to_end(response_id)
        return slot

    def forget(self, response_id: str) -> None:
        self._slots.pop(response_id, None)
