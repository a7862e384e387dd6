"""Configuration of a PrivateLoRA split, and the errors the package raises.

``PrivateLoRAConfig`` says *how* a backbone is split and adapted; it holds no weights.
Validation happens here once, against the backbone's geometry, so the rest of the code
can trust its fields.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class PrivateLoRAConfig:
    rank: int = 16
    targets: tuple[str, ...] = ("q", "k", "v")
    shared_a: bool = False          # one A per layer shared by q, k, v (r numbers down, not 3r)
    device_head_layers: int = 0     # first k decoder layers run on the device
    device_tail_layers: int = 0     # last k decoder layers run on the device
    seed: int = 0                   # public seed of the shared frozen A and B
    dtype: str = "float32"          # compute dtype of both parts
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d["targets"] = list(self.targets)
        return d
