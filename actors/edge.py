"""Edge actors: users' device parts, pinned to an edge node.

``EdgeActor`` is one user: tokenizer, embedding, LM head and private adapter. It refuses
to start on a node without the edge resource, and speaks the wire protocol to a backbone
replica over TCP exactly like a device outside Ray. Nothing private ever goes through Ray.

``EdgeHost`` carries several users in one process (an edge server of an organisation,
or a benchmark simulating many devices on few cores): one copy of the public weights,
one private adapter and one session per user, all sessions multiplexed on one
connection per replica. Each user's data stays in its own session state.
"""

from __future__ import annotations

import time

from privatelora.serving.remote import Connector


class RouterConnector(Connector):
    """Sessions where the router places them (``actors.router``), on one connection per
    replica; a retry avoids the replicas this generation already lost sessions on."""

    def __init__(self, router, link: str = "loopback", seed: int | None = None):
        super().__init__(link=link, seed=seed)
        self.router = router
        self._replica: dict[tuple, int] = {}       # (host, port) -> replica id

    async def open(self, geometry, avoid=frozenset()):
        info = await self.router.route.remote(list(avoid))
        self.last_place = info["replica"]
        self._replica[(info["host"], info["port"])] = info["replica"]
        c = await self._connect_pinned(info["host"], info["port"], info.get("cert_pem") or "")
        return await c.open(geometry)

    def where(self, session):
        return self._replica.get(super().where(session))


class EdgeActor:
    def __init__(self, user: int, model: str, cfg: dict, router, *, adapter_path: str | None = None,
                 adapter_seed: int | None = None, adapter_scale: float = 0.3, wire_dtype: str = "fp32",
                 cores: list[int] | None = None):
        from privatelora.placement.checks import pin_to_cores, require_edge_node
        self.node = require_edge_node()           # before any private state exists
        import torch

        from privatelora.api import build_device
        from privatelora.config import PrivateLoRAConfig
        torch.set_num_threads(1)
        self.user = user
        self.router = router
        self.wire_dtype = wire_dtype
        # a device reads only its own tensors (embedding, norm, LM head) from the checkpoint
        self.device = build_device(model, PrivateLoRAConfig(**cfg), adapter_path)
        if adapter_path is None and adapter_seed is not None:
            self.device.adapter.randomize_(adapter_seed, scale=adapter_scale)
        self.tokenizer = self.device.tokenizer
        pin_to_cores(cores)                       # after loading, which may use every core
        self._connectors: dict[str, object] = {}
        self._drafts: dict[str, object] = {}

    def _draft(self, spec: str | None):
        if not spec:
            return None
        if spec not in self._drafts:
            from privatelora.runtime.draft import load_draft
            self._drafts[spec] = load_draft(spec)
        return self._drafts[spec]

    def _batch(self):
        """This process's ``DeviceBatch``: its sessions' activations answered together."""
        if getattr(self, "_device_batch", None) is None:
            from privatelora.serving.remote import DeviceBatch
            self._device_batch = DeviceBatch()
        return self._device_batch

    def _connector(self, link: str = "loopback"):
        conn = self._connectors.get(link)
        if conn is None:
            conn = self._connectors[link] = RouterConnector(self.router, link=link, seed=self.user)
        return conn

    async def generate(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                       seed: int = 0, draft: str | None = None, draft_tokens: int = 4,
                       resume_attempts: int = 8, link: str = "loopback") -> dict:
        """Generate for this user; ``prompt`` is text or a list of token ids; ``draft``: speculative
        decoding drafted here, on the device (ngram, tiny or a local checkpoint path). A session
        the cloud loses is resumed on a healthy replica (up to ``resume_attempts`` times).
        ``link``: emulate a network between this device and the cloud (``transport/link.py``)."""
        from privatelora.model.sampling import SamplingParams
        from privatelora.runtime.prompts import encode_prompt
        from privatelora.serving.remote import Resume, run_remote
        ids = list(prompt) if isinstance(prompt, (list, tuple)) else encode_prompt(self.tokenizer, prompt)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                stop_ids=(eos,) if eos is not None else ())
        conn = self._connector(link)
        before = conn.stats().as_dict()
        t0 = time.perf_counter()
        gen = await run_remote(conn, self.device, ids, params, dtype=self.wire_dtype, draft=self._draft(draft),
                               draft_tokens=draft_tokens, resume=Resume(attempts=resume_attempts),
                               batch=self._batch())
        dt = time.perf_counter() - t0
        after = conn.stats().as_dict()
        if gen.recoveries:
            await self.router.note_recovery.remote(list(gen.recoveries))

        def wire(direction, kind="total", field="wire"):
            return after.get(direction, {}).get(kind, {}).get(field, 0) - \
                before.get(direction, {}).get(kind, {}).get(field, 0)
        return {"user": self.user, "replica": conn.last_place, "tokens": gen.tokens,
                "text": self.tokenizer.decode(gen.tokens, skip_special_tokens=True) if self.tokenizer else None,
                "finish_reason": gen.finish_reason, "error": gen.error.code if gen.error else None,
                "seconds": dt, "prompt_tokens": len(ids), "cloud_tokens": gen.device.comm.tokens,
                "bytes_to_cloud": wire("up"), "bytes_to_device": wire("down"),
                "activation_bytes": wire("down", "activations") + wire("up", "reply"),
                "activation_frames": wire("down", "activations", "frames"),
                "comm": gen.device.comm.to_dict(), **gen.stats()}

    async def bench_decode(self, prompt: list[int], new_tokens: int, start_at: float, link: str = "loopback") -> dict:
        """One timed generation for ``bench throughput``: starts at wall-clock ``start_at``
        (so that all users start together) and reports when each token's final hidden
        state reached this device. Greedy, no stop token: exactly ``new_tokens`` tokens."""
        return (await self._bench([(self.user, self.device, prompt)], new_tokens, start_at, link))[0]

    async def _bench(self, jobs, new_tokens: int, start_at: float, link: str) -> list[dict]:
        import asyncio

        from privatelora import wire
        from privatelora.model.sampling import SamplingParams
        from privatelora.serving.remote import Resume, run_remote
        conn = self._connector(link)
        await asyncio.sleep(max(0.0, start_at - time.time()))

        async def one(user, device, prompt):
            times = []
            started = time.time()
            gen = await run_remote(conn, device, prompt, SamplingParams(max_new_tokens=new_tokens),
                                   dtype=self.wire_dtype, timeout=120.0, resume=Resume(),
                                   observe=lambda m: times.append(time.time()) if isinstance(m, wire.Handoff)
                                   else None, batch=self._batch())
            return {"user": user, "started": started, "token_times": times, "tokens": len(gen.tokens),
                    "ids": gen.tokens, "error": gen.error.code if gen.error else None}
        return list(await asyncio.gather(*(one(*job) for job in jobs)))

    async def close(self) -> None:
        for c in self._connectors.values():
            await c.close()
        self._connectors.clear()

    def node_id(self) -> str:
        return self.node


