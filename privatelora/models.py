"""Loading Llama-family backbones from local paths, and the tiny model zoo.

Contract: ``load_backbone(spec)`` returns a ``Backbone`` (the HF model in eval mode, its
tokenizer, and a fingerprint). ``spec`` is a local checkpoint directory, the name
``tiny``, a ``tiny-<family>`` name, or an already built HF model object. Nothing is ever
downloaded (``local_files_only``). Unsupported architectures fail with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import PrivateLoRAError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# the shipped trained tiny model, once it exists, lives here
ZOO_DIR = Path(__file__).parent / "zoo"


class ModelLoadError(PrivateLoRAError):
    pass


@dataclass
class Backbone:
    model: Any            # a *ForCausalLM of a supported family, eval mode, frozen
    tokenizer: Any        # may be None for a bare model object
    fingerprint: str
    name: str

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers


def check_supported(config) -> None:
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"unsupported architecture {mt!r}: privatelora supports the Llama family "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})")


def fingerprint(model) -> str:
    """A stable hash of a backbone: its config and a strided sample of every weight.

    Hashing every byte of a 7B model costs tens of seconds; a sample of each tensor
    (shape, dtype and up to 4096 evenly spaced values) tells different backbones apart.
    """
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    keep = {k: cfg[k] for k in sorted(cfg) if k in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
        "rms_norm_eps", "rope_parameters", "rope_theta", "tie_word_embeddings")}
    h.update(json.dumps(keep, sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _prepare(model) -> Any:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_backbone(spec, dtype: torch.dtype = torch.float32) -> Backbone:
    if not isinstance(spec, (str, os.PathLike)):
        check_supported(getattr(spec, "config", None))
        model = _prepare(spec.to(dtype))
        return Backbone(model, None, fingerprint(model), type(spec).__name__)
    spec = str(spec)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # stderr stays one line per error for the CLI
    if spec == "tiny" or spec.startswith("tiny-"):
        from .zoo import load_tiny
        model, tok = load_tiny(spec)
        model = _prepare(model.to(dtype))
        return Backbone(model, tok, fingerprint(model), spec)
    path = Path(spec)
    if not path.is_dir():
        raise ModelLoadError(f"model path {spec!r} is not a directory (give a local HF checkpoint or 'tiny')")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{spec!r} has no config.json: not a Hugging Face checkpoint directory")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - HF raises many types for bad files
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {str(e).splitlines()[0]}") from e
    check_supported(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load weights from {spec!r}: {str(e).splitlines()[0]}") from e
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - a checkpoint without tokenizer still serves token ids
        tok = None
    model = _prepare(model)
    return Backbone(model, tok, fingerprint(model), path.name)
