"""Marking of private data, so structural privacy checks are one-liners, and a registry of
private *values*, so the checks also follow copies.

Contract:
- Every private parameter name (the user's M matrices) starts with ``PRIVATE_PREFIX``.
- ``mark_private(t)`` tags a tensor object (M, token ids, logits, labels) as private;
  ``is_private(t)`` reads the tag. The wire codec refuses to encode a tagged tensor into a
  cloud-bound frame. Tags live on the tensor object, so values *derived* from it (e.g. the
  reply ``M @ a``) are untagged: that reply is exactly the low-rank activation the method
  sends by design. A tag does not follow a copy (``M.clone()``, ``M.half()``, ``ids.float()``).
- Values: ``register_private_matrix(M, name)`` and ``register_private_tokens(ids)`` enter a
  tensor in a process-wide registry (weak references: a registration ends with its tensor).
  ``private_match(t)`` says whether an outgoing tensor carries registered values, whatever
  the object: the wire encoder refuses such a cloud-bound tensor, and
  ``placement.checks.audit_frames`` applies the same rule (``ValueIndex``) to recorded frames.

The value rule, per row ``u`` of the outgoing tensor (rows of [n, cols]):

(a) *an M's row or column*: ``u`` has the length r of a registered M and, for one nonzero
    row or column ``m`` of any registered M, ``|u_j - m_j| <= TOL * max|m|`` for every j.
    ``TOL = 1/240`` covers the rounding of a cast to bf16 (<= max|m|/256 per element) or
    fp16, or of int8 with per-row absmax scales (<= max|m|/254), each alone; the audit
    doubles it for int8 records (a bf16 M then quantized). Zero rows never match (M starts
    at zero, and ``M A h`` is then zero). A multiple of M (``2 * M``) is out of scope.
(b) *token ids*: every value of ``u`` is an integer, not all are zero, and every nonzero one
    is among the values of the registered integer tensors (token ids, labels): e.g.
    ``ids.float()``, zero-padded to the rank.

False positives. An honest row ``u = M a`` matches a registered vector m only if all r of
its coordinates land within ``TOL * max|m|`` of m's: for coordinates of density <= rho each,
``P <= (2 * TOL * max|m| * rho) ** r`` per (row, vector) pair. With u and m of one scale
sigma (the worst case; ``max|m|`` ~ 2.5 sigma, rho ~ 0.4 / sigma) a coordinate lands with
p ~ 0.008, so ~4e-9 per pair at r = 4, 2e-17 at r = 8, 3e-34 at r = 16 (the tiny model),
~1e-270 at r = 128 (7B): times the 2 r (rows and columns) per M and the number of M's. Rank
4 is the only worrying case (about 1e-6 per row with a few hundred registered vectors); a
cosine rule would be far looser in low dimension, hence the elementwise tolerance. An M of
rank 1 (one token of one step) makes every honest reply a multiple of its columns and so
raises the odds: a real adapter is not of rank 1. Rule (b) needs every coordinate to be an
exact integer, which float activations never are. A refusal in honest traffic would be a
refused frame (a ``PrivacyError``), never a leak.

Cost: (a) keys every vector by the cells of its first three coordinates (cell width 2 *
the largest tolerance), so a row probes at most 8 cells (a dict on decode-sized frames, a
sorted array otherwise) and compares only the few vectors found there; the index is rebuilt
lazily when registrations or the ``_version`` of a registered tensor (in-place changes,
e.g. an optimizer step) change. The adapter keeps its M's as views of one buffer, and views
share one version counter, so the staleness check reads one counter per adapter. (b) first
looks at whether each row's first value is an integer; the registered token values are
gathered only for a row that passes.

Logits are tagged (``mark_private``) but not registered: they are [n, vocab], a shape no
cloud-bound tensor may have, and they live for one step.
"""

from __future__ import annotations

import itertools
import math
import threading
import weakref
from typing import Any

import numpy as np

PRIVATE_PREFIX = "private."
_TAG = "_privatelora_private"

TOL = 1 / 240           # elementwise tolerance, a fraction of max|m| of the registered vector
_KEY_DIMS = 3           # coordinates keyed into cells (fewer when r < 3)
_SMALL = 8              # rows up to which a frame is probed in Python (decode frames)


def mark_private(t: Any) -> Any:
    """Tag ``t`` (a tensor or ndarray) as private and return it."""
    try:
        setattr(t, _TAG, True)
    except AttributeError:  # numpy arrays take no attributes: wrap via a view subclass
        raise TypeError(f"cannot mark {type(t).__name__} as private; use a torch tensor")
    return t


