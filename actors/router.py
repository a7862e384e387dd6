"""The router actor: places new sessions on the least loaded replica.

Sessions are sticky by construction: a session lives on the TCP connection to the
replica that holds its KV cache, so the router only decides where a session starts.
"""

from __future__ import annotations


class Router:
    def __init__(self):
        self.replicas: dict[int, dict] = {}
        self.load: dict[int, int] = {}

    def register(self, info: dict) -> None:
        """Add a replica, or replace a restarted one (its sessions died with it: load 0)."""
        old = self.replicas.get(info["replica"])
        self.replicas[info["replica"]] = info
        if old is None or old.get("pid") != info.get("pid"):
            self.load[info["replica"]] = 0

    def unregister(self, replica: int) -> None:
        self.replicas.pop(replica, None)
        self.load.pop(replica, None)

    def route(self) -> dict:
        if not self.replicas:
            raise RuntimeError("no backbone replica is up")
        rid = min(self.load, key=lambda r: (self.load[r], r))
        self.load[rid] += 1
        return self.replicas[rid]

    def release(self, replica: int) -> None:
        if self.load.get(replica, 0) > 0:
            self.load[replica] -= 1

    def snapshot(self) -> dict:
        return {"replicas": sorted(self.replicas), "load": dict(self.load)}
