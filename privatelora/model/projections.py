"""The shared public projections A and B, drawn from a public seed.

Per adapted projection P of layer l:  P(h) = W_P h + B_P M_P A_P h.
``PublicProjections`` holds A [r, d] and B [d_out, r] for every (layer, target), drawn
from the public seed, identical on device and cloud, never trained. With ``shared_a``
one A per layer serves q, k and v.
"""

from __future__ import annotations

import hashlib
import json

import torch

from privatelora.config import PrivateLoRAConfig

# Version of the recipe that draws A and B from the seed; an M is only meaningful with the
# exact A and B it was trained against, so the adapter file records it.
PROJECTION_SCHEME = "normal-v1"


def out_features(config, target: str) -> int:
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = config.num_attention_heads if target == "q" else config.num_key_value_heads
    return heads * hd


def _generator(seed: int, *parts) -> torch.Generator:
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class PublicProjections:
    """A and B of every adapted projection, from the public seed.

    A ~ N(0, 1/d) so that ``A h`` has unit scale for a normed h; B ~ N(0, 1/r). Both are
    drawn on CPU in float32 and cast, so every machine draws the same numbers.
    """

    def __init__(self, model_config, cfg: PrivateLoRAConfig, layers, device=None):
        self.cfg = cfg
        d, r = model_config.hidden_size, cfg.rank
        dt = cfg.torch_dtype
        self.A: dict[tuple[int, str], torch.Tensor] = {}
        self.B: dict[tuple[int, str], torch.Tensor] = {}
        for layer in layers:
            for t in cfg.targets:
                akey = "shared" if cfg.shared_a else t
                if (layer, akey) not in self.A:
                    g = _generator(cfg.seed, PROJECTION_SCHEME, "A", layer, akey)
                    self.A[(layer, akey)] = (torch.randn(r, d, generator=g) / d ** 0.5).to(device=device, dtype=dt)
                g = _generator(cfg.seed, PROJECTION_SCHEME, "B", layer, t)
                n_out = out_features(model_config, t)
                self.B[(layer, t)] = (torch.randn(n_out, r, generator=g) / r ** 0.5).to(device=device, dtype=dt)

    def a_keys(self) -> tuple[str, ...]:
        return ("shared",) if self.cfg.shared_a else self.cfg.targets

    def a_key(self, target: str) -> str:
        return "shared" if self.cfg.shared_a else target