class EdgeHost(EdgeActor):
    """Several users' device parts in one edge process (see the module docstring)."""

    def __init__(self, users: list[int], model: str, cfg: dict, router, *, adapter_seeds: list[int] | None = None,
                 adapter_scale: float = 0.3, wire_dtype: str = "fp32", cores: list[int] | None = None):
        from privatelora.placement.checks import pin_to_cores, require_edge_node
        self.node = require_edge_node()           # before any private state exists
        import torch

        from privatelora.model.adapters import PrivateAdapter
        from privatelora.config import PrivateLoRAConfig
        from privatelora.runtime.device import DevicePart
        from privatelora.api import load_device_backbone
        torch.set_num_threads(1)
        if not users or len(set(users)) != len(users):
            raise ValueError("an edge host needs distinct user ids")
        if adapter_seeds is not None and len(adapter_seeds) != len(users):
            raise ValueError("give one adapter seed per user")
        c = PrivateLoRAConfig(**cfg)
        backbone = load_device_backbone(model, c)
        self.user, self.router, self.wire_dtype = users[0], router, wire_dtype
        self.devices = {}
        for i, u in enumerate(users):              # public weights shared, one private M per user
            adapter = PrivateAdapter(c, backbone.n_layers, backbone.fingerprint)
            if adapter_seeds is not None:
                adapter.randomize_(adapter_seeds[i], scale=adapter_scale)
            self.devices[u] = DevicePart(backbone, c, adapter)
        self.device = self.devices[users[0]]
        self.tokenizer = backbone.tokenizer
        del backbone
        pin_to_cores(cores)
        self._connectors: dict[str, object] = {}

    async def generate(self, *args, **kwargs) -> dict:
        raise TypeError("an edge host serves several users: use bench_decode_many, or an EdgeActor per user")

    async def bench_decode_many(self, prompts: dict, new_tokens: int, start_at: float,
                                link: str = "loopback") -> list[dict]:
        """``bench_decode`` for several of this host's users at once, on one connection
        (over an emulated link, the host's users share that one link)."""
        return await self._bench([(u, self.devices[u], p) for u, p in prompts.items()], new_tokens, start_at, link)
