"""Loading Llama-family backbones from local paths, and the tiny model zoo.

Contract: ``load_backbone(spec)`` returns a ``Backbone`` (the HF model in eval mode, its
tokenizer, and a fingerprint). ``spec`` is a local checkpoint directory, the name
``tiny``, a ``tiny-<family>`` name, or an already built HF model object. Nothing is ever
downloaded (``local_files_only``). Unsupported architectures fail with a clear error.

``load_backbone(path, layers=ids)`` loads only what a device needs from a safetensors
checkpoint: embedding, final norm, LM head and the decoder layers ``ids`` (none in the
reference design); the other layers stay on the meta device, never read. The
fingerprint is the same as the full model's (computed from the files, one tensor at a
time), so adapter files still check against it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from privatelora.config import PrivateLoRAError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


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
    return _fingerprint(model.config, sorted(model.state_dict().items()))


def _fingerprint(config, named_tensors) -> str:
    """``named_tensors``: (name, tensor) in name order; may be a generator (one at a time)."""
    h = hashlib.sha256()
    cfg = config.to_dict()
    keep = {k: cfg[k] for k in sorted(cfg) if k in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
        "rms_norm_eps", "rope_parameters", "rope_theta", "tie_word_embeddings")}
    h.update(json.dumps(keep, sort_keys=True, default=str).encode())
    for name, p in named_tensors:
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


def _fingerprint_files(config, files: list[Path], tied: bool, dtype: torch.dtype) -> str:
    """``fingerprint`` of the model stored in ``files`` (as loaded in ``dtype``) without
    building it: one tensor in memory at a time."""
    from safetensors import safe_open
    where = {}
    for f in files:
        with safe_open(f, "pt") as sf:
            where.update({k: (f, k) for k in sf.keys()})
    if tied and "lm_head.weight" not in where and "model.embed_tokens.weight" in where:
        where["lm_head.weight"] = where["model.embed_tokens.weight"]   # state_dict lists both names

    def tensors():
        for name in sorted(where):
            f, key = where[name]
            with safe_open(f, "pt") as sf:
                yield name, sf.get_tensor(key).to(dtype)
    return _fingerprint(config, tensors())


def _weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors weight files (sharded or not); [] if it has none.
    Other .safetensors files in the directory (adapters, say) are not weights."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = path / "model.safetensors"
    return [single] if single.is_file() else []


def _load_device_only(path: Path, config, layers, dtype: torch.dtype):
    """The HF model with only the embedding, final norm, LM head and ``layers`` loaded;
    None when the checkpoint is not in safetensors (the caller loads everything)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    files = _weight_files(path)
    if not files:
        return None, None
    keep = ("model.embed_tokens.", "model.norm.", "lm_head.") + tuple(f"model.layers.{i}." for i in layers)
    state = {}
    for f in files:
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                if k.startswith(keep):
                    state[k] = sf.get_tensor(k).to(dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing = model.load_state_dict(state, strict=False, assign=True).missing_keys
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied and "lm_head.weight" not in state:
        model.lm_head.weight = model.model.embed_tokens.weight
    need = [k for k in missing if k.startswith(keep) and not (tied and k == "lm_head.weight")]
    if need:
        raise ModelLoadError(f"{path} lacks tensors the device needs: {', '.join(need[:3])}")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)   # its buffers were on meta
    return model, _fingerprint_files(config, files, tied, dtype)


def load_backbone(spec, dtype: torch.dtype = torch.float32, layers=None) -> Backbone:
    if not isinstance(spec, (str, os.PathLike)):
        check_supported(getattr(spec, "config", None))
        model = _prepare(spec.to(dtype))
        return Backbone(model, None, fingerprint(model), type(spec).__name__)
    spec = str(spec)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # stderr stays one line per error for the CLI
    if spec == "tiny" or spec.startswith("tiny-"):
        from privatelora.model.zoo import load_tiny
        model, tok = load_tiny(spec)
        model = _prepare(model.to(dtype))
        return Backbone(model, tok, fingerprint(model), spec)
    path = Path(spec)
    if not path.is_dir():
        raise ModelLoadError(f"model path {spec!r} is not a directory (give a local HF checkpoint or 'tiny')")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{spec!r} has no config.json: not a Hugging Face checkpoint directory")
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - HF raises many types for bad files
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {str(e).splitlines()[0]}") from e
    check_supported(config)
    if layers is not None:
        try:
            model, fp = _load_device_only(path, config, list(layers), dtype)
        except ModelLoadError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"cannot load weights from {spec!r}: {str(e).splitlines()[0]}") from e
        if model is not None:
            return Backbone(_prepare(model), _tokenizer(path), fp, path.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load weights from {spec!r}: {str(e).splitlines()[0]}") from e
    model = _prepare(model)
    return Backbone(model, _tokenizer(path), fingerprint(model), path.name)


def _tokenizer(path: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - a checkpoint without tokenizer still serves token ids
        return None
