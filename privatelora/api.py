"""One-call construction of a split, for the CLI, examples and tests.

``build_split(model, cfg, adapter)`` loads the backbone, the user's adapter (a file, an
in-memory ``PrivateAdapter`` or none = M at zero) and returns both parts. When an adapter
file is given, its recorded rank/targets/shared_a/seed win; ``cfg`` supplies placement.
``build_device`` builds the device part alone, reading from a checkpoint only the
tensors a device holds. ``load_cloud_backbone`` loads what a cloud holds, only the
decoder layers it runs: what ``privatelora cloud`` and every ``serve`` replica load.

``build_split`` keeps one full backbone shared by both parts: it is for processes that
play device and cloud at once (``generate``, ``demo``, the API's in-process cloud, ``tune``
without ``--connect``, tests and benchmarks), never for a deployed cloud.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from privatelora.config import PrivateLoRAConfig
from privatelora.model.adapters import PrivateAdapter, config_from_adapter, load_adapter
from privatelora.model.loading import Backbone, load_backbone, load_cloud_layers
from privatelora.runtime.cloud import CloudPart
from privatelora.runtime.device import DevicePart


@dataclass
class Split:
    backbone: Backbone
    cfg: PrivateLoRAConfig
    adapter: PrivateAdapter
    cloud: CloudPart
    device: DevicePart


def resolve_config(cfg: PrivateLoRAConfig | None, adapter) -> PrivateLoRAConfig:
    cfg = cfg or PrivateLoRAConfig()
    if isinstance(adapter, (str, Path)):
        return config_from_adapter(adapter, cfg)
    if isinstance(adapter, PrivateAdapter):
        a = adapter.cfg
        return PrivateLoRAConfig(rank=a.rank, targets=a.targets, shared_a=a.shared_a, seed=a.seed,
                                 projection=a.projection, adapted_layers=",".join(map(str, adapter.layers)),
                                 device_head_layers=cfg.device_head_layers,
                                 device_tail_layers=cfg.device_tail_layers, dtype=cfg.dtype)
    return cfg


def load_user_adapter(backbone: Backbone, cfg: PrivateLoRAConfig, adapter) -> PrivateAdapter:
    if isinstance(adapter, PrivateAdapter):
        if adapter.fingerprint != backbone.fingerprint:
            from privatelora.model.adapters import AdapterError
            raise AdapterError("adapter was made for another backbone")
        return adapter
    if adapter is None:
        return PrivateAdapter(cfg, backbone.n_layers, backbone.fingerprint)
    return load_adapter(adapter, cfg, backbone.n_layers, backbone.fingerprint)


def device_layers(cfg: PrivateLoRAConfig, n_layers: int) -> list[int]:
    """The decoder layers a device runs itself (head and tail; none in the reference design)."""
    cloud = cfg.cloud_layers(n_layers)
    return [i for i in range(n_layers) if i not in cloud]


def load_device_backbone(model, cfg: PrivateLoRAConfig) -> Backbone:
    """The backbone as a device loads it: from a safetensors checkpoint only the
    embedding, final norm, LM head and its own layers (the cloud's are never read)."""
    from transformers import AutoConfig
    if isinstance(model, (str, Path)) and Path(model).is_dir() and (Path(model) / "config.json").is_file():
        n = AutoConfig.from_pretrained(model, local_files_only=True).num_hidden_layers
        return load_backbone(model, dtype=cfg.torch_dtype, layers=device_layers(cfg, n))
    return load_backbone(model, dtype=cfg.torch_dtype)


def load_cloud_backbone(model, cfg: PrivateLoRAConfig) -> Backbone:
    """The backbone as a cloud process loads it: only the decoder layers the cloud runs
    (``cfg.cloud_layers(n)``); no embedding, final norm, LM head, device head/tail layers
    or tokenizer, not even as meta tensors (``loading.load_cloud_layers``). ``tiny`` and
    checkpoint directories are read layer by layer from their safetensors; the
    fingerprint is the full model's, so adapters and the Open handshake still match.
    An in-memory model object (tests, benchmarks' geometry models) is kept whole and
    unchanged: the caller shares it with an in-process device."""
    return load_cloud_layers(model, cfg.cloud_layers, dtype=cfg.torch_dtype)


def build_device(model="tiny", cfg: PrivateLoRAConfig | None = None, adapter=None) -> DevicePart:
    """One user's device part, loaded the way a device loads it (``load_device_backbone``)."""
    cfg = resolve_config(cfg, adapter)
    backbone = load_device_backbone(model, cfg)
    return DevicePart(backbone, cfg, load_user_adapter(backbone, cfg, adapter))


def build_split(model="tiny", cfg: PrivateLoRAConfig | None = None, adapter=None,
                backbone: Backbone | None = None) -> Split:
    cfg = resolve_config(cfg, adapter)
    backbone = backbone or load_backbone(model, dtype=cfg.torch_dtype)
    user = load_user_adapter(backbone, cfg, adapter)
    return Split(backbone, cfg, user, CloudPart(backbone, cfg), DevicePart(backbone, cfg, user))
