"""Layer-wise continuous batching decisions, in plain Python (no torch, no Ray, no IO).

The cloud's work arrives as items: a session's hand-off (stage -1, entering the first
cloud layer) or its reply for layer l (stage l). ``next_batch`` picks what the backbone
runs next:

- **grouping by stage**: one batch holds items of one stage, so every linear layer runs
  once on the flat token batch;
- **trailing first**: the group at the earliest stage runs first, so sessions that joined
  out of phase catch up with the ones ahead and share their stages from then on;
- **fairness**: an item that has waited longer than ``max_wait_s`` wins, so no session
  starves behind a stream of others;
- **token budget**: a batch holds at most ``token_budget`` tokens (an item bigger than
  the budget runs alone), so one long prefill cannot stall every decode for long;
  ``max_batch`` caps the sessions per batch (1 = no cross-user batching at all, the way
  the paper's reference code serves: the baseline of ``bench throughput``);
- **bounded gathering**: the cloud knows which sessions owe it an item at each stage (it
  sent them the activations, ``expect``). A group still missing members may wait for
  them at most ``gather_s`` after its first item arrived, and only while no complete group
  is ready to run instead. Replies of one stage arrive microseconds to milliseconds apart;
  without this, a group split by arrival jitter stays split for the rest of the run. No
  device can hold the backbone longer than ``gather_s`` per stage.
- **merging cohorts** (``merge``): a group also waits, within the same bound, for the
  sessions still *behind* it in the step (owing an earlier layer; for a hand-off group,
  any layer): they run first (trailing first), catch up, and from then on share every
  stage. Without it, sessions that entered out of phase (prefills arriving a few ms
  apart) stay in separate cohorts, and on a CPU two stages of 8 tokens cost ~1.6x one
  of 16 (bench throughput, 16 users on one edge host, without it: cohorts of 15+1 or
  14+2 that stayed split for the whole run, 0.34 and 0.53 of the limit, against 0.67 in a
  run that stayed whole). ``CloudEndpoint`` turns it on by default; ``Scheduler``'s own
  default is off. (Excusing a device that
  missed a window was tried: a session one step behind then never rejoins its cohort, and
  the batches fragment for good.)
- **silent devices are excused**: a group that runs without a member it was waiting for
  (its window ran out) excuses that member until it answers. A device that stopped
  answering (a hung app, a stopped process, lost signal) so costs its cohort one gathering
  bound, not one per layer per token until the idle timeout; when its item arrives it is
  owed again at its next stage and rejoins by trailing first.
- **training** items (``TRAIN``) are admitted like serving ones, run one per batch, and
  only when no serving group is ready (or when one has waited past ``max_wait_s``): they
  never starve serving, and serving never starves them for longer than that.

Admission: at most ``max_running`` sessions hold KV caches; a new session's first
hand-off waits in a bounded queue (``max_waiting``) until one closes, and beyond that
the answer is a clear ``Busy``. Sessions silent for ``idle_timeout_s`` (a device that went
away without closing) are reported by ``idle`` so their caches can be reclaimed.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field


TRAIN = 1 << 30     # the stage of a training item: after every serving stage


class Busy(Exception):
    """The backbone is full: the session cannot be admitted now."""


class UnknownSession(Exception):
    pass


@dataclass
class Item:
    session: int
    stage: int          # -1: hand-off entering the cloud; l: reply for layer l
    tokens: int
    arrived: float
    payload: object = None
    seq: int = 0


@dataclass
class _Session:
    last_seen: float
    running: bool = False            # holds a KV cache on the backbone
    queued: Item | None = None       # first hand-off waiting for admission


@dataclass
class SchedulerStats:
    batches: int = 0
    items: int = 0
    tokens: int = 0
    fairness_picks: int = 0          # batches chosen because an item waited too long
    busy: int = 0                    # sessions refused: running and waiting both full
    reclaimed: int = 0               # sessions dropped for silence
    gather_waits: int = 0            # times a group held back for owed members
    sizes: dict = field(default_factory=dict)   # batch size -> count

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0


@dataclass
class Scheduler:
    max_running: int = 256
    max_waiting: int = 256
    token_budget: int = 4096
    max_wait_s: float = 0.05
    idle_timeout_s: float = 120.0
    gather_s: float = 0.0
    merge: bool = False              # also wait for sessions behind in the step
    max_batch: int = 0               # sessions per batch; 0: no cap
    stats: SchedulerStats = field(default_factory=SchedulerStats)

    def __post_init__(self):
        if self.max_running < 1 or self.max_waiting < 0 or self.token_budget < 1 or self.max_batch < 0:
            raise ValueError("max_running and token_budget must be >= 1, max_waiting and max_batch >= 0")
        self._sessions: dict[int, _Session] = {}
        self._ready: list[Item] = []
        self._admission: deque[int] = deque()
        self._seq = itertools.count()
        self._owed: dict[int, int] = {}      # session -> stage it owes the cloud an item for
        self._excused: set[int] = set()      # owed, but missed a window: nobody waits for it
        self.last_queue_s = 0.0              # mean wait of the last batch's items
        self.last_tokens = 0
        self.last_stage = 0                  # the stage of the last batch
        self.wake_at: float | None = None    # when next_batch returned [] while gathering

    # ---- sessions -----------------------------------------------------------------------
    def open(self, session: int, now: float) -> None:
        if session in self._sessions:
            raise ValueError(f"session {session} is already open")
        self._sessions[session] = _Session(last_seen=now)

    def close(self, session: int) -> list[int]:
        """Forget ``session``; returns the sessions admitted into the freed slot."""
        s = self._sessions.pop(session, None)
        if s is None:
            return []
        self._ready = [i for i in self._ready if i.session != session]
        self._owed.pop(session, None)
        self._excused.discard(session)
        if session in self._admission:
            self._admission.remove(session)
        return self._admit_waiting() if s.running else []

    def is_open(self, session: int) -> bool:
        return session in self._sessions

    @property
    def running(self) -> int:
        return sum(1 for s in list(self._sessions.values()) if s.running)   # snapshot: metrics read it from another thread

    @property
    def waiting(self) -> int:
        return len(self._admission)

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    def idle(self, now: float) -> list[int]:
        """Sessions silent for longer than the idle timeout (reclaim them with ``close``)."""
        out = [sid for sid, s in self._sessions.items() if now - s.last_seen > self.idle_timeout_s]
        self.stats.reclaimed += len(out)
        return out

    def owes(self, session: int) -> bool:
        """Whether the cloud is waiting on ``session`` mid-step (it was sent activations)."""
        return session in self._owed

    @property
    def excused(self) -> int:
        return len(self._excused)

    # ---- work ---------------------------------------------------------------------------
    def submit(self, session: int, stage: int, tokens: int, payload, now: float) -> None:
        """A ready item. Raises ``Busy`` when a new session finds running and waiting full."""
        s = self._sessions.get(session)
        if s is None:
            raise UnknownSession(f"session {session} is not open")
        s.last_seen = now
        self._owed.pop(session, None)
        self._excused.discard(session)
        item = Item(session, stage, tokens, now, payload, next(self._seq))
        if s.running:
            self._ready.append(item)
        elif self.running < self.max_running and not self._admission:
            s.running = True
            self._ready.append(item)
        elif len(self._admission) < self.max_waiting and s.queued is None:
            s.queued = item
            self._admission.append(session)
        else:
            self.stats.busy += 1
            raise Busy(f"{self.running} sessions running and {len(self._admission)} waiting: try again later")

    def expect(self, session: int, stage: int) -> None:
        """The cloud sent ``session`` what it needs to produce its item for ``stage``."""
        if session in self._sessions:
            self._owed[session] = stage

    def touch(self, session: int, now: float) -> None:
        s = self._sessions.get(session)
        if s is not None:
            s.last_seen = now

    def pending(self) -> int:
        return len(self._ready)

    def next_batch(self, now: float) -> list:
        """The payloads to run now (one stage), or [] if nothing is ready."""
        self.wake_at = None
        if not self._ready:
            return []
        oldest = min(self._ready, key=lambda i: i.seq)
        if now - oldest.arrived > self.max_wait_s:
            stage = oldest.stage
            self.stats.fairness_picks += 1
        else:
            stage = self._gathered_stage(now)
            if stage is None:
                return []
        group = sorted((i for i in self._ready if i.stage == stage), key=lambda i: i.seq)
        batch, tokens = [], 0
        for item in group:
            if batch and (tokens + item.tokens > self.token_budget or len(batch) == self.max_batch
                          or stage == TRAIN):
                break
            batch.append(item)
            tokens += item.tokens
        taken = {id(i) for i in batch}
        self._ready = [i for i in self._ready if id(i) not in taken]
        self.last_queue_s = sum(now - i.arrived for i in batch) / len(batch)
        self.last_tokens = tokens
        self.last_stage = stage
        self.stats.batches += 1
        self.stats.sizes[len(batch)] = self.stats.sizes.get(len(batch), 0) + 1
        self.stats.items += len(batch)
        self.stats.tokens += tokens
        if self.gather_s > 0 and stage != TRAIN:
            self._excuse(stage, {i.session for i in batch})
        return [i.payload for i in batch]

    def _excuse(self, stage: int, ran: set[int]) -> None:
        """The group at ``stage`` ran: whoever it would have waited for and did not get is
        excused until its item arrives (it no longer holds any group back)."""
        for sid, o in self._owed.items():
            if sid not in ran and (o == stage or (self.merge and o >= 0 and (stage < 0 or o < stage))):
                self._excused.add(sid)

    def _gathered_stage(self, now: float) -> int | None:
        """Trailing-first among the groups that are complete or have gathered long enough."""
        stages = sorted({i.stage for i in self._ready})
        if self.gather_s <= 0:
            return stages[0]
        owed = {o for sid, o in self._owed.items() if sid not in self._excused}
        first = {}
        for i in self._ready:
            first[i.stage] = min(first.get(i.stage, i.arrived), i.arrived)
        for st in stages:
            if now - first[st] >= self.gather_s:
                return st
            if st in owed or (self.merge and any(o >= 0 and (st < 0 or o < st) for o in owed)):
                continue                 # members owed here, or (merge) trailers still behind
            return st
        self.wake_at = min(first.values()) + self.gather_s
        self.stats.gather_waits += 1
        return None

    def _admit_waiting(self) -> list[int]:
        admitted = []
        while self._admission and self.running < self.max_running:
            sid = self._admission.popleft()
            s = self._sessions[sid]
            s.running = True
            item, s.queued = s.queued, None
            self._ready.append(item)
            admitted.append(sid)
        return admitted
