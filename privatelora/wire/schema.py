"""Schema checks shared by encoding (what we send) and decoding (what we accept): field
types, limits, the session's declared ``Geometry`` and the per-frame ``FrameContext``."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from privatelora.wire.errors import GeometryError, PrivacyError, SchemaError

UP, DOWN = "up", "down"  # up: device -> cloud, down: cloud -> device
MAX_TOKENS, MAX_HIDDEN, MAX_TARGETS, MAX_LAYERS = 1 << 16, 1 << 16, 16, 1024
MAX_POSITION, MAX_REASON, MAX_OPEN_BODY = 2**31 - 1, 1024, 16384
# wire dtype -> bytes per element (int8 adds one fp32 scale per row)
DTYPES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,15}")
CODE_RE = re.compile(r"[a-z0-9_]{1,64}")
PROJECTIONS_RE = re.compile(r"(?:[0-9a-f]{16})?")


def check_int(v, what, lo, hi, err=SchemaError, code="bad_field") -> int:
    if type(v) is not int or not lo <= v <= hi:  # `type is`: refuses bool, a subclass of int
        raise err(code, f"{what} must be an int in [{lo}, {hi}]")
    return v


def check_bool(v, what, err=SchemaError, code="bad_field") -> bool:
    if type(v) is not bool:
        raise err(code, f"{what} must be a bool")
    return v


def check_keys(obj, expected: frozenset, what: str) -> None:
    if type(obj) is not dict or obj.keys() != expected:
        raise SchemaError("bad_fields", f"{what} must have exactly the fields {sorted(expected)}")


@dataclass(frozen=True)
class Geometry:
    """What a session exchanges; fixed by its ``Open`` and checked on every frame."""

    hidden: int
    rank: int
    targets: tuple[str, ...]  # adapted projections, e.g. ("q", "k", "v")
    shared_a: bool  # one A per layer: Activations carries 1 tensor instead of len(targets)
    layers: tuple[int, ...]  # cloud layers that exchange activations, in order
    dtype: str = "fp32"  # wire dtype of Activations / Reply
    max_tokens: int = 2048  # rows per frame
    projections: str = ""  # PrivateLoRAConfig.projection_fingerprint(): the recipe of A and B

    def __post_init__(self):
        for name in ("targets", "layers"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def n_activations(self) -> int:
        return 1 if self.shared_a else len(self.targets)

    def validate(self) -> "Geometry":
        g, c = GeometryError, "bad_geometry"
        check_int(self.hidden, "hidden", 1, MAX_HIDDEN, g, c)
        check_int(self.rank, "rank", 1, self.hidden, g, c)
        check_int(self.max_tokens, "max_tokens", 1, MAX_TOKENS, g, c)
        check_bool(self.shared_a, "shared_a", g, c)
        if type(self.dtype) is not str or self.dtype not in DTYPES:
            raise g("bad_geometry", f"dtype must be one of {sorted(DTYPES)}")
        t, ls = self.targets, self.layers
        if type(t) is not tuple or not 1 <= len(t) <= MAX_TARGETS \
                or not all(type(x) is str and NAME_RE.fullmatch(x) for x in t) \
                or len(set(t)) != len(t):
            raise g("bad_geometry", "targets must be 1-16 distinct short lowercase names")
        if type(ls) is not tuple or not len(ls) <= MAX_LAYERS:   # empty: no adapted cloud layer
            raise g("bad_geometry", f"layers must be a tuple of 0-{MAX_LAYERS} ints")
        for x in ls:
            check_int(x, "layer", 0, 65535, g, c)
        if any(b <= a for a, b in zip(ls, ls[1:])):
            raise g("bad_geometry", "layers must be strictly increasing")
        if type(self.projections) is not str or not PROJECTIONS_RE.fullmatch(self.projections):
            raise g("bad_geometry", "projections must be 16 lowercase hex digits (or empty)")
        return self

    def to_wire(self) -> dict:
        return asdict(self)  # tuples pack as msgpack arrays

    @classmethod
    def from_wire(cls, obj: Any) -> "Geometry":
        check_keys(obj, GEOMETRY_FIELDS, "geometry")
        if type(obj["targets"]) is not list or type(obj["layers"]) is not list:
            raise GeometryError("bad_geometry", "targets and layers must be arrays")
        return cls(**{**obj, "targets": tuple(obj["targets"]),
                      "layers": tuple(obj["layers"])}).validate()


GEOMETRY_FIELDS = frozenset(f.name for f in fields(Geometry))


def session_geometry(layer_ids, hidden: int, cfg, dtype: str = "fp32", max_tokens: int = 2048) -> Geometry:
    """The geometry of a session of a split configured by ``cfg`` (a ``PrivateLoRAConfig``),
    with the fingerprint of its A and B's recipe: the cloud refuses an Open whose differs."""
    return Geometry(hidden=hidden, rank=cfg.rank, targets=tuple(cfg.targets), shared_a=cfg.shared_a,
                    layers=tuple(layer_ids), dtype=dtype, max_tokens=max_tokens,
                    projections=cfg.projection_fingerprint()).validate()


@dataclass
class FrameContext:
    """Per-frame state: direction, session geometry, wire dtype, raw payload bytes."""

    direction: str
    geometry: Geometry | None
    dtype: str = "fp32"
    raw: int = 0
    encoding: bool = False
    shared: dict | None = None  # encode_many: buffers converted once, by (id(base), dtype, cols)

    def need_geometry(self) -> Geometry:
        if self.geometry is None:
            err = PrivacyError if self.encoding and self.direction == UP else GeometryError
            raise err("no_geometry", "tensor frames need the session's declared geometry")
        return self.geometry

    def geometry_if_needed(self) -> Geometry | None:
        """Up frames must be checked against the geometry; down frames when it is known."""
        return self.need_geometry() if self.direction == UP else self.geometry
