"""The user's private matrices (M) and their files.

Per adapted projection P of layer l:  P(h) = W_P h + B_P M_P A_P h.

- The public A and B: ``model/projections.py``.
- ``PrivateAdapter``: the user's M [r, r] per (layer, target). Every name starts with
  ``PRIVATE_PREFIX``; M starts at zero so an untuned user gets exactly the base model.
- ``save_adapter`` / ``load_adapter``: the private adapter file (safetensors + metadata);
  loading into another backbone or config is refused with the reason.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from privatelora.config import PROJECTIONS, PrivateLoRAConfig, PrivateLoRAError
from privatelora.model.projections import PROJECTION_SCHEME
from privatelora.privacy import PRIVATE_PREFIX, mark_private, register_private_matrix

ADAPTER_FORMAT = "privatelora-adapter"
ADAPTER_VERSION = 1


class AdapterError(PrivateLoRAError):
    pass


def m_name(layer: int, target: str) -> str:
    return f"{PRIVATE_PREFIX}layers.{layer}.{target}.M"


class PrivateAdapter:
    """The user's private M matrices. Lives on the device only."""

    def __init__(self, cfg: PrivateLoRAConfig, n_layers: int, fingerprint: str, device=None):
        self.cfg = cfg
        self.n_layers = n_layers
        self.fingerprint = fingerprint
        self.layers = cfg.adapted(n_layers)       # the placement: layers that carry M
        self.M: dict[str, torch.Tensor] = {}
        # every M is a view of one buffer: views share one version counter, so the value
        # registry (privacy.py) sees any in-place change of any M by reading one counter
        names = [m_name(layer, t) for layer in self.layers for t in cfg.targets]
        self._buffer = mark_private(torch.zeros(len(names), cfg.rank, cfg.rank, dtype=cfg.torch_dtype, device=device))
        for name, m in zip(names, self._buffer.unbind(0)):
            self.M[name] = register_private_matrix(mark_private(m), name)

    def get(self, layer: int, target: str) -> torch.Tensor:
        return self.M[m_name(layer, target)]

    def randomize_(self, seed: int, scale: float = 0.5) -> "PrivateAdapter":
        """Fill M with seeded random values (tests, demos of distinct users)."""
        g = torch.Generator().manual_seed(seed)
        for name in sorted(self.M):
            m = torch.randn(self.cfg.rank, self.cfg.rank, generator=g) * scale / self.cfg.rank ** 0.5
            self.M[name].copy_(m.to(self.M[name].dtype))
        return self

    def named_parameters(self):
        return sorted(self.M.items())

    def parameters(self):
        return [t for _, t in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.M.values())

    def metadata(self) -> dict[str, str]:
        return {"format": ADAPTER_FORMAT, "version": str(ADAPTER_VERSION),
                "fingerprint": self.fingerprint, "rank": str(self.cfg.rank),
                "targets": ",".join(self.cfg.targets), "shared_a": str(self.cfg.shared_a).lower(),
                "seed": str(self.cfg.seed), "n_layers": str(self.n_layers),
                "adapted_layers": ",".join(map(str, self.layers)),
                "projection_scheme": self.cfg.projection_scheme}


def save_adapter(adapter: PrivateAdapter, path) -> None:
    """Write the adapter (the user's only copy of M) atomically, readable by its owner
    alone: a temporary file in the same folder, mode 0600, flushed to disk, then renamed
    over ``path``. A crash mid-write leaves the previous file intact."""
    from safetensors.torch import save
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in adapter.M.items()}
    data = save(tensors, metadata=adapter.metadata())
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_adapter_metadata(path) -> dict[str, str]:
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises several types on bad files
        raise AdapterError(f"{str(path)!r} is not a readable safetensors adapter file: {e}") from e
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{str(path)!r} is not a privatelora adapter (format={meta.get('format')!r})")
    return meta


def _file_layers(meta: dict) -> str:
    """The adapted layers a file records; files written before placements existed adapt all."""
    if "adapted_layers" in meta:
        return meta["adapted_layers"]
    return ",".join(map(str, range(int(meta.get("n_layers", "0"))))) or "all"


def _file_projection(meta: dict) -> str:
    """The projection scheme a file records, by config name; a file without one predates the
    field and was trained against the random A and B."""
    scheme = meta.get("projection_scheme", PROJECTION_SCHEME)
    names = [name for name, version in PROJECTIONS.items() if version == scheme]
    if not names:
        raise AdapterError(f"adapter made with an unknown projection scheme {scheme!r} (this version knows "
                           f"{sorted(PROJECTIONS.values())})")
    return names[0]


def config_from_adapter(path, base: PrivateLoRAConfig | None = None) -> PrivateLoRAConfig:
    """The adapter-relevant config recorded in ``path`` (rank, targets, shared A, seed, the
    projection scheme and the adapted layers); where the split runs (device head/tail layers) and the dtype come from ``base``."""
    meta = read_adapter_metadata(path)
    base = base or PrivateLoRAConfig()
    try:
        return PrivateLoRAConfig(rank=int(meta["rank"]), targets=tuple(meta["targets"].split(",")),
                                 shared_a=meta["shared_a"] == "true", seed=int(meta["seed"]),
                                 adapted_layers=_file_layers(meta), projection=_file_projection(meta),
                                 device_head_layers=base.device_head_layers,
                                 device_tail_layers=base.device_tail_layers, dtype=base.dtype)
    except (KeyError, ValueError) as e:
        raise AdapterError(f"{str(path)!r} has malformed metadata: {e}") from e


def load_adapter(path, cfg: PrivateLoRAConfig, n_layers: int, fingerprint: str, device=None) -> PrivateAdapter:
    """Load M from ``path``, refusing a file made for another backbone or config."""
    from safetensors.torch import load_file
    meta = read_adapter_metadata(path)
    expect = PrivateAdapter(cfg, n_layers, fingerprint).metadata()
    meta = {**meta, "adapted_layers": _file_layers(meta),
            "projection_scheme": meta.get("projection_scheme", PROJECTION_SCHEME)}
    for key in ("version", "projection_scheme", "fingerprint", "n_layers", "rank", "targets", "shared_a", "seed",
                "adapted_layers"):
        if meta.get(key) != expect[key]:
            what = "backbone" if key == "fingerprint" else key
            raise AdapterError(f"adapter {str(path)!r} was made for another {what}: "
                               f"file has {key}={meta.get(key)!r}, this setup has {expect[key]!r}")
    tensors = load_file(str(path))
    adapter = PrivateAdapter(cfg, n_layers, fingerprint, device=device)
    if set(tensors) != set(adapter.M):
        raise AdapterError(f"adapter {str(path)!r} holds tensors {sorted(set(tensors) ^ set(adapter.M))[:3]} "
                           "that do not match its metadata")
    for name, t in tensors.items():
        if tuple(t.shape) != (cfg.rank, cfg.rank) or not torch.isfinite(t).all():
            raise AdapterError(f"adapter {str(path)!r}: tensor {name} is not a finite {cfg.rank}x{cfg.rank} matrix")
        adapter.M[name].copy_(t.to(adapter.M[name].dtype))
    return adapter
