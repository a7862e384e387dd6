"""The per-user edge actor: one user's device part, pinned to an edge node.

It holds the user's tokenizer, embedding, LM head and private adapter, refuses to start
on a node without the edge resource, and speaks the wire protocol to a backbone replica
over TCP exactly like a device outside Ray. Nothing private ever goes through Ray.
"""

from __future__ import annotations

import tempfile
import time


class EdgeActor:
    def __init__(self, user: int, model: str, cfg: dict, router, *, adapter_path: str | None = None,
                 adapter_seed: int | None = None, adapter_scale: float = 0.3, wire_dtype: str = "fp32",
                 cores: list[int] | None = None):
        from privatelora.placement.checks import pin_to_cores, require_edge_node
        self.node = require_edge_node()           # before any private state exists
        pin_to_cores(cores)
        import torch

        from privatelora.api import build_split
        from privatelora.config import PrivateLoRAConfig
        torch.set_num_threads(1)
        self.user = user
        self.router = router
        self.wire_dtype = wire_dtype
        split = build_split(model, PrivateLoRAConfig(**cfg), adapter_path)
        if adapter_path is None and adapter_seed is not None:
            split.adapter.randomize_(adapter_seed, scale=adapter_scale)
        self.device = split.device
        self.tokenizer = split.backbone.tokenizer
        self._clients: dict[int, object] = {}
        self._ca: dict[int, str] = {}

    async def _client(self, info: dict):
        from privatelora.transport import Client
        rid = info["replica"]
        c = self._clients.get(rid)
        if c is None or c.closed:
            ca = None
            if info.get("cert_pem"):
                f = tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False)
                f.write(info["cert_pem"])
                f.close()
                ca = f.name
            c = await Client.connect(info["host"], info["port"], ca=ca,
                                     server_hostname=info["host"] if ca else None)
            self._clients[rid] = c
        return c

    async def generate(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                       seed: int = 0) -> dict:
        """Generate for this user; ``prompt`` is text or a list of token ids."""
        from privatelora.generation import SamplingParams
        from privatelora.serving import run_remote
        ids = list(prompt) if isinstance(prompt, (list, tuple)) else self.tokenizer.encode(prompt, add_special_tokens=False)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                stop_ids=(eos,) if eos is not None else ())
        info = await self.router.route.remote()
        try:
            client = await self._client(info)
            before = client.stats.as_dict()
            t0 = time.perf_counter()
            gen = await run_remote(client, self.device, ids, params, dtype=self.wire_dtype)
            dt = time.perf_counter() - t0
            after = client.stats.as_dict()
        finally:
            self.router.release.remote(info["replica"])

        def wire(direction, kind="total", field="wire"):
            return after.get(direction, {}).get(kind, {}).get(field, 0) - \
                before.get(direction, {}).get(kind, {}).get(field, 0)
        return {"user": self.user, "replica": info["replica"], "tokens": gen.tokens,
                "text": self.tokenizer.decode(gen.tokens, skip_special_tokens=True) if self.tokenizer else None,
                "finish_reason": gen.finish_reason, "error": gen.error.code if gen.error else None,
                "seconds": dt, "prompt_tokens": len(ids), "cloud_tokens": gen.device.comm.tokens,
                "bytes_to_cloud": wire("up"), "bytes_to_device": wire("down"),
                "activation_bytes": wire("down", "activations") + wire("up", "reply"),
                "activation_frames": wire("down", "activations", "frames"),
                "comm": gen.device.comm.to_dict()}

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
        self._clients.clear()

    def node_id(self) -> str:
        return self.node
