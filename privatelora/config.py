"""Configuration of a PrivateLoRA split, and the errors the package raises.

``PrivateLoRAConfig`` says *how* a backbone is split and adapted; it holds no weights.
Validation happens here once, against the backbone's geometry, so the rest of the code
can trust its fields.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

import torch

# Projections that read the layer's normed input h. Adapting only these keeps the split at
# one round trip per layer (o_proj or the MLP would need a second exchange mid-layer).
ALLOWED_TARGETS = ("q", "k", "v")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class PrivateLoRAError(Exception):
    """Base of every error the package raises on bad input (CLI exit code 2)."""


class ConfigError(PrivateLoRAError, ValueError):
    pass


class UsageError(PrivateLoRAError):
    """A command-line argument that cannot be honoured."""


PLACEMENT_HELP = ("decoder layers that carry A, B and M: all (default), last:K, first:K, every:K (every K-th "
                  "layer, ending at the last one) or a list such as 0,8,16; a token costs one round trip per "
                  "adapted cloud layer plus one")
# Projection schemes: how the public A and B are made (model/projections.py). The value is the
# recipe's version, recorded in adapter files and hashed into the session's Open: an M is only
# meaningful with the exact A and B it was trained against.
PROJECTIONS = {"random": "normal-v1", "svd": "svd-v1"}
PROJECTION_HELP = ("public A and B: svd (default; A = the top-r right singular vectors of the frozen weight, "
                   "B = W A^T, computed from the checkpoint) or random (Gaussians drawn from --projection-seed)")
_PLACEMENT_RE = re.compile(r"all|(last|first|every):([1-9][0-9]*)|[0-9]+(,[0-9]+)*")


def placement_layers(spec: str, n_layers: int) -> tuple[int, ...]:
    """The decoder layers an ``adapted_layers`` spec names in a model of ``n_layers``, ascending."""
    m = _PLACEMENT_RE.fullmatch(spec)
    if m is None:
        raise ConfigError(f"adapted_layers must be all, last:K, first:K, every:K or a list like 0,8,16; got {spec!r}")
    if spec == "all":
        return tuple(range(n_layers))
    if m.group(1):
        k = int(m.group(2))
        if m.group(1) != "every" and k > n_layers:
            raise ConfigError(f"adapted_layers {spec}: the model has only {n_layers} layers")
        if m.group(1) == "last":
            return tuple(range(n_layers - k, n_layers))
        if m.group(1) == "first":
            return tuple(range(k))
        return tuple(sorted(range(n_layers - 1, -1, -k)))
    layers = sorted({int(x) for x in spec.split(",")})
    if layers[-1] >= n_layers:
        raise ConfigError(f"adapted_layers {spec}: layer {layers[-1]} does not exist in a model of {n_layers} layers")
    return tuple(layers)


@dataclass(frozen=True)
class PrivateLoRAConfig:
    rank: int = 16
    targets: tuple[str, ...] = ("q", "k", "v")
    shared_a: bool = False          # one A per layer shared by q, k, v (r numbers down, not 3r)
    device_head_layers: int = 0     # first k decoder layers run on the device
    device_tail_layers: int = 0     # last k decoder layers run on the device
    seed: int = 0                   # public seed of the shared frozen A and B
    dtype: str = "float32"          # compute dtype of both parts
    adapted_layers: str = "all"     # decoder layers carrying A, B, M (PLACEMENT_HELP)
    projection: str = "svd"         # how A and B are made (PROJECTIONS, PROJECTION_HELP)
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if not self.targets:
            raise ConfigError("targets must name at least one projection")
        bad = [t for t in self.targets if t not in ALLOWED_TARGETS]
        if bad or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"targets must be distinct names among {ALLOWED_TARGETS}, got {self.targets}")
        # canonical order, so q,v and v,q are the same adapter
        object.__setattr__(self, "targets", tuple(t for t in ALLOWED_TARGETS if t in self.targets))
        for name in ("device_head_layers", "device_tail_layers", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {v!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"projection must be one of {sorted(PROJECTIONS)}, got {self.projection!r}")
        if not isinstance(self.adapted_layers, str):
            raise ConfigError(f"adapted_layers must be a string spec, got {self.adapted_layers!r}")
        spec = self.adapted_layers.replace(" ", "")
        object.__setattr__(self, "adapted_layers", spec)
        if _PLACEMENT_RE.fullmatch(spec) is None:
            placement_layers(spec, 0)           # raises with the reason

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def cloud_layers(self, n_layers: int) -> range:
        """Indices of the decoder layers the cloud runs."""
        first, last = self.device_head_layers, n_layers - self.device_tail_layers
        if last - first < 1:
            raise ConfigError(
                f"the model has {n_layers} layers: device_head_layers={self.device_head_layers} and "
                f"device_tail_layers={self.device_tail_layers} leave none for the cloud")
        return range(first, last)

    def adapted(self, n_layers: int) -> tuple[int, ...]:
        """Indices of the decoder layers that carry A, B and M (cloud and device layers alike)."""
        return placement_layers(self.adapted_layers, n_layers)

    def exchange_layers(self, n_layers: int) -> tuple[int, ...]:
        """The adapted cloud layers: one device round trip each, per token chain."""
        cloud = self.cloud_layers(n_layers)
        return tuple(i for i in self.adapted(n_layers) if i in cloud)

    @property
    def projection_scheme(self) -> str:
        """The recipe version of A and B (what adapter files record)."""
        return PROJECTIONS[self.projection]

    def projection_fingerprint(self) -> str:
        """16 hex digits naming the recipe of A and B: the scheme's version, the public seed
        (random scheme only: svd takes none), rank, targets and shared A. Device and cloud derive
        it alone; it travels in the session's Open so the cloud refuses a session whose A and B
        would differ from its own. The checkpoint itself is not in it (the device cannot see the
        cloud's layers); the adapter file pins the backbone's fingerprint on the device."""
        recipe = [self.projection_scheme, self.seed if self.projection == "random" else None,
                  self.rank, list(self.targets), self.shared_a]
        return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d["targets"] = list(self.targets)
        return d
