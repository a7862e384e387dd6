"""Our compact Llama-family decoder block, fed with the HF weights (docs/design.md).

Everything works on *flat token batches*: the tokens of many sessions concatenated into
one ``[T, d]`` tensor, described by a list of ``Segment(start, n)`` (the positions
``start .. start+n-1`` of one session). Linear layers run once on the flat tensor;
attention runs per segment against that session's own ``KVCache``.

The layer is cut where PrivateLoRA needs it: ``rms_norm`` of the residual gives the
normed input h; the q/k/v projections of h receive the adapter deltas ``B (M (A h))``
computed elsewhere; ``attend`` and ``finish_layer`` complete the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Segment:
    start: int   # position of the segment's first token in its session
    n: int       # number of tokens


class KVCache:
    """One session's keys and values for one layer, grown by doubling capacity."""

    def __init__(self):
        self.k: torch.Tensor | None = None   # [capacity, n_kv, head_dim]
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[0]
        need = self.length + n
        if self.k is None or need > self.k.shape[0]:
            cap = max(16, need, 2 * (0 if self.k is None else self.k.shape[0]))
            nk = k.new_empty((cap, *k.shape[1:]))
            nv = v.new_empty((cap, *v.shape[1:]))
            if self.length:
                nk[: self.length] = self.k[: self.length]
                nv[: self.length] = self.v[: self.length]
            self.k, self.v = nk, nv
        self.k[self.length: need] = k
        self.v[self.length: need] = v
        self.length = need
        return self.k[:need], self.v[:need]

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (speculative tokens the device rejected)."""
        self.length = min(self.length, max(0, length))

    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.length * self.k[0].numel() * self.k.element_size()


@dataclass
class LayerWeights:
    """References to one HF decoder layer's weights (no copies)."""

    index: int
    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    wv: torch.Tensor
    bv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    ln1: torch.Tensor
    ln2: torch.Tensor
    eps: float
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    b_gate: torch.Tensor | None
    b_up: torch.Tensor | None
    b_down: torch.Tensor | None
    act: object
    n_heads: int
    n_kv: int
    head_dim: int
    window: int | None   # sliding attention window, None for full attention

    @classmethod
    def from_hf(cls, layer, config, index: int) -> "LayerWeights":
        from transformers.activations import ACT2FN
        at, mlp = layer.self_attn, layer.mlp
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(index=index,
                   wq=at.q_proj.weight, bq=at.q_proj.bias, wk=at.k_proj.weight, bk=at.k_proj.bias,
                   wv=at.v_proj.weight, bv=at.v_proj.bias, wo=at.o_proj.weight, bo=at.o_proj.bias,
                   ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
                   eps=layer.input_layernorm.variance_epsilon,
                   w_gate=mlp.gate_proj.weight, w_up=mlp.up_proj.weight, w_down=mlp.down_proj.weight,
                   b_gate=mlp.gate_proj.bias, b_up=mlp.up_proj.bias, b_down=mlp.down_proj.bias,
                   act=ACT2FN[config.hidden_act], n_heads=config.num_attention_heads,
                   n_kv=config.num_key_value_heads, head_dim=hd, window=layer_window(config, index))

    def base(self, target: str, h: torch.Tensor) -> torch.Tensor:
        """W_t h + b_t for a flat batch h [T, d] -> [T, out_t]."""
        w, b = {"q": (self.wq, self.bq), "k": (self.wk, self.bk), "v": (self.wv, self.bv)}[target]
        return F.linear(h, w, b)


def layer_window(config, index: int) -> int | None:
    """The sliding window of layer ``index`` as HF applies it, or None."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and config.model_type != "mistral":
        return window if types[index] == "sliding_attention" else None
    return window  # Mistral: every layer slides


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # float32 statistics, then back to the input dtype, as HF does
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, hd]; cos, sin [T, hd]."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


def rope_tables(rotary, segments: list[Segment], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, hd] for the flat positions of ``segments``, from HF's rotary module
    (which handles every rope-scaling variant)."""
    pos = torch.cat([torch.arange(s.start, s.start + s.n) for s in segments]).to(like.device)
    cos, sin = rotary(like, pos[None, :])
    return cos[0], sin[0]


def attend(lw: LayerWeights, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           segments: list[Segment], caches: list[KVCache], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary + causal (optionally sliding) attention per segment over its KV cache.

    q [T, H*hd], k, v [T, KV*hd]  ->  [T, H*hd]. Appends this batch's keys/values to each
    segment's cache; a segment's start must equal its cache length.
    """
    T = q.shape[0]
    q = apply_rope(q.view(T, lw.n_heads, lw.head_dim), cos, sin)
    k = apply_rope(k.view(T, lw.n_kv, lw.head_dim), cos, sin)
    v = v.view(T, lw.n_kv, lw.head_dim)
    out = q.new_empty(T, lw.n_heads, lw.head_dim)
    off = 0
    for seg, cache in zip(segments, caches):
        if cache.length != seg.start:
            raise RuntimeError(f"layer {lw.index}: segment starts at {seg.start} but cache holds {cache.length}")
        sl = slice(off, off + seg.n)
        k_all, v_all = cache.append(k[sl], v[sl])
        S = k_all.shape[0]
        mask = None
        if seg.n > 1 or (lw.window is not None and S > lw.window):
            qpos = torch.arange(seg.start, seg.start + seg.n, device=q.device)[:, None]
            kpos = torch.arange(S, device=q.device)[None, :]
            mask = kpos <= qpos
            if lw.window is not None:
                mask = mask & (kpos > qpos - lw.window)
        o = F.scaled_dot_product_attention(
            q[sl].transpose(0, 1)[None], k_all.transpose(0, 1)[None], v_all.transpose(0, 1)[None],
            attn_mask=mask, scale=lw.head_dim ** -0.5, enable_gqa=lw.n_heads != lw.n_kv)
        out[sl] = o[0].transpose(0, 1)
        off += seg.n
    return out.reshape(T, lw.n_heads * lw.head_dim)


def finish_layer(lw: LayerWeights, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Residual after attention, then the gated MLP with its residual: the layer's output."""
    x = x + F.linear(attn, lw.wo, lw.bo)
    h = rms_norm(x, lw.ln2, lw.eps)
    mlp = F.linear(lw.act(F.linear(h, lw.w_gate, lw.b_gate)) * F.linear(h, lw.w_up, lw.b_up), lw.w_down, lw.b_down)
    return x + mlp
