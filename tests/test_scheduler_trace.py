"""The scheduler's trace in memory: a bound on the entries kept, and reading on from a position while the loop
records from another thread (what a server's metrics and status do)."""
import threading

import pytest

from tidal.errors import ConfigError
from tidal.scheduler import Step
from tidal.scheduler.requests import Trace


def test_a_bounded_trace_keeps_the_last_entries_and_counts_what_it_dropped():
    trace = Trace(keep=3)
    for tick in range(5):
        trace.record(0.1 * tick, tick, Step("a"), None, 0.001)
    assert [e["tick"] for e in trace.entries] == [2, 3, 4] and trace.recorded == 5
    entries, position, dropped = trace.since(0)
    assert [e["tick"] for e in entries] == [2, 3, 4] and (position, dropped) == (5, 2)
    entries, position, dropped = trace.since(4)
    assert [e["tick"] for e in entries] == [4] and (position, dropped) == (5, 0)
    assert trace.since(5) == ([], 5, 0)
    unbounded = Trace()
    for tick in range(5):
        unbounded.record(0.0, tick, Step("a"), None, 0.0)
    assert [e["tick"] for e in unbounded.since(1)[0]] == [1, 2, 3, 4]


@pytest.mark.parametrize("keep", [0, -1, 2.5, True, "10"])
def test_a_bad_bound_is_refused(keep):
    with pytest.raises(ConfigError, match="trace_keep"):
        Trace(keep=keep)


def test_a_reader_polling_from_another_thread_reads_each_entry_once_or_counts_it_dropped():
    trace, n = Trace(keep=64), 20_000
    seen, dropped = [], 0

    def write():
        for tick in range(n):
            trace.record(0.0, tick, Step("a"), None, 0.0)

    writer = threading.Thread(target=write)
    writer.start()
    position = 0
    while writer.is_alive() or position < trace.recorded:
        entries, position, lost = trace.since(position)
        seen += [e["tick"] for e in entries]
        dropped += lost
    writer.join()
    assert len(seen) + dropped == n and seen == sorted(set(seen)) and seen[-1] == n - 1
