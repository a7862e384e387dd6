"""In-process runner: drives device sessions and the cloud part with no IO.

Each tick it hands ready messages to ``CloudPart.run`` in one call (the cloud batches
them by layer) and routes the answers back to their sessions. Sessions can join at any
tick. Policy ``all`` runs every ready message each tick; ``trailing`` (default) runs only
the group at the earliest stage, so sessions that joined out of phase catch up with the
ones ahead and share their stages from then on (a CPU runs groups one after another
anyway, so waiting a tick costs no throughput). This is the protocol in its purest form: the TCP and Ray paths must
produce exactly what it produces.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from privatelora.runtime.generation import Generation


@dataclass
class RunStats:
    ticks: int = 0
    stages: int = 0
    stage_sessions: int = 0
    tokens_generated: int = 0
    seconds: float = 0.0

    @property
    def mean_batch_size(self) -> float:
        return self.stage_sessions / self.stages if self.stages else 0.0

    def to_dict(self) -> dict:
        return {"ticks": self.ticks, "stages": self.stages, "mean_batch_size": self.mean_batch_size,
                "tokens_generated": self.tokens_generated, "seconds": self.seconds,
                "tokens_per_s": self.tokens_generated / self.seconds if self.seconds else 0.0}


def pick_stage(ready: list, policy: str = "trailing", key=lambda m: m) -> tuple[list, list]:
    """Split ``ready`` into (run now, keep waiting) under ``policy``.

    ``key(item)`` gives the protocol message of an item; a hand-off counts as stage -1.
    """
    if policy == "all" or not ready:
        return ready, []
    stage = [getattr(key(m), "layer", -1) for m in ready]
    first = min(stage)
    return [m for m, s in zip(ready, stage) if s == first], [m for m, s in zip(ready, stage) if s != first]


class InProcessRunner:
    def __init__(self, cloud, policy: str = "trailing"):
        if policy not in ("all", "trailing"):
            raise ValueError(f"unknown policy {policy!r}")
        self.cloud = cloud
        self.policy = policy

    def _pick(self, ready: list) -> tuple[list, list]:
        return pick_stage(ready, self.policy)

    def run(self, gens: list[Generation], start_ticks: list[int] | None = None) -> RunStats:
        start_ticks = start_ticks or [0] * len(gens)
        by_session = {g.session: g for g in gens}
        if len(by_session) != len(gens):
            raise ValueError("two generations share a session id")
        joining = sorted(zip(start_ticks, range(len(gens))))
        ready: list = []
        stats = RunStats()
        s0 = (self.cloud.stats.stages, self.cloud.stats.sessions)
        t0 = time.perf_counter()
        tick = 0
        active = 0
        while joining or ready:
            while joining and joining[0][0] <= tick:
                g = gens[joining.pop(0)[1]]
                self.cloud.open(g.session)
                msg = g.start()
                if msg is None:
                    self.cloud.close(g.session)
                else:
                    ready.append(msg)
                    active += 1
            if ready:
                batch, ready = self._pick(ready)
                answers = self.cloud.run(batch)
                for ans in answers:
                    g = by_session[ans.session]
                    nxt = g.on(ans)
                    if nxt is None:
                        self.cloud.close(g.session)
                        active -= 1
                    else:
                        ready.append(nxt)
            tick += 1
        stats.ticks = tick
        stats.stages = self.cloud.stats.stages - s0[0]
        stats.stage_sessions = self.cloud.stats.sessions - s0[1]
        stats.tokens_generated = sum(len(g.tokens) for g in gens)
        stats.seconds = time.perf_counter() - t0
        return stats
