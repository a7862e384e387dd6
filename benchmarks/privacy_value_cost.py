"""What the by-value privacy check (privacy.private_hit) adds to encoding one reply frame.

    python benchmarks/privacy_value_cost.py

Cases: the tiny model's rank (16) with its adapter's M's registered, replies [1..3, 1, 16];
a 7B-like adapter (32 layers x q/k/v = 96 registered [128, 128] M's, 24576 row/column
vectors), replies [3, 1, 128]; and a 16-token prefill reply [3, 16, 128]. For each: the
fastest of 7 runs of ``private_hit`` alone, and of ``wire.encode(Reply)`` with the registry filled vs
with the check patched out (their difference is the added cost per frame).
"""

from __future__ import annotations

import timeit

import torch

from privatelora import wire
from privatelora.config import PrivateLoRAConfig
from privatelora.model.adapters import PrivateAdapter
from privatelora.privacy import private_hit
from privatelora.wire import tensors as wire_tensors

KEY = bytes(32)


def _us(fn, number=2000, repeat=7) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6   # min: the machine is shared


def case(rank: int, n_layers: int, shape, dtype="fp32") -> dict:
    cfg = PrivateLoRAConfig(rank=rank)
    adapter = PrivateAdapter(cfg, n_layers, "bench").randomize_(7, scale=0.3)
    g = wire.Geometry(hidden=max(rank, 64), rank=rank, targets=("q", "k", "v")[:shape[0]], shared_a=False,
                      layers=tuple(range(n_layers)), dtype=dtype)
    count, n, r = shape
    gen = torch.Generator().manual_seed(1)
    ms = [adapter.get(0, t) for t in cfg.targets]
    m = tuple(torch.randn(n, r, generator=gen) @ M.T for M in ms[:count])   # honest: M A h
    x = torch.stack(m).numpy().reshape(-1, r)
    msg = wire.Reply(1, 0, m)
    private_hit(x)                                   # build the index once
    hit = _us(lambda: private_hit(x))
    with_check = _us(lambda: wire.encode(msg, key=KEY, direction="up", geometry=g))
    saved = wire_tensors._check_values
    wire_tensors._check_values = lambda x, what: None
    try:
        without = _us(lambda: wire.encode(msg, key=KEY, direction="up", geometry=g))
    finally:
        wire_tensors._check_values = saved
    return {"rank": rank, "registered_M": len(adapter.M), "reply": list(shape), "dtype": dtype,
            "private_hit_us": round(hit, 2), "encode_us": round(with_check, 2),
            "encode_unchecked_us": round(without, 2), "added_us": round(with_check - without, 2)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    for args in ((16, 4, (1, 1, 16)), (16, 4, (3, 1, 16)), (128, 32, (3, 1, 128)),
                 (128, 32, (3, 1, 128), "int8"), (128, 32, (3, 16, 128))):
        print(case(*args))
