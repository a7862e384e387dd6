"""Privacy checks by placement and by inspection (no Ray needed to import).

``private_paths(obj)`` walks an object's state (attributes, dicts, lists, tensors) and
returns the paths of every tensor that is tagged private or named with the private
prefix: run against a live cloud part it proves the cloud holds no M, token ids or logits.
``require_edge_node()`` is what an edge actor calls first: it raises ``PlacementError``
unless the Ray node it runs on carries the edge resource.
"""

from __future__ import annotations

from privatelora.placement import EDGE, PlacementError


def walk_tensors(obj, path: str = "obj", _seen=None):
    """Yield (path, tensor) for every torch tensor reachable from ``obj``'s state."""
    import torch
    seen = _seen if _seen is not None else set()
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk_tensors(k, f"{path}.key", seen)
            yield from walk_tensors(v, f"{path}[{k!r}]", seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            yield from walk_tensors(v, f"{path}[{i}]", seen)
    elif isinstance(obj, torch.nn.Module):
        for name, t in list(obj.named_parameters()) + list(obj.named_buffers()):
            yield f"{path}.{name}", t
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__.startswith("privatelora"):
        for k, v in vars(obj).items():
            yield from walk_tensors(v, f"{path}.{k}", seen)


def private_paths(obj, path: str = "obj") -> tuple[list[str], int]:
    """(paths of private tensors, number of tensors walked)."""
    from privatelora.privacy import PRIVATE_PREFIX, is_private
    bad, n = [], 0
    for p, t in walk_tensors(obj, path):
        n += 1
        if is_private(t) or PRIVATE_PREFIX in p:
            bad.append(p)
    return bad, n


def node_resources(node_id: str) -> dict:
    import ray
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("Alive", True):
            return dict(node.get("Resources", {}))
    return {}


def require_edge_node() -> str:
    """Raise ``PlacementError`` unless this Ray worker runs on an edge node; returns the node id."""
    import ray
    node_id = ray.get_runtime_context().get_node_id()
    if EDGE not in node_resources(node_id):
        raise PlacementError(
            f"edge actors hold a user's private weights and tokens and run only on edge nodes "
            f"(nodes with the {EDGE!r} resource); node {node_id[:12]} has none")
    return node_id


def pin_to_cores(cores) -> None:
    """Restrict this whole process to ``cores`` (Linux; ignored elsewhere or when None).

    On one machine that plays both cloud and devices, devices must not steal the
    backbone's CPU: on real deployments they are different machines. Linux applies an
    affinity to one thread, so every thread already running is pinned (a Ray worker has
    its event loop and RPC threads before the actor starts); threads created later
    inherit it from their creator.
    """
    import os
    if not cores or not hasattr(os, "sched_setaffinity"):
        return
    want = {c for c in cores if c in os.sched_getaffinity(0)}
    if not want:
        return
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, want)
        except OSError:         # a thread that ended meanwhile
            pass


ALLOWED_UP_KINDS = ("open", "handoff", "reply", "close", "error", "bundle")   # a bundle: of replies


