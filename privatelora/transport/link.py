"""Link emulation: shape a connection like a real network, in real elapsed time.

Contract
- ``LinkProfile(up_bps, down_bps, latency_s, jitter_s)``: bandwidth per direction in bit/s
  ("up" = device -> cloud), ``latency_s`` the base round trip, ``jitter_s`` the most extra
  one-way delay a frame may get (uniform in [0, jitter_s], so the mean round trip is
  ``latency_s + jitter_s``).
- Model, the same for the live shaper and the prediction: each direction is one
  serialized pipe. A frame of B bytes starts when it is sent or when the previous frame
  has left, whichever is later, occupies the pipe for ``B * 8 / bps`` seconds, then arrives
  ``latency_s / 2 + jitter`` later; a frame never overtakes the one before it. B is the
  whole frame as ``wire`` encodes it (TLS record overhead is not modelled).
- ``Shaper`` applies it to one connection: the transport's client hands it every frame it
  would write (``up``) and every frame it read (``down``); the frames come out, through
  the callbacks, at their emulated arrival time. Shaping both directions at the client
  is enough: the cloud sees the same timing. The ``loopback`` profile is not shaped at all
  (the transport bypasses the shaper), so it costs nothing.
- ``predict_time(profile, frames)`` predicts, with the same model and mean jitter, when a
  sequence of frames finishes: the number measured runs are compared against. Measured
  times run a little longer: codec and loopback work (~0.5 ms a round trip here) and the
  event loop's millisecond timer granularity (~0.5 ms late per hop on Linux).
- The presets are typical assumptions, not measurements: ``5g`` is the PrivateLoRA paper's
  setting (60 Mbit/s up, 100 Mbit/s down) with a 20 ms round trip; ``4g`` uses LTE-like
  figures (tens of Mbit/s down, about 10 up, ~50 ms round trip) of the order public
  mobile-network reports give; ``wifi`` a home/office Wi-Fi hop to an edge host; ``lan``
  gigabit Ethernet.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

log = logging.getLogger(__name__)

UP, DOWN = "up", "down"


@dataclass(frozen=True)
class LinkProfile:
    up_bps: float  # device -> cloud, bit/s (math.inf: unlimited)
    down_bps: float  # cloud -> device, bit/s
    latency_s: float  # base round trip
    jitter_s: float = 0.0  # max extra one-way delay per frame
    name: str = "custom"

    def __post_init__(self):
        if not (self.up_bps > 0 and self.down_bps > 0):
            raise ValueError("bandwidths must be > 0 bit/s")
        if not (self.latency_s >= 0 and self.jitter_s >= 0):
            raise ValueError("latency and jitter must be >= 0 s")

    @property
    def shaped(self) -> bool:
        """False when the profile adds nothing (no shaper is installed)."""
        return not (math.isinf(self.up_bps) and math.isinf(self.down_bps)
                    and self.latency_s == 0 and self.jitter_s == 0)

    def bps(self, direction: str) -> float:
        return {UP: self.up_bps, DOWN: self.down_bps}[direction]

    def transfer_s(self, direction: str, nbytes: int) -> float:
        """Seconds a frame of ``nbytes`` occupies the ``direction`` pipe."""
        return nbytes * 8 / self.bps(direction)


_M = 1e6
PRESETS: dict[str, LinkProfile] = {p.name: p for p in (
    LinkProfile(math.inf, math.inf, 0.0, 0.0, "loopback"),
    LinkProfile(1000 * _M, 1000 * _M, 0.0005, 0.0001, "lan"),
    LinkProfile(100 * _M, 200 * _M, 0.005, 0.002, "wifi"),
    LinkProfile(60 * _M, 100 * _M, 0.020, 0.001, "5g"),
    LinkProfile(10 * _M, 30 * _M, 0.050, 0.010, "4g"),
)}


def get_profile(name: str | LinkProfile) -> LinkProfile:
    if isinstance(name, LinkProfile):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown link profile {name!r}; known: {', '.join(PRESETS)}") from None


_SPIN_S = 0.0015   # the last stretch before an arrival is waited by yielding, not by a timer


class PipeModel:
    """One direction of the link as a pure function of time (no I/O)."""

    def __init__(self, bps: float, one_way_s: float):
        self.bps, self.one_way_s = bps, one_way_s
        self.free_at = -math.inf  # when the pipe finishes sending what it holds
        self.last_arrival = -math.inf

    def schedule(self, now: float, nbytes: int, jitter: float = 0.0) -> float:
        """Enqueue a frame sent at ``now``; return its arrival time."""
        start = max(now, self.free_at)
        self.free_at = start + nbytes * 8 / self.bps
        arrival = max(self.free_at + self.one_way_s + jitter, self.last_arrival)  # FIFO
        self.last_arrival = arrival
        return arrival


class Pipe:
    """A live ``PipeModel``: frames are delivered by one task, in order, at their arrival."""

    def __init__(self, bps: float, one_way_s: float, jitter_s: float,
                 deliver: Callable[[bytes], None], rng: random.Random):
        self.model = PipeModel(bps, one_way_s)
        self._jitter_s, self._deliver, self._rng = jitter_s, deliver, rng
        self._queue: deque[tuple[float, bytes]] = deque()
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task = self._loop.create_task(self._run())

    def put(self, frame: bytes) -> None:
        jitter = self._rng.uniform(0.0, self._jitter_s) if self._jitter_s else 0.0
        arrival = self.model.schedule(self._loop.time(), len(frame), jitter)
        self._queue.append((arrival, frame))
        self._idle.clear()
        self._wake.set()

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            arrival, frame = self._queue[0]
            delay = arrival - self._loop.time()
            if delay > _SPIN_S:
                # the event loop's timers wake up to ~1 ms late (epoll waits in whole ms):
                # sleep until just before the arrival, then yield until it is due
                await asyncio.sleep(delay - _SPIN_S)
                continue
            if delay > 0:
                await asyncio.sleep(0)   # other tasks run meanwhile; at most _SPIN_S of this
                continue
            self._queue.popleft()
            try:
                self._deliver(frame)
            except Exception:  # a failing consumer must not stop the link
                log.exception("link delivery failed")

    async def flush(self) -> None:
        """Wait until every frame put so far has been delivered."""
        if not self._task.done():
            await self._idle.wait()

    def close(self) -> None:
        self._task.cancel()
        self._queue.clear()
        self._idle.set()


class Shaper:
    """Both directions of one connection, applied at the client.

    ``send(frame)`` writes a frame to the socket (called when it reaches the cloud end of
    the emulated link); ``deliver(frame)`` hands a received frame to the client (called
    when it reaches the device end).
    """

    def __init__(self, profile: LinkProfile, *, send: Callable[[bytes], None],
                 deliver: Callable[[bytes], None], seed: int | None = None):
        self.profile = profile
        rng = random.Random(seed)
        half = profile.latency_s / 2
        self._up = Pipe(profile.up_bps, half, profile.jitter_s, send, rng)
        self._down = Pipe(profile.down_bps, half, profile.jitter_s, deliver, rng)

    def up(self, frame: bytes) -> None:
        self._up.put(frame)

    def down(self, frame: bytes) -> None:
        self._down.put(frame)

    async def flush_up(self) -> None:
        await self._up.flush()

    async def flush_down(self) -> None:
        await self._down.flush()

    def close(self) -> None:
        self._up.close()
        self._down.close()


def predict_time(profile: LinkProfile | str, frames: Iterable[tuple[str, int]], *,
                 chained: bool = True, compute_s: float = 0.0) -> float:
    """Seconds from sending the first frame until the last one arrives.

    frames: (direction, wire bytes) in send order. chained=True: each frame is sent when
    the previous one has arrived plus ``compute_s`` (a decode step: hand-off up, then per
    layer activations down and reply up, then hand-off down). chained=False: all are sent
    at time 0 and only the pipes serialize them. Jitter counts at its mean.
    """
    p = get_profile(profile)
    half, mean_jitter = p.latency_s / 2, p.jitter_s / 2
    pipes = {UP: PipeModel(p.up_bps, half), DOWN: PipeModel(p.down_bps, half)}
    t = end = 0.0
    for direction, nbytes in frames:
        arrival = pipes[direction].schedule(t, nbytes, mean_jitter)
        end = max(end, arrival)
        if chained:
            t = arrival + compute_s
    return end
