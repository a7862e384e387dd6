"""Communication accounting per session: numbers and bytes per direction per layer.

Bytes here are the payload (numbers x bytes per number), before any framing; the wire
transport counts framed bytes on its own. ``naive_numbers_per_token_per_layer`` is the
baseline (docs/design.md, section 2, "Per token per layer on the wire"): a split of plain LoRA where the device receives h (d
numbers) and returns one delta per adapted projection.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class CommStats:
    bytes_per_number: int = 4
    tokens: int = 0                                   # tokens that went through the cloud
    to_cloud: dict = field(default_factory=lambda: defaultdict(int))   # layer -> numbers
    to_device: dict = field(default_factory=lambda: defaultdict(int))
    handoff_to_cloud: int = 0                         # numbers in boundary hand-offs
    handoff_to_device: int = 0

    def add(self, other: "CommStats") -> None:
        self.tokens += other.tokens
        for layer, n in other.to_cloud.items():
            self.to_cloud[layer] += n
        for layer, n in other.to_device.items():
            self.to_device[layer] += n
        self.handoff_to_cloud += other.handoff_to_cloud
        self.handoff_to_device += other.handoff_to_device

    def numbers_per_token_per_layer(self) -> dict[str, float]:
        layers = max(1, len(set(self.to_cloud) | set(self.to_device)))
        toks = max(1, self.tokens)
        up = sum(self.to_cloud.values()) / toks / layers
        down = sum(self.to_device.values()) / toks / layers
        return {"to_cloud": up, "to_device": down, "total": up + down}

    def to_dict(self) -> dict:
        b = self.bytes_per_number
        up_layers = sum(self.to_cloud.values())
        down_layers = sum(self.to_device.values())
        per = self.numbers_per_token_per_layer()
        return {
            "tokens": self.tokens,
            "bytes_per_number": b,
            "to_cloud": (up_layers + self.handoff_to_cloud) * b,
            "to_device": (down_layers + self.handoff_to_device) * b,
            "layers": {str(k): {"to_cloud": self.to_cloud.get(k, 0) * b, "to_device": self.to_device.get(k, 0) * b}
                       for k in sorted(set(self.to_cloud) | set(self.to_device))},
            "handoff": {"to_cloud": self.handoff_to_cloud * b, "to_device": self.handoff_to_device * b},
            "per_token_per_layer": {k: v * b for k, v in per.items()},
        }


def naive_numbers_per_token_per_layer(model_config, targets) -> int:
    """d down (the device needs h) plus one delta per adapted projection up."""
    from privatelora.model.projections import out_features
    return model_config.hidden_size + sum(out_features(model_config, t) for t in targets)


def privatelora_numbers_per_token_per_layer(rank: int, targets, shared_a: bool) -> dict[str, int]:
    down = rank * (1 if shared_a else len(targets))
    up = rank * len(targets)
    return {"to_device": down, "to_cloud": up, "total": down + up}
