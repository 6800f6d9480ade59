"""Server pieces that need no model: the cache-events feed, request validation messages, serve.py start-up errors."""
import os
import subprocess
import sys

import pydantic
import pytest

from engine.cache_feed import CacheEventFeed
from engine.openai_protocol import ChatCompletionRequest, CompletionRequest, describe_validation_error
from engine.radix_cache import CacheEvent

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stored(*hashes, parent=None, ns=None):
    return CacheEvent("stored", tuple(hashes), parent, ns)


def _removed(*hashes, parent=None, ns=None):
    return CacheEvent("removed", tuple(hashes), parent, ns)


def test_feed_numbers_events_and_tracks_state():
    feed = CacheEventFeed()
    feed.publish([_stored(1, 2), _stored(3, parent=2), _stored(7, ns="salt")])
    feed.publish([_removed(3, parent=2)])
    got = feed.events_after(0)
    assert got["epoch"] == feed.epoch and got["last_seq"] == 4 and got["gap"] is False
    assert [e["seq"] for e in got["events"]] == [1, 2, 3, 4]
    assert got["events"][1] == {"seq": 2, "kind": "stored", "block_hashes": [3], "parent_hash": 2, "namespace": None}
    assert [e["seq"] for e in feed.events_after(2)["events"]] == [3, 4]
    assert feed.events_after(4)["events"] == [] and feed.events_after(4)["gap"] is False
    assert feed.state() == {"epoch": feed.epoch, "last_seq": 4, "block_hashes": {"": [1, 2], "salt": [7]}}
    feed.publish([_removed(7, ns="salt")])
    assert feed.state()["block_hashes"] == {"": [1, 2]}


def test_feed_reports_gaps_and_limits_batches():
    feed = CacheEventFeed(capacity=100)
    for i in range(1000):
        feed.publish([_stored(i)])
    newest = feed.events_after(999)
    assert newest["gap"] is False and [e["seq"] for e in newest["events"]] == [1000]
    old = feed.events_after(10)
    assert old["gap"] is True and old["events"][0]["seq"] == 901  # the oldest still held
    assert feed.events_after(899)["gap"] is True
    assert feed.events_after(900)["gap"] is False
    assert feed.events_after(5000)["gap"] is True  # ahead of this process: another epoch
    assert len(feed.events_after(900, limit=10)["events"]) == 10
    assert len(feed.state()["block_hashes"][""]) == 1000


@pytest.mark.parametrize(
    "body, message, param",
    [
        ({"model": "m"}, "prompt: required field is missing", "prompt"),
        ({"model": "m", "prompt": []}, "prompt: expected a non-empty string", "prompt"),
        ({"model": "m", "prompt": "x", "max_tokens": "5"}, "max_tokens: Input should be a valid integer", "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1", "max_tokens"),
        ({"model": "m", "prompt": "x", "temperature": -0.5}, "temperature: Input should be greater than or equal to 0", "temperature"),
        ({"model": "m", "prompt": "x", "top_p": 1.5}, "top_p: Input should be less than or equal to 1", "top_p"),
        ({"model": "m", "prompt": "x", "stop": 3}, "stop: expected a string or a list of strings", "stop"),
        ({"model": 5, "prompt": "x"}, "model: Input should be a valid string", "model"),
    ],
)
def test_validation_errors_name_the_field(body, message, param):
    with pytest.raises(pydantic.ValidationError) as e:
        CompletionRequest.model_validate(body)
    got_message, got_param = describe_validation_error(e.value.errors())
    assert got_message.startswith(message) and got_param == param


def test_chat_validation_errors_name_the_message():
    with pytest.raises(pydantic.ValidationError) as e:
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": 5}]})
    assert describe_validation_error(e.value.errors()) == (
        'messages.0.content: expected a string or a list of {"type": "text", "text": ...} parts', "messages")


@pytest.mark.parametrize("override", ["server.nope=1", "server.port=70000", "scheduler.max_running=abc"])
def test_serve_refuses_bad_config_with_exit_code_2(override):
    proc = subprocess.run(
        [sys.executable, "scripts/serve.py", "--config", "configs/serve-smollm2.yaml", "--set", override],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert override.split("=")[0] in proc.stderr
