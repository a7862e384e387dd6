"""The monolithic reference: the same backbone with ``W + B M A`` merged into q, k, v.

It runs entirely through Hugging Face's own modules, so comparing it with the split is a
comparison against an independent implementation. Used by tests and as a baseline.
"""

from __future__ import annotations

import copy

import torch

from privatelora.model.adapters import PrivateAdapter
from privatelora.model.projections import PublicProjections, hf_weights
from privatelora.model.sampling import Sampler, SamplingParams


def merged_model(backbone, adapter: PrivateAdapter):
    """A deep copy of the HF model with every adapter merged into its weights."""
    cfg = adapter.cfg
    model = copy.deepcopy(backbone.model)
    layers = adapter.layers           # the placement: only these layers carry M
    proj = PublicProjections(model.config, cfg, layers, device=model.device, weights=hf_weights(backbone.model))
    with torch.no_grad():
        for i in layers:
            layer = model.model.layers[i]
            for t in cfg.targets:
                lin = getattr(layer.self_attn, f"{t}_proj")
                delta = proj.B[(i, t)] @ adapter.get(i, t) @ proj.A[(i, proj.a_key(t))]
                lin.weight += delta.to(lin.weight.dtype)
    return model


@torch.no_grad()
def full_logits(model, ids) -> torch.Tensor:
    """Logits [n, vocab] of a whole sequence in one forward."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    return model(input_ids=ids).logits[0]


@torch.no_grad()
def generate(model, prompt, params: SamplingParams, keep_logits: bool = False):
    """Token ids (and per-step logits) from the HF model with its own KV cache."""
    sampler = Sampler(params)
    ids = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
    out = model(input_ids=ids, use_cache=True)
    past = out.cache
    logits_trace = [out.logits[0].clone()] if keep_logits else []
    tokens: list[int] = []
    logits = out.logits[0, -1]
    while len(tokens) < params.max_new_tokens:
        tok = sampler(logits)
        tokens.append(tok)
        if tok in params.stop_ids or len(tokens) >= params.max_new_tokens:
            break
        out = model(input_ids=torch.tensor([[tok]]), cache=past, use_cache=True)
        past = out.cache
        logits = out.logits[0, -1]
        if keep_logits:
            logits_trace.append(out.logits[0].clone())
    return tokens, logits_trace
