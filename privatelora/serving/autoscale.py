"""When to add or remove a backbone replica: plain Python, no Ray (``actors.pool`` acts).

``Autoscaler.decide(now, status)`` reads each replica's status (open sessions, stages run
and the time their requests queued, summed) and says ``up``, ``down`` or ``hold``, with
its inputs, so that every decision can be exported and explained. A replica is added
when open sessions per replica pass ``up_sessions``, or the mean time a stage's requests
waited passes ``up_queue_s``, for ``up_after_s``; one is removed when the sessions would
still be under ``down_sessions`` per replica without it, for ``down_after_s``. After any
change the autoscaler waits ``cooldown_s`` before it starts judging load again. The pool
never leaves ``[min, max]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class AutoscalePolicy:
    min_replicas: int = 1
    max_replicas: int = 1
    up_sessions: float = 12.0
    up_queue_s: float = 0.25
    down_sessions: float = 4.0
    up_after_s: float = 2.0
    down_after_s: float = 20.0
    cooldown_s: float = 10.0

    def __post_init__(self):
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas} and {self.max_replicas}")
        if self.down_sessions >= self.up_sessions:
            raise ValueError("down_sessions must be below up_sessions, or the pool would flap")
        if min(self.up_queue_s, self.up_after_s, self.down_after_s, self.cooldown_s) < 0:
            raise ValueError("times must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


class Autoscaler:
    def __init__(self, policy: AutoscalePolicy):
        self.policy = policy
        self._prev: dict[int, tuple[int, float]] = {}      # replica -> (stages, queue_s_total)
        self._hot_since: float | None = None
        self._cold_since: float | None = None
        self._changed_at: float | None = None

    def changed(self, now: float) -> None:
        """The pool changed size (by this autoscaler or not): start the cooldown."""
        self._changed_at = now
        self._hot_since = self._cold_since = None

    def _queue_s(self, status: dict[int, dict]) -> float:
        """Mean queue time per stage since the last call, over all replicas."""
        stages = queued = 0.0
        for rid, st in status.items():
            s0, q0 = self._prev.get(rid, (st["stages"], st["queue_s_total"]))
            if st["stages"] >= s0:            # a restarted replica starts from 0: skip its window
                stages += st["stages"] - s0
                queued += st["queue_s_total"] - q0
        self._prev = {rid: (st["stages"], st["queue_s_total"]) for rid, st in status.items()}
        return queued / stages if stages else 0.0

    def decide(self, now: float, status: dict[int, dict]) -> dict:
        """``status``: replica id -> ``BackboneReplica.status()`` of every serving replica."""
        p = self.policy
        n = len(status)
        sessions = sum(st["sessions"] for st in status.values())
        per = sessions / n if n else float("inf")
        queue_s = self._queue_s(status)
        out = {"at": now, "action": "hold", "replica": None, "reason": "", "replicas_before": n,
               "replicas_after": n, "sessions": sessions, "sessions_per_replica": per if n else 0.0,
               "queue_s": queue_s}

        def act(action, reason, replica=None):
            out.update(action=action, reason=reason, replica=replica,
                       replicas_after=n + (1 if action == "up" else -1))
            return out
        if n < p.min_replicas:
            return act("up", f"{n} replicas, below the minimum {p.min_replicas}")
        if n > p.max_replicas:
            return act("down", f"{n} replicas, above the maximum {p.max_replicas}", self._emptiest(status))
        hot = per > p.up_sessions or queue_s > p.up_queue_s
        cold = n > 1 and sessions / (n - 1) < p.down_sessions
        self._hot_since = (self._hot_since if self._hot_since is not None else now) if hot else None
        self._cold_since = (self._cold_since if self._cold_since is not None else now) if cold else None
        if self._changed_at is not None and now - self._changed_at < p.cooldown_s:
            self._hot_since = self._cold_since = None     # load is judged afresh once the change settles
            out["reason"] = "cooling down after a change"
            return out
        if hot and n < p.max_replicas and now - self._hot_since >= p.up_after_s:
            why = (f"{per:.1f} sessions per replica > {p.up_sessions:g}" if per > p.up_sessions
                   else f"stages queued {queue_s * 1000:.0f} ms > {p.up_queue_s * 1000:.0f} ms")
            return act("up", why)
        if cold and n > p.min_replicas and now - self._cold_since >= p.down_after_s:
            return act("down", f"{sessions} sessions fit in {n - 1} replicas under {p.down_sessions:g} each",
                       self._emptiest(status))
        return out

    @staticmethod
    def _emptiest(status: dict[int, dict]) -> int:
        return min(status, key=lambda r: (status[r]["sessions"], -r))
