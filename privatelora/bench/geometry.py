"""Benchmark geometries: random-weight Llama models of fixed proportions from a fixed seed.

``7b``: Llama-2-7B proportions (hidden 4096, vocab 32000): two layers where only byte
counts matter (they do not depend on depth), 8 for ``bench throughput`` on a GPU. ``bench``: 7B proportions, CPU-sized (hidden 1024,
16 layers, 16 heads, MLP 2816, vocab 8192). ``tiny``: the shipped model's own config.
``geometry_checkpoint`` builds one once into the cache so many processes load it by path.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

GEOMETRIES = {
    # hidden, heads, kv heads, MLP, vocab: Llama-2-7B proportions
    "7b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
               vocab_size=32000),
    # 7B proportions, CPU-sized
    "bench": dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=16, intermediate_size=2816,
                  vocab_size=8192),
    "tiny": None,   # the shipped tiny model's own config
}
NAIVE_DTYPE = "fp16"   # the baseline: a naive split in fp16, as the paper counts it


def geometry_model(name: str, layers: int = 2, seed: int = 0):
    """A random-weight Llama of geometry ``name`` with ``layers`` decoder layers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from privatelora.config import PrivateLoRAError
    from privatelora.model.loading import load_backbone
    if name not in GEOMETRIES:
        raise PrivateLoRAError(f"unknown geometry {name!r}; choose one of {sorted(GEOMETRIES)}")
    if GEOMETRIES[name] is None:
        tiny = load_backbone("tiny").model.config.to_dict()
        dims = {k: tiny[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                     "intermediate_size", "vocab_size")}
    else:
        dims = GEOMETRIES[name]
    cfg = LlamaConfig(**dims, num_hidden_layers=layers, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        model = LlamaForCausalLM(cfg)
    return load_backbone(model)


def cache_dir() -> Path:
    import os
    return Path(os.environ.get("PRIVATELORA_CACHE") or Path.home() / ".cache" / "privatelora")


def geometry_checkpoint(name: str, layers: int = 16, seed: int = 0, quiet: bool = False) -> str:
    """A local checkpoint directory of geometry ``name`` (built once from ``seed``, then
    reused), so that many processes (backbone replicas, edge actors) load one backbone by
    path. ``tiny`` is the shipped model itself."""
    if name == "tiny":
        return "tiny"
    path = cache_dir() / f"geometry-{name}-L{layers}-seed{seed}"
    if (path / "config.json").is_file():
        return str(path)
    import shutil
    import tempfile
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        geometry_model(name, layers=layers, seed=seed).model.save_pretrained(tmp)
        tmp.rename(path)         # atomic: a half-written checkpoint is never found
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "config.json").is_file():   # not a concurrent builder winning the race
            raise
    if not quiet:
        print(f"[bench] built the {name} geometry ({layers} layers, seed {seed}) into {path} in "
              f"{time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return str(path)


def one_thread():
    """Cloud and device share this process in a benchmark: two OpenMP pools of two threads
    on two cores spin against each other and slow every op ~100x; one thread each avoids it."""
    import torch
    torch.set_num_threads(1)
