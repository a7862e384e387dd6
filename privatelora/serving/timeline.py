"""The stage loop's timeline: where a replica's time goes between two stages.

``CloudEndpoint.timeline`` (None unless a benchmark turns it on) records each call the
stage loop makes on its worker thread (``run``: a stage, ``prepare``: the frozen ``W h``
precomputed while replies travel) as four clock readings: submitted by the event loop,
started and ended on the worker, and resumed on the event loop; and the arrival of every
reply. ``summary`` turns a record into medians per decode cycle (one stage, its prepare,
then the next stage):

- ``stage_ms`` / ``prepare_ms``: the backbone's compute;
- ``to_worker_ms``: from the loop's submit to the worker's start (the thread hand-off;
  both threads share one GIL), for the prepare, which is on the round trip's path;
- ``round_trip_ms``: from the stage's end to the last reply the next stage waited for;
- ``after_reply_ms``: from that last reply to the next stage's submit;
- ``cycle_ms``: submit to submit; ``exposed_ms``: the cycle less the compute in it.

Cycles whose next stage starts with no reply in between (a hand-in, a prefill) are counted
but not split. Once per token, the devices' turn: when a stage's hand-offs were queued and
when the devices' next hand-offs came in:

- ``hand_off_ms``: from a stage's hand-offs to the last hand-in the next stage took (the
  devices' LM heads, sampling and embeddings, and the wire both ways);
- ``after_hand_in_ms``: from that hand-in to the stage's submit;
- ``token_ms``: from one stage's hand-offs to the next's (a token's whole step);
- ``loop_cpu_ms``: the event loop thread's CPU time per stage (sockets, frame codec,
  scheduling), once ``stop`` was called.

Bounded: at most ``max_events`` calls, replies and hand-offs are kept.
"""

from __future__ import annotations

import bisect
import statistics
import time
from collections import deque


class Timeline:
    """Create it, and ``stop`` it, on the event loop's thread: ``loop_cpu_ms`` is that
    thread's CPU time between the two, per stage (sockets, frame codec, scheduling)."""

    def __init__(self, max_events: int = 200_000):
        self._cpu = [time.thread_time(), None]
        self.calls: deque = deque(maxlen=max_events)     # (kind, submitted, started, ended, resumed)
        self.replies: deque = deque(maxlen=max_events)   # arrival times
        self.hand_outs: deque = deque(maxlen=max_events)  # when a stage's hand-offs were queued
        self.hand_ins: deque = deque(maxlen=max_events)   # arrival times of the devices' hand-offs

    def call(self, kind: str, submitted: float, started: float, ended: float, resumed: float) -> None:
        self.calls.append((kind, submitted, started, ended, resumed))

    def reply(self, t: float) -> None:
        self.replies.append(t)

    def stop(self) -> None:
        """The end of the record, for ``loop_cpu_ms`` (on the thread that created it)."""
        self._cpu[1] = time.thread_time()

    def hand_out(self, t: float) -> None:
        self.hand_outs.append(t)

    def hand_in(self, t: float) -> None:
        self.hand_ins.append(t)

    def summary(self) -> dict:
        """Medians (ms) of the decode cycles recorded (module docstring)."""
        calls = sorted(self.calls, key=lambda c: c[1])
        replies = sorted(self.replies)
        cols: dict[str, list[float]] = {k: [] for k in ("stage_ms", "prepare_ms", "to_worker_ms", "round_trip_ms",
                                                         "after_reply_ms", "cycle_ms", "exposed_ms")}
        stages = [c for c in calls if c[0] == "run"]
        for a, p, b in zip(calls, calls[1:], calls[2:]):
            if (a[0], p[0], b[0]) != ("run", "prepare", "run"):
                continue
            lo, hi = bisect.bisect_left(replies, a[3]), bisect.bisect_left(replies, b[1])
            if hi <= lo:            # no reply between: not a decode cycle
                continue
            last = replies[hi - 1]
            cycle = b[1] - a[1]
            cols["stage_ms"].append(a[3] - a[2])
            cols["prepare_ms"].append(p[3] - p[2])
            cols["to_worker_ms"].append(p[2] - p[1])
            cols["round_trip_ms"].append(last - a[3])
            cols["after_reply_ms"].append(b[1] - last)
            cols["cycle_ms"].append(cycle)
            cols["exposed_ms"].append(cycle - (a[3] - a[2]) - (p[3] - p[2]))
        out = {"stages": len(stages), "replies": len(replies), "decode_cycles": len(cols["cycle_ms"])}
        out.update({k: 1e3 * statistics.median(v) if v else None for k, v in cols.items()})
        out.update(self._hand_offs(stages))
        cpu = None if self._cpu[1] is None or not stages else 1e3 * (self._cpu[1] - self._cpu[0]) / len(stages)
        out["loop_cpu_ms"] = cpu
        return out

    def _hand_offs(self, stages: list) -> dict:
        """The token's turn through the devices: from a stage's hand-offs to the last
        hand-in the next stage took (``hand_off_ms``), from there to that stage's submit
        (``after_hand_in_ms``), and from one hand-out to the next (``token_ms``)."""
        outs, ins = sorted(self.hand_outs), sorted(self.hand_ins)
        submits = [c[1] for c in stages]
        cols: dict[str, list[float]] = {"hand_off_ms": [], "after_hand_in_ms": [], "token_ms": []}
        for a, b in zip(outs, outs[1:]):
            cols["token_ms"].append(b - a)
        for a in outs:
            j = bisect.bisect_left(ins, a)
            if j == len(ins):
                continue
            k = bisect.bisect_left(submits, ins[j])       # the first stage submitted after a hand-in
            if k == len(submits):
                continue
            last = ins[bisect.bisect_left(ins, submits[k]) - 1]
            cols["hand_off_ms"].append(last - a)
            cols["after_hand_in_ms"].append(submits[k] - last)
        out = {"hand_outs": len(outs)}
        out.update({k: 1e3 * statistics.median(v) if v else None for k, v in cols.items()})
        return out
