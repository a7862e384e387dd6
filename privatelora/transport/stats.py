"""Byte accounting of a connection: frames, raw tensor bytes and whole-frame bytes per
direction ("up" = device -> cloud) and frame kind, kept by both ends of the transport."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from privatelora import wire


@dataclass
class KindBytes:
    frames: int = 0
    raw: int = 0
    wire: int = 0
    compressed: int = 0  # frames sent with lz4


@dataclass
class ByteStats:
    """Bytes per direction and frame kind."""

    up: dict[str, KindBytes] = field(default_factory=dict)
    down: dict[str, KindBytes] = field(default_factory=dict)

    def add(self, direction: str, info: wire.FrameInfo) -> None:
        k = getattr(self, direction).setdefault(info.kind, KindBytes())
        k.frames += 1
        k.raw += info.raw_bytes
        k.wire += info.wire_bytes
        k.compressed += info.compressed

    def add_all(self, direction: str, infos) -> None:
        """``add`` for each of ``infos`` (a bundle's entries), summed by kind first."""
        sums: dict = {}
        for info in infos:
            k = sums.get(info.kind)
            if k is None:
                sums[info.kind] = [1, info.raw_bytes, info.wire_bytes, info.compressed]
            else:
                k[0] += 1
                k[1] += info.raw_bytes
                k[2] += info.wire_bytes
                k[3] += info.compressed
        table = getattr(self, direction)
        for kind, (frames, raw, wire_bytes, compressed) in sums.items():
            k = table.setdefault(kind, KindBytes())
            k.frames += frames
            k.raw += raw
            k.wire += wire_bytes
            k.compressed += compressed

    def total(self, direction: str) -> KindBytes:
        t = KindBytes()
        for k in list(getattr(self, direction).values()):   # a snapshot: scrapes run in other threads
            t.frames, t.raw, t.wire = t.frames + k.frames, t.raw + k.raw, t.wire + k.wire
            t.compressed += k.compressed
        return t

    def merge(self, other: "ByteStats") -> "ByteStats":
        """Add ``other``'s counts into this one (a device's bytes over several connections)."""
        for d in (wire.UP, wire.DOWN):
            for kind, kb in list(getattr(other, d).items()):
                k = getattr(self, d).setdefault(kind, KindBytes())
                k.frames, k.raw, k.wire = k.frames + kb.frames, k.raw + kb.raw, k.wire + kb.wire
                k.compressed += kb.compressed
        return self

    def as_dict(self) -> dict:
        return {d: {**{kind: asdict(k) for kind, k in sorted(getattr(self, d).items())},
                    "total": asdict(self.total(d))} for d in (wire.UP, wire.DOWN)}