def audit_frames(frames, *, hidden: int, rank: int, forbidden: tuple[bytes, ...] = (),
                 allowed_kinds=ALLOWED_UP_KINDS, private=(), token_ids=()) -> list[str]:
    """Check raw cloud-bound frames; returns a list of violations (empty: clean).

    Every frame must be of an allowed kind (a bundle's entries too: each is checked as the
    frame it stands for, ``wire/bundle.py``); every tensor record in it a float activation
    (or its int8 quantization) of ``rank`` or ``hidden`` columns; no string beyond the
    protocol's own (geometry target names, error codes); and none of the ``forbidden``
    byte strings (e.g. the prompt's text, M's raw bytes) may appear anywhere in the bytes.

    By value: every tensor record is decoded (any wire dtype, with the codec's own
    ``unpack_tensor``) and no row may equal a nonzero row or column of one of the
    ``private`` matrices (the M's) or carry the ``token_ids`` (tensors of ids, labels) by
    value: the rule of ``privacy.ValueIndex``, the wire encoder's own, with twice the
    tolerance for int8 records (a bf16 M, then quantized), whose rows within a quantization
    step of integers are read as integers (token ids up to ~60 survive int8 exactly).
    """
    import msgpack
    import torch

    from privatelora import wire
    from privatelora.privacy import ValueIndex
    from privatelora.wire.bundle import bundle_records
    from privatelora.wire.schema import UP, FrameContext
    from privatelora.wire.tensors import unpack_tensor
    private, token_ids = list(private), list(token_ids)
    by_value = bool(private or token_ids)
    indexes: dict[bool, ValueIndex] = {}     # int8 record? -> index

    def value_hit(code, x):
        int8 = code == wire.DTYPE_CODES["int8"]
        if int8 not in indexes:
            indexes[int8] = ValueIndex(private, token_ids, slack=2.0 if int8 else 1.0, int8=int8)
        return indexes[int8].hit(x)

    bad = []

    def check_record(n, key, value):
        code, count, rows, cols = value[:4]
        if code not in wire.CODE_DTYPES:
            bad.append(f"frame {n}: {key} has dtype code {code}")
        if cols not in (rank, hidden):
            bad.append(f"frame {n}: {key} is [{rows}, {cols}], neither rank {rank} nor hidden {hidden}")
        if not by_value or code not in wire.CODE_DTYPES:
            return
        try:
            ts = unpack_tensor(FrameContext(UP, None), value, count, cols, max(rows, 1), str(key), None)
        except wire.WireError as e:
            bad.append(f"frame {n}: {key} is not a readable tensor record ({e.code})")
            return
        hit = value_hit(code, torch.stack(ts).numpy().reshape(-1, cols))
        if hit is not None:
            i, j = divmod(hit[0], rows)
            name = f"{key}[{i}]" if count > 1 else str(key)
            bad.append(f"frame {n}: {name} row {j} equals {hit[1]}")

    for n, frame in enumerate(frames):
        frame = bytes(frame)
        for f in forbidden:
            if f and f in frame:
                bad.append(f"frame {n}: carries forbidden bytes {f[:16]!r}...")
        try:
            hdr = wire.peek_header(frame)
            info = wire.frame_info(frame)
        except wire.WireError as e:
            bad.append(f"frame {n}: not a frame ({e.code})")
            continue
        if hdr.kind not in allowed_kinds:
            bad.append(f"frame {n}: kind {hdr.kind!r} is not allowed up")
            continue
        if hdr.kind == "bundle":            # many sessions' replies: each entry's record (wire/bundle.py)
            try:
                entries = bundle_records(frame)
            except wire.WireError as e:
                bad.append(f"frame {n}: not a readable bundle ({e.code})")
                continue
            for i, (_, kcode, rec) in enumerate(entries):
                if wire.KINDS.get(kcode) is None or wire.KINDS[kcode].name not in allowed_kinds:
                    bad.append(f"frame {n}: bundle entry {i} is of kind {kcode}, not allowed up")
                check_record(n, f"entry {i}", rec)
            continue
        body_bytes = frame[wire.PREFIX.size + wire.HEADER.size: len(frame) - wire.TAG_LEN]
        if info.compressed:
            import lz4.block
            size = int.from_bytes(body_bytes[:4], "big")
            body_bytes = lz4.block.decompress(body_bytes[4:], uncompressed_size=size)
        body = msgpack.unpackb(body_bytes, raw=False, strict_map_key=False)
        for key, value in (body.items() if isinstance(body, dict) else []):
            if isinstance(value, list) and len(value) >= 5 and all(isinstance(x, int) for x in value[:4]):
                check_record(n, key, value)
            elif isinstance(value, str) and hdr.kind != "error":
                bad.append(f"frame {n}: {key} carries a string")
    return bad


def tensor_report(obj, path: str = "obj", forbidden: dict | None = None) -> dict:
    """Every tensor reachable from ``obj``'s state (``walk_tensors``): its path, shape,
    dtype and device, and which of the ``forbidden`` tensors (name -> tensor, e.g. a
    checkpoint's embedding) it equals by value. A deployed cloud process's report must name
    no embedding, final norm or LM head, by path, by shape or by value."""
    import torch
    forbidden = forbidden or {}
    tensors = []
    for p, t in walk_tensors(obj, path):
        equal = []
        if t.device.type != "meta":
            for name, f in forbidden.items():
                if tuple(t.shape) == tuple(f.shape) and torch.equal(t.detach().cpu().to(f.dtype), f):
                    equal.append(name)
        tensors.append({"path": p, "shape": list(t.shape), "dtype": str(t.dtype), "device": t.device.type,
                        "bytes": 0 if t.device.type == "meta" else t.numel() * t.element_size(), "equals": equal})
    return {"tensors": tensors, "count": len(tensors), "bytes": sum(t["bytes"] for t in tensors)}
