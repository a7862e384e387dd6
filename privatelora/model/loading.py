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

``load_cloud_layers(spec, layers_of)`` is the cloud's counterpart: from ``tiny`` or a
checkpoint directory it reads only the decoder layers ``layers_of(n_layers)`` and keeps
nothing else: the embedding, final norm and LM head are removed from the model (``None``)
and every other decoder layer is an empty ``DroppedLayer``, so the model holds no meta
tensor either and moves to a GPU as it is. Same fingerprint as the full model's.
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


def _load_prefixes(path: Path, config, keep: tuple[str, ...], dtype: torch.dtype, who: str):
    """The HF model built on the meta device with only the checkpoint's tensors whose names
    start with ``keep`` read and assigned (the rest stay on meta, never read), its rotary
    embedding rebuilt off meta, and the fingerprint of the whole checkpoint; (None, None)
    when the checkpoint is not in safetensors (the caller loads everything)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    files = _weight_files(path)
    if not files:
        return None, None
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
    if tied and "lm_head.weight".startswith(keep) and "lm_head.weight" not in state:
        model.lm_head.weight = model.model.embed_tokens.weight
    need = [k for k in missing if k.startswith(keep) and not (tied and k == "lm_head.weight")]
    if need:
        raise ModelLoadError(f"{path} lacks tensors the {who} needs: {', '.join(need[:3])}")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)   # its buffers were on meta
    return model, _fingerprint_files(config, files, tied, dtype)


def _load_device_only(path: Path, config, layers, dtype: torch.dtype):
    """The HF model with only the embedding, final norm, LM head and ``layers`` loaded;
    None when the checkpoint is not in safetensors (the caller loads everything)."""
    keep = ("model.embed_tokens.", "model.norm.", "lm_head.") + tuple(f"model.layers.{i}." for i in layers)
    return _load_prefixes(path, config, keep, dtype, "device")


class DroppedLayer(torch.nn.Module):
    """Stands in for a decoder layer this process does not hold (no tensors at all)."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"decoder layer {self.index} is not held in this process")


def keep_only_layers(model, layers) -> Any:
    """Strip ``model`` down to its decoder layers ``layers`` (and the rotary embedding):
    embedding, final norm and LM head become ``None``, every other layer a tensorless
    ``DroppedLayer``. Layer indices are kept, so ``model.model.layers[i]`` still works for
    the kept ones; the model can no longer run its own forward."""
    keep = set(layers)
    inner = model.model
    inner.embed_tokens = None
    inner.norm = None
    model.lm_head = None
    for i in range(len(inner.layers)):
        if i not in keep:
            inner.layers[i] = DroppedLayer(i)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise ModelLoadError(f"tensors left unloaded: {', '.join(left[:3])}")
    return model


def _checkpoint_config(spec: str):
    """(path, config) of a local checkpoint directory; ModelLoadError when it is not one."""
    path = Path(spec)
    if not path.is_dir():
        raise ModelLoadError(f"model path {spec!r} is not a directory (give a local HF checkpoint or 'tiny')")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{spec!r} has no config.json: not a Hugging Face checkpoint directory")
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - HF raises many types for bad files
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {str(e).splitlines()[0]}") from e
    check_supported(config)
    return path, config


def load_cloud_layers(spec, layers_of, dtype: torch.dtype = torch.float32) -> Backbone:
    """The backbone as a cloud process holds it: only the decoder layers
    ``layers_of(n_layers)`` (``keep_only_layers``), no tokenizer.

    ``tiny`` and checkpoint directories in safetensors are read tensor by tensor: nothing
    but those layers is ever read. A checkpoint without safetensors, or a ``tiny-<family>``
    random model (built in memory from its seed), is loaded whole, fingerprinted, then
    stripped. The fingerprint is always the full model's. An in-memory model object is
    returned whole and unchanged (tests and benchmarks share it with an in-process device).
    """
    if not isinstance(spec, (str, os.PathLike)):
        return load_backbone(spec, dtype=dtype)
    spec = str(spec)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    if spec.startswith("tiny-"):
        bb = load_backbone(spec, dtype=dtype)
        keep_only_layers(bb.model, layers_of(bb.n_layers))
        return Backbone(bb.model, None, bb.fingerprint, bb.name)
    if spec == "tiny":
        from privatelora.model.zoo import SHIPPED, load_tiny
        if not (SHIPPED / "config.json").is_file():
            load_tiny("tiny")                 # raises its own clear error
        path, config = _checkpoint_config(str(SHIPPED))
        name = "tiny"
    else:
        path, config = _checkpoint_config(spec)
        name = path.name
    layers = list(layers_of(config.num_hidden_layers))
    try:
        model, fp = _load_prefixes(path, config, tuple(f"model.layers.{i}." for i in layers), dtype, "cloud")
        if model is None:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
            fp = fingerprint(model)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load weights from {spec!r}: {str(e).splitlines()[0]}") from e
    return Backbone(_prepare(keep_only_layers(model, layers)), None, fp, name)


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
    path, config = _checkpoint_config(spec)
    from transformers import AutoModelForCausalLM
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