def is_private(t: Any) -> bool:
    return bool(getattr(t, _TAG, False))


def private_names(names) -> list[str]:
    """The names among ``names`` that carry the private prefix."""
    return [n for n in names if n.startswith(PRIVATE_PREFIX) or f".{PRIVATE_PREFIX}" in n]


# ---------------------------------------------------------------- value matching
def _rows(x: Any) -> np.ndarray:
    """Any tensor/array -> float32 numpy [N, cols] (a 1-D input is one row)."""
    if not isinstance(x, np.ndarray):
        import torch
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float32).numpy()
        else:
            x = np.asarray(x)
    x = np.asarray(x, dtype=np.float32)
    return x.reshape(1, -1) if x.ndim < 2 else x.reshape(-1, x.shape[-1])


class _Group:
    """The nonzero rows and columns of length r of the private matrices, keyed by cells.

    A coordinate's cell is ``floor(v / w)`` with w a little over 2 T (T: the group's largest
    tolerance). A row u can only match vectors whose cells, on each of the first d <= 3
    coordinates, are ``lo = floor((u - T) / w)`` or ``lo + 1``: each vector is filed under
    the 2^d cells ``c - {0, 1}^d``, so a row needs one probe, at its ``lo`` cell.
    """

    def __init__(self, parts, slack: float):
        # parts: [(vectors [k, r], label, kind, index in the matrix [k])]
        self.vecs = np.ascontiguousarray(np.concatenate([p[0] for p in parts]), dtype=np.float32)
        self.labels = [(p[1], p[2]) for p in parts]
        self.owner = np.concatenate([np.full(len(p[0]), i) for i, p in enumerate(parts)])
        self.index = np.concatenate([p[3] for p in parts])
        K, r = self.vecs.shape
        tol = np.abs(self.vecs).max(axis=1).astype(np.float64) * (TOL * slack)
        self.tol = (tol * (1 + 1e-6)).astype(np.float32)[:, None]   # float32 rounding of u - m
        # the band [u - T, u + T] in cell units is [a - half, a + half], shorter than 1 cell
        self.half = 0.4999
        self.inv_w = self.half / (float(tol.max()) * (1 + 1e-4))
        self.d = d = min(_KEY_DIMS, r)
        cells = np.floor(self.vecs[:, :d].astype(np.float64) * self.inv_w)   # |cell| <= ~121
        self.C = C = int(np.abs(cells).max()) + 2
        self.P = P = 2 * C + 1                       # balanced base P: one key per cell in [-C, C]^d
        self.pw = np.array([float(P) ** (d - 1 - i) for i in range(d)])
        bits = np.array(list(itertools.product((0, 1), repeat=d)), dtype=np.float64)   # [2^d, d]
        near = ((cells @ self.pw)[:, None] - (bits @ self.pw)[None, :]).ravel()        # [K * 2^d]
        order = np.argsort(near, kind="stable")
        self.keys = near[order]
        self.vec_of = np.repeat(np.arange(K), len(bits))[order]
        uk, start, count = np.unique(self.keys, return_index=True, return_counts=True)
        self.near = dict(zip(uk.tolist(), zip(start.tolist(), (start + count).tolist())))

    def describe(self, k: int) -> str:
        label, kind = self.labels[self.owner[k]]
        what = "row" if kind == 0 else "column"
        return f"{what} {int(self.index[k])} of a private M" + (f" ({label})" if label else "")

    def first(self, u: np.ndarray, s: int, e: int) -> int | None:
        """The first of the vectors filed at keys[s:e] that ``u`` equals, or None."""
        idx = self.vec_of[s:e]
        hit = np.flatnonzero((np.abs(self.vecs[idx] - u) <= self.tol[idx]).all(axis=1))
        return int(idx[hit[0]]) if hit.size else None

    def key(self, row) -> float | None:
        """The probe key of a row's first d values (a list), None when far from every cell."""
        k, iw, h, P, C = 0.0, self.inv_w, self.half, float(self.P), self.C
        for v in row:
            a = v * iw - h
            if not -C <= a < C:                      # outside every vector's cells (or NaN)
                return None
            k = k * P + math.floor(a)
        return k

    def match_many(self, U: np.ndarray) -> tuple[int, int] | None:
        """(row of U, vector) of the first row that equals a vector, or None (vectorized)."""
        a = np.multiply(U[:, :self.d], self.inv_w, dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            lo = np.floor(a - self.half)
            probes = lo @ self.pw
            probes[~(np.abs(lo) <= self.C).all(axis=1)] = np.nan   # outside every cell: no probe
        left = np.searchsorted(self.keys, probes, "left")
        right = np.searchsorted(self.keys, probes, "right")
        rows = np.flatnonzero(right > left)
        if not rows.size:
            return None
        n = right[rows] - left[rows]                 # every candidate (row, vector) at once
        pos = np.repeat(left[rows] - np.cumsum(n) + n, n) + np.arange(int(n.sum()))
        vi, ri = self.vec_of[pos], np.repeat(rows, n)
        ok = np.flatnonzero((np.abs(self.vecs[vi] - U[ri]) <= self.tol[vi]).all(axis=1))
        return (int(ri[ok[0]]), int(vi[ok[0]])) if ok.size else None


def _token_rows(U: np.ndarray) -> np.ndarray:
    """Rows whose values are all integers and not all zero (first-column pre-filter)."""
    c0 = U[:, 0]
    cand = np.flatnonzero(c0 == np.floor(c0))
    if not cand.size:
        return cand
    R = U[cand]
    ok = (R == np.floor(R)).all(axis=1) & (R != 0).any(axis=1)
    return cand[ok]


def _token_match(U: np.ndarray, rows: np.ndarray, values: np.ndarray) -> int | None:
    if not rows.size or not values.size:
        return None
    R = U[rows].astype(np.float64)
    inside = (np.isin(R, values) | (R == 0)).all(axis=1)          # zeros: padding
    return int(rows[np.flatnonzero(inside)[0]]) if inside.any() else None


def _matrix_parts(matrices):
    """[(label, matrix)] -> {r: [(nonzero vectors, label, kind, their indices)]}."""
    by_len: dict[int, list] = {}
    for label, m in matrices:
        m = _rows(m) if getattr(m, "ndim", 2) == 2 else None
        if m is None or not m.size:
            continue
        for kind, vs in ((0, m), (1, m.T)):
            nz = np.flatnonzero(np.abs(vs).max(axis=1) > 0)   # zero vectors never match
            if nz.size:
                by_len.setdefault(vs.shape[1], []).append((vs[nz], label, kind, nz))
    return by_len


def _tokens_array(tokens) -> np.ndarray:
    arrays = []
    for t in tokens:
        if not isinstance(t, np.ndarray):
            import torch
            t = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        arrays.append(np.asarray(t).astype(np.float64).ravel())
    return np.unique(np.concatenate(arrays)) if arrays else np.zeros(0)


def _first_hit(U, groups, tokens) -> tuple[int, str] | None:
    """(row, what it equals) of the first row of ``U`` that carries private values;
    ``tokens``: the private integer values, or a callable giving them (asked only when a row
    is all integers)."""
    g = groups.get(U.shape[1])
    if U.shape[0] <= _SMALL:                         # decode frames: Python, one probe a row
        heads = U[:, :g.d if g is not None else 1].tolist()
        for i, row in enumerate(heads):
            if g is not None:
                k = g.key(row)
                se = g.near.get(k) if k is not None else None
                if se is not None:
                    j = g.first(U[i], *se)
                    if j is not None:
                        return i, g.describe(j)
            if row[0].is_integer():                  # rule (b)'s pre-filter
                rows = _token_rows(U[i:i + 1])
                if rows.size and _token_match(U, rows + i, tokens() if callable(tokens) else tokens) is not None:
                    return i, "private token ids (by value)"
        return None
    if g is not None:
        hit = g.match_many(U)
        if hit is not None:
            return hit[0], g.describe(hit[1])
    rows = _token_rows(U)
    if rows.size:
        i = _token_match(U, rows, tokens() if callable(tokens) else tokens)
        if i is not None:
            return i, "private token ids (by value)"
    return None


def _say(hit) -> str | None:
    return None if hit is None else f"row {hit[0]} equals {hit[1]}"


class ValueIndex:
    """The value rule over explicit private tensors (audits): ``matrices`` are M's (any
    iterable of tensors, or of (label, tensor)), ``tokens`` integer tensors (ids, labels).
    ``slack`` multiplies the tolerance (2 for int8 records: a bf16 M, then quantized)."""

    def __init__(self, matrices=(), tokens=(), slack: float = 1.0, int8: bool = False):
        mats = [m if isinstance(m, tuple) else ("", m) for m in matrices]
        self.groups = {r: _Group(p, slack) for r, p in _matrix_parts(mats).items()}
        self.tokens = _tokens_array(tokens)
        self.int8 = int8

    def hit(self, t) -> tuple[int, str] | None:
        """(row, what it equals) of the first row of ``t`` carrying private values, or None.
        ``int8``: ``t`` was quantized with per-row absmax scales, so a row whose values all
        lie within the quantization step (<= max|row| / 254, and < 0.25) of integers is
        read as those integers (ids up to ~60 survive int8 exactly; larger ones do not)."""
        U = _rows(t)
        if not U.size:
            return None
        if not self.int8:
            return _first_hit(U, self.groups, self.tokens)
        hit = _first_hit(U, self.groups, np.zeros(0))
        if hit is None and self.tokens.size:
            R = np.rint(U)
            step = np.minimum(np.abs(U).max(axis=1, keepdims=True) / 254 * 1.001, 0.25)
            near = (np.abs(U - R) <= step).all(axis=1)
            if near.any():
                hit = _first_hit(np.where(near[:, None], R, U).astype(np.float32), {}, self.tokens)
        return hit

    def match(self, t) -> str | None:
        return _say(self.hit(t))


# ---------------------------------------------------------------- the registry
class _Registry:
    def __init__(self):
        self.lock = threading.Lock()
        self.mats: dict[int, tuple] = {}      # key -> (weakref to M, label)
        self.toks: dict[int, Any] = {}        # key -> weakref to an integer tensor
        self.gen = 0                          # bumped on every (un)registration of an M
        self.next = 0
        # (gen, weakrefs to the version-counter owners, their versions, {r: _Group})
        self.cache: tuple = (-1, (), (), {})


_REG = _Registry()


def _forget(table: dict, key: int, bump: bool):
    def cb(_ref):                             # runs at the tensor's death, lock-free
        table.pop(key, None)
        if bump:
            _REG.gen += 1
            _REG.cache = (-1, (), (), {})     # drop the copies of its values now
    return cb


def _version(t) -> int:
    try:
        return t._version
    except RuntimeError:                      # inference tensors keep no version counter
        return 0


def register_private_matrix(t, name: str = ""):
    """Register a private float matrix (an M) by value and return it. In-place changes are
    seen through ``t._version``; a tensor that replaces it must be registered too."""
    import torch
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
        raise TypeError("register_private_matrix takes a 2-D float tensor")
    with _REG.lock:
        key, _REG.next = _REG.next, _REG.next + 1
        _REG.mats[key] = (weakref.ref(t, _forget(_REG.mats, key, True)), name)
        _REG.gen += 1
    return t


def register_private_tokens(t):
    """Register a private integer tensor (token ids, labels) by value and return it."""
    import torch
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex():
        raise TypeError("register_private_tokens takes an integer tensor")
    with _REG.lock:
        key, _REG.next = _REG.next, _REG.next + 1
        _REG.toks[key] = weakref.ref(t, _forget(_REG.toks, key, False))
    return t


def _rebuild() -> dict:
    with _REG.lock:
        gen = _REG.gen
        live = [(r(), name) for r, name in list(_REG.mats.values())]
    live = [(t, name) for t, name in live if t is not None]
    owners: dict[int, Any] = {}
    for t, _ in live:                         # views share their base's version counter
        b = t._base if t._base is not None else t
        owners.setdefault(id(b), b)
    refs = tuple(weakref.ref(b) for b in owners.values())
    versions = tuple(_version(b) for b in owners.values())   # read before the values
    groups = {r: _Group(p, 1.0) for r, p in _matrix_parts([(n, t) for t, n in live]).items()}
    _REG.cache = (gen, refs, versions, groups)
    return groups


def _groups() -> dict:
    gen, refs, versions, groups = _REG.cache
    if gen == _REG.gen:
        for r, v in zip(refs, versions):
            b = r()
            if b is None or _version(b) != v:
                break
        else:
            return groups
    return _rebuild()


def _registered_tokens() -> np.ndarray:
    with _REG.lock:
        live = [r() for r in list(_REG.toks.values())]
    return _tokens_array([t for t in live if t is not None])


def private_hit(U: np.ndarray) -> tuple[int, str] | None:
    """(row, what it equals) of the first row of float32 rows ``U`` [N, cols] carrying
    registered private values, or None (the encoder's hot path)."""
    if not _REG.mats and not _REG.toks:
        return None
    return _first_hit(U, _groups() if _REG.mats else {}, _registered_tokens)


def private_match(t) -> str | None:
    """Whether ``t`` (a tensor or array; its rows are its last dimension) carries registered
    private values: a description of the first match (``"row 0 equals column 3 of a private
    M (private.layers.1.q.M)"``), or None."""
    U = _rows(t)
    return _say(private_hit(U)) if U.size else None


def registered() -> dict[str, int]:
    """How many tensors are registered (tests, diagnostics)."""
    return {"matrices": len(_REG.mats), "tokens": len(_REG.toks)}
