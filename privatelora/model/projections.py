"""The shared public projections A and B, made from public things only.

Per adapted projection P of layer l:  P(h) = W_P h + B_P M_P A_P h.
``PublicProjections`` holds A [r, d] and B [d_out, r] for every (layer, target), identical
on device and cloud, never trained. With ``shared_a`` one A per layer serves q, k and v.
Two schemes (``PrivateLoRAConfig.projection``):

- ``random`` ("normal-v1"): Gaussians drawn from the public seed.
- ``svd`` ("svd-v1", LoRA-XS, arXiv 2405.17604): A = the top-r right singular vectors of
  the frozen weight W (for a shared A: of q, k, v's weights stacked), B = W A^T (= U_r S_r
  when A comes from W alone). M then mixes W's own principal input directions into its
  principal output directions. Computed from the public checkpoint, so privacy is unchanged;
  each side needs only the weights of the layers it makes A and B for.

Contract: the same checkpoint, config and layers give bit-identical A and B on every call
and on device and cloud; the work is float64 on CPU with the sign of each singular vector
fixed, then cast to the compute dtype.
"""

from __future__ import annotations

import hashlib
import json

import torch

from privatelora.config import PROJECTIONS, ConfigError, PrivateLoRAConfig

# The random scheme's recipe version (kept under its old name: files and tests cite it).
PROJECTION_SCHEME = PROJECTIONS["random"]


def out_features(config, target: str) -> int:
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = config.num_attention_heads if target == "q" else config.num_key_value_heads
    return heads * hd


def hf_weights(model):
    """``(layer, target) -> W [d_out, d_in]`` of a Hugging Face decoder model (the svd scheme's input)."""
    return lambda layer, t: getattr(model.model.layers[layer].self_attn, f"{t}_proj").weight


def _generator(seed: int, *parts) -> torch.Generator:
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def svd_a(W: torch.Tensor, r: int) -> torch.Tensor:
    """The top-``r`` right singular vectors of ``W`` [n, d] as rows [r, d], float64, each with
    its largest-magnitude entry positive (the SVD fixes a vector only up to sign; this choice
    makes every machine that computes the same numbers agree on it)."""
    W = W.detach().to(device="cpu", dtype=torch.float64)
    if r > min(W.shape):
        raise ConfigError(f"the svd projection needs rank <= {min(W.shape)} (the weight is {list(W.shape)}), "
                          f"got {r}; use a smaller --rank or --projection random")
    _, _, vh = torch.linalg.svd(W, full_matrices=False)
    a = vh[:r].clone()
    pivot = a.abs().argmax(dim=1)
    sign = torch.sign(a[torch.arange(r), pivot])
    return a * sign[:, None]


class PublicProjections:
    """A and B of every adapted projection of ``layers``.

    random: A ~ N(0, 1/d) so that ``A h`` has unit scale for a normed h; B ~ N(0, 1/r), drawn
    on CPU in float32 and cast, so every machine draws the same numbers. svd: from
    ``weights(layer, target)`` (``hf_weights(model)``), required for that scheme.
    """

    def __init__(self, model_config, cfg: PrivateLoRAConfig, layers, device=None, weights=None):
        self.cfg = cfg
        if cfg.projection == "svd" and weights is None and list(layers):
            raise ConfigError("the svd projection needs the weights of the layers it adapts")
        self.A: dict[tuple[int, str], torch.Tensor] = {}
        self.B: dict[tuple[int, str], torch.Tensor] = {}
        for layer in layers:
            if cfg.projection == "svd":
                self._svd_layer(layer, weights)
            else:
                self._random_layer(model_config, layer)
        dt = cfg.torch_dtype
        for table in (self.A, self.B):
            for k, v in table.items():
                table[k] = v.to(device=device, dtype=dt)

    def _random_layer(self, model_config, layer: int) -> None:
        cfg, d, r = self.cfg, model_config.hidden_size, self.cfg.rank
        for t in cfg.targets:
            akey = self.a_key(t)
            if (layer, akey) not in self.A:
                g = _generator(cfg.seed, PROJECTION_SCHEME, "A", layer, akey)
                self.A[(layer, akey)] = torch.randn(r, d, generator=g) / d ** 0.5
            g = _generator(cfg.seed, PROJECTION_SCHEME, "B", layer, t)
            self.B[(layer, t)] = torch.randn(out_features(model_config, t), r, generator=g) / r ** 0.5

    def _svd_layer(self, layer: int, weights) -> None:
        cfg = self.cfg
        W = {t: weights(layer, t).detach().to(device="cpu", dtype=torch.float64) for t in cfg.targets}
        if cfg.shared_a:
            self.A[(layer, "shared")] = svd_a(torch.cat([W[t] for t in cfg.targets]), cfg.rank)
        else:
            for t in cfg.targets:
                self.A[(layer, t)] = svd_a(W[t], cfg.rank)
        for t in cfg.targets:
            self.B[(layer, t)] = W[t] @ self.A[(layer, self.a_key(t))].T

    def a_keys(self) -> tuple[str, ...]:
        return ("shared",) if self.cfg.shared_a else self.cfg.targets

    def a_key(self, target: str) -> str:
        return "shared" if self.cfg.shared_a else target
