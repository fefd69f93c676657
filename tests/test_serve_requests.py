"""What the server needs of `ScheduledRequest`: `listen(fn)` (every new token batch and the finish, in order,
nothing missed whenever it is called, from the loop's thread) and `started_at` (when the loop handed the
request to its engine)."""
import threading
import time

import pytest
import torch

import tidal
from tidal.errors import StateError
from scheduler_util import build_models, tiny

TINY = tiny("serve-req-tiny", layers=2)
KW = dict(dtype=torch.float32, kv_cache_bytes=1 << 15, block_size=4, kernels="reference")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_models(TINY, ["m"], tmp_path_factory.mktemp("serve-req"))["m"]


@pytest.fixture
def sched(path):
    rt = tidal.Runtime(device="cpu")
    s = tidal.Scheduler(rt, policy="lru")
    s.add_model("m", path, **KW)
    yield s
    s.close()
    rt.close()


def test_listener_sees_every_token_then_the_finish(sched):
    events = []
    req = sched.submit("m", [1, 2, 3], max_new_tokens=6)
    req.listen(lambda ids, reason: events.append((ids, reason, threading.current_thread().name)))
    sched.run_until_idle()
    tokens = [t for ids, reason, _ in events for t in ids]
    assert tokens == req.output_ids and len(tokens) == 6
    assert [reason for _, reason, _ in events] == [None] * (len(events) - 1) + ["length"]
    assert events[-1][0] == []


def test_listen_late_replays_what_happened(sched):
    req = sched.submit("m", [4, 5], max_new_tokens=3)
    sched.run_until_idle()
    events = []
    req.listen(lambda ids, reason: events.append((ids, reason)))
    assert events == [(req.output_ids, None), ([], "length")]
    with pytest.raises(StateError):
        req.listen(lambda ids, reason: None)


def test_listener_from_the_loop_thread_misses_nothing_while_it_runs(sched):
    sched.start()
    for delay in (0.0, 0.001, 0.005):  # attach at different points of the request's life
        events, done = [], threading.Event()

        def fn(ids, reason):
            events.append((list(ids), reason))
            if reason is not None:
                done.set()

        req = sched.submit("m", [7, 8, 9], max_new_tokens=8)
        time.sleep(delay)
        req.listen(fn)
        assert done.wait(30)
        assert [t for ids, _ in events for t in ids] == req.output_ids
        assert [r for _, r in events].count("length") == 1 and events[-1][1] == "length"


def test_abort_of_a_queued_request_reaches_the_listener(sched):
    events = []
    req = sched.submit("m", [1], max_new_tokens=4)
    req.listen(lambda ids, reason: events.append((ids, reason)))
    assert sched.abort(req)
    assert events == [([], "aborted")] and req.started_at is None


def test_started_at_is_when_the_engine_got_it(sched):
    req = sched.submit("m", [1, 2], max_new_tokens=2)
    assert req.started_at is None and req.engine_id is None
    before = time.monotonic()
    sched.run_until_idle()
    assert req.engine_id is not None
    assert req.submitted_at <= before <= req.started_at <= req.first_token_at <= req.finished_at


def test_every_request_is_started_once_between_its_submission_and_its_first_token(sched):
    reqs = [sched.submit("m", [1, 2, 3][: k + 1], max_new_tokens=2) for k in range(3)]
    sched.run_until_idle()
    for req in reqs:
        assert req.engine_id is not None
        assert req.submitted_at <= req.started_at <= req.first_token_at <= req.finished_at
