"""The analytic decode-throughput model: the paper's, and ours with latency and batching.

The paper (Wang et al. 2023, arXiv 2311.14030) estimates one device's decode rate as

    1/TPS = 1/TPS_cloud + V*d*2 / (BW_phone * b) + d*16/UP + L*3r*16/UP

cloud decoder time (A100, HF transformers, batch 1) + LM-head weight read on the phone +
embedding upload + the q,k,v uplink payload, fp16, no latency term. With its published
assumptions this gives 26.7 / 20.4 / 12.9 tokens/s for 7B / 13B / 30B at r = 128 (the
paper's table: 27.1 / 20.5 / 12.9).

Ours keeps those terms and adds what the published model leaves out:
- the downlink payload (A h down, the last hidden state down) at the downlink rate;
- the bytes actually framed on our wire (``frame_bytes``), not the bare numbers;
- round-trip latency: a decode token needs L + 1 sequential round trips (one per cloud
  layer, one for the hand-offs), so a single stream is capped at ~1 / ((L+1) * RTT);
- batching: B interleaved users share the backbone; the aggregate rate is the smaller of
  B single-stream rates and the backbone's batched rate B / (t1 + (B-1) * t_marginal).

Two exact levers cut a single stream's round trips (``speculative_s_per_token``):
- adapter placement: only A of the L layers carry the adapter (last:1, last:2, every:4, ...);
  the others run back to back in the cloud, so a token costs A + 1 round trips and the
  per-layer activation / reply frames are paid for A layers only;
- speculative decoding drafted on the device: K drafted tokens plus the last token go through
  ONE chain of A + 1 round trips as K + 1 rows; with per-token acceptance alpha the chain
  yields E = (1 - alpha^(K+1)) / (1 - alpha) tokens (K + 1 at alpha = 1).

Device-only: a phone decoding a 4-bit model is memory bound. Its effective bandwidth is
the one calibrated number here, fitted to ONE figure: the paper's measured 8.1 tokens/s for
4-bit Llama-2-7B implies 64% of the iPhone's 42.7 GB/s peak. The 7B device-only rate
therefore equals 8.1 by construction; the same efficiency then *predicts* the 13B and 30B
device-only rates (the paper's 4.2 and 1.7), which is what the tests check.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PHONE_BW = 42.7e9          # bytes/s, iPhone 13 Pro Max
UP_5G, DOWN_5G = 60e6, 100e6
VOCAB = 32000


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    layers: int
    params: float            # total parameters
    cloud_tps: float         # A100 decoder tokens/s at batch 1 (the paper's measurement)


MODELS = {
    "7b": ModelSpec("Llama-2-7B", 4096, 32, 6.74e9, 37.2),
    "13b": ModelSpec("Llama-2-13B", 5120, 40, 13.0e9, 27.8),
    "30b": ModelSpec("LLaMA-30B", 6656, 60, 32.5e9, 16.7),
}
PAPER_TPS = {"7b": 27.1, "13b": 20.5, "30b": 12.9}
# the paper's device-only 4-bit decode rates on a flagship phone, tokens/s
PAPER_DEVICE_ONLY = {"7b": 8.1, "13b": 4.2, "30b": 1.7}
CALIBRATED_ON = "7b"
PAPER_DEVICE_ONLY_7B = PAPER_DEVICE_ONLY[CALIBRATED_ON]
# the one calibrated constant: fitted to the 7B figure alone (see module docstring)
DEVICE_BW_EFFICIENCY = PAPER_DEVICE_ONLY[CALIBRATED_ON] * MODELS[CALIBRATED_ON].params * 0.5 / PHONE_BW


def paper_tps(model: str, rank: int = 128, up_bps: float = UP_5G, batch: int = 1) -> float:
    """The paper's published formula, as it stands."""
    m = MODELS[model]
    t = 1 / m.cloud_tps + VOCAB * m.hidden * 2 / (PHONE_BW * batch) + m.hidden * 16 / up_bps \
        + m.layers * 3 * rank * 16 / up_bps
    return 1 / t


def device_only_tps(model: str, bits: int = 4) -> float:
    m = MODELS[model]
    return DEVICE_BW_EFFICIENCY * PHONE_BW / (m.params * bits / 8)


@dataclass(frozen=True)
class Link:
    up_bps: float = UP_5G
    down_bps: float = DOWN_5G
    rtt_s: float = 0.0


def frame_bytes(hidden: int, rank: int, shared_a: bool, dtype: str, rows: int = 1) -> dict[str, int]:
    """Bytes on our wire for one decode step of ``rows`` rows (1: a plain decode token; K + 1:
    a speculative chain): per layer both ways, and one hand-off. The frames are really
    encoded with ``rows`` rows, so per-frame overhead (length prefix, header, MAC tag, field
    names, record shape) is counted once per frame and only the payload (and, for int8, the
    per-row scales) grows with the rows.

    The tensors are activation-like noise (fixed seed), not constants: the encoder keeps lz4
    only where it saves 10%, which constant tensors always do (a 4096-wide hand-off of ones
    frames to ~100 bytes) and real activations do not."""
    import torch

    from privatelora import wire
    from privatelora.wire import HANDOFF_DTYPE
    g = wire.Geometry(hidden=hidden, rank=rank, targets=("q", "k", "v"), shared_a=shared_a, layers=(0,), dtype=dtype)
    k = bytes(32)
    gen = torch.Generator().manual_seed(0)

    def noise(cols):
        return torch.randn(rows, cols, generator=gen)
    a = wire.encode(wire.Activations(1, 0, tuple(noise(rank) for _ in range(g.n_activations))),
                    key=k, direction="down", geometry=g)
    m = wire.encode(wire.Reply(1, 0, tuple(noise(rank) for _ in range(3))), key=k, direction="up", geometry=g)
    h = wire.encode(wire.Handoff(1, 0, noise(hidden), want_all=rows > 1), key=k, direction="up",
                    geometry=g, dtype=HANDOFF_DTYPE[dtype])
    return {"down_per_layer": len(a), "up_per_layer": len(m), "handoff": len(h)}


def ours_single_s(model: str, rank: int, shared_a: bool, dtype: str, link: Link) -> float:
    """Seconds per token for one device over ``link`` (our wire, latency included)."""
    m = MODELS[model]
    f = frame_bytes(m.hidden, rank, shared_a, dtype)
    comm = (m.layers * f["up_per_layer"] + f["handoff"]) * 8 / link.up_bps \
        + (m.layers * f["down_per_layer"] + f["handoff"]) * 8 / link.down_bps
    return 1 / m.cloud_tps + VOCAB * m.hidden * 2 / PHONE_BW + comm + (m.layers + 1) * link.rtt_s


# Default draft model for speculation: about 1/50 of the target's parameters (e.g. a ~135M
# draft for Llama-2-7B), 4-bit weights on the phone, memory bound at the same effective
# bandwidth (DEVICE_BW_EFFICIENCY * PHONE_BW) the device-only rate is calibrated on. One
# drafted token = one draft forward = one read of its weights; K drafts = K forwards.
DRAFT_PARAM_FRACTION = 1 / 50
DRAFT_BITS = 4
# an A100's dense fp16 FLOP/s: the marginal cost of one more row in a memory-bound decode step
A100_FLOPS = 312e12


def default_draft_s_per_token(model: str) -> float:
    """Seconds the phone spends drafting one token with the default draft (see above)."""
    m = MODELS[model]
    return m.params * DRAFT_PARAM_FRACTION * DRAFT_BITS / 8 / (DEVICE_BW_EFFICIENCY * PHONE_BW)


def expected_tokens_per_chain(draft_tokens: int, accept_rate: float) -> float:
    """E = (1 - alpha^(K+1)) / (1 - alpha): the accepted prefix of K drafts plus the
    target's own next token (K + 1 at alpha = 1; 1 at alpha = 0 or K = 0)."""
    if accept_rate >= 1.0:
        return float(draft_tokens + 1)
    return (1 - accept_rate ** (draft_tokens + 1)) / (1 - accept_rate)


def chain_s(model: str, rank: int, shared_a: bool, dtype: str, link: Link, adapted_layers: int | None = None,
            draft_tokens: int = 0, draft_s_per_token: float | None = None) -> float:
    """Seconds for one decode chain of K + 1 rows through A adapted layers (A + 1 round trips).

    cloud:  1/TPS_cloud + K * 2 * params / 312e12 (all L layers still run in the cloud; extra
            rows in a memory-bound step cost only their FLOPs, the marginal ours_aggregate_tps uses)
    phone:  VOCAB * d * 2 / BW_phone (LM-head weights read once for all K + 1 rows)
            + K * draft_s_per_token
    wire:   (A * up_per_layer + handoff) * 8 / UP + (A * down_per_layer + handoff) * 8 / DOWN,
            frames of K + 1 rows (``frame_bytes(rows=K+1)``)
    RTT:    (A + 1) * rtt
    """
    m = MODELS[model]
    a = m.layers if adapted_layers is None else adapted_layers
    k = draft_tokens
    if type(a) is not int or not 1 <= a <= m.layers:
        raise ValueError(f"adapted_layers must be an integer in 1..{m.layers} for {m.name}, not {adapted_layers!r}")
    if type(k) is not int or k < 0:
        raise ValueError(f"draft_tokens must be a non-negative integer, not {draft_tokens!r}")
    if draft_s_per_token is None:
        draft_s_per_token = default_draft_s_per_token(model)
    if not draft_s_per_token >= 0:
        raise ValueError(f"draft_s_per_token must be >= 0, not {draft_s_per_token!r}")
    f = frame_bytes(m.hidden, rank, shared_a, dtype, rows=k + 1)
    comm = (a * f["up_per_layer"] + f["handoff"]) * 8 / link.up_bps \
        + (a * f["down_per_layer"] + f["handoff"]) * 8 / link.down_bps
    cloud = 1 / m.cloud_tps + k * 2 * m.params / A100_FLOPS
    phone = VOCAB * m.hidden * 2 / PHONE_BW + k * draft_s_per_token
    return cloud + phone + comm + (a + 1) * link.rtt_s


def speculative_s_per_token(model: str, rank: int, shared_a: bool, dtype: str, link: Link,
                            adapted_layers: int | None = None, draft_tokens: int = 0, accept_rate: float = 0.0,
                            draft_s_per_token: float | None = None) -> float:
    """Seconds per generated token for one device with A adapted layers (None: all L) and
    K drafted tokens accepted each with probability ``accept_rate``: chain_s / E.
    With A = L and K = 0 this is ``ours_single_s``."""
    if not 0.0 <= accept_rate <= 1.0:
        raise ValueError(f"accept_rate must be in [0, 1], not {accept_rate!r}")
    t = chain_s(model, rank, shared_a, dtype, link, adapted_layers, draft_tokens, draft_s_per_token)
    return t / expected_tokens_per_chain(draft_tokens, accept_rate)


def ours_aggregate_tps(model: str, users: int, rank: int, shared_a: bool, dtype: str, link: Link,
                       marginal_s: float | None = None) -> float:
    """Aggregate tokens/s of ``users`` interleaved devices on one backbone.

    The backbone's batched step costs t1 + (B-1) * marginal; by default the marginal cost
    of a token is its FLOPs at an A100's 312 TFLOP/s (decode at small batch is memory bound,
    so extra sequences are nearly free until compute binds).
    """
    m = MODELS[model]
    t1 = 1 / m.cloud_tps
    marginal = marginal_s if marginal_s is not None else 2 * m.params / 312e12
    single = 1 / ours_single_s(model, rank, shared_a, dtype, link)
    backbone = users / (t1 + (users - 1) * marginal)
    return min(users * single, backbone)


# the wire of the placement / speculation rows: the paper's setup (r = 128, separate A, fp16)
LATENCY_WIRE = (128, False, "fp16")
LATENCY_PLACEMENTS = ((None, "all"), (1, "last:1"), (2, "last:2"))
LATENCY_DRAFTS = ((0, 0.0), (4, 0.5), (4, 0.6), (4, 0.8))


def latency_rows(rtts=(0.020,), draft_tokens: int | None = None, accept_rate: float | None = None,
                 requested_layers: int = 2) -> list[dict]:
    """One user's tokens/s for each model, rtt, placement (all, last:1, last:2) and draft
    (none; K = 4 at alpha 0.5 / 0.6 / 0.8). ``draft_tokens`` / ``accept_rate`` add one more row
    per model and rtt at ``requested_layers`` adapted layers (marked ``requested``; a grid row
    with the same values is marked instead of duplicated)."""
    rank, shared_a, dtype = LATENCY_WIRE
    out = []
    for name, m in MODELS.items():
        for rtt in sorted(set(rtts) | {0.020}):
            link = Link(rtt_s=rtt)
            grid = [(a, label, k, p) for a, label in LATENCY_PLACEMENTS for k, p in LATENCY_DRAFTS]
            want = None
            if draft_tokens is not None or accept_rate is not None:
                want = (requested_layers, draft_tokens if draft_tokens is not None else 4,
                        accept_rate if accept_rate is not None else 0.6)
                if not any((a or m.layers, k, p) == want for a, _, k, p in grid):
                    grid.append((requested_layers, f"last:{requested_layers}", want[1], want[2]))
            for a, label, k, p in grid:
                s = speculative_s_per_token(name, rank, shared_a, dtype, link, a, k, p)
                out.append({"model": m.name, "rtt_ms": rtt * 1000, "adapted_layers": a or m.layers,
                            "placement": label, "draft_tokens": k, "accept_rate": p, "tok_s_one_user": 1 / s,
                            "requested": want is not None and (a or m.layers, k, p) == want})
    return out


def report(rtts=(0.0, 0.020), users=(1, 8, 32), draft_tokens: int | None = None,
           accept_rate: float | None = None) -> dict:
    rows = []
    for name in MODELS:
        row = {"model": MODELS[name].name, "paper_table_tps": PAPER_TPS[name], "paper_formula_tps": paper_tps(name),
               "paper_formula_error": paper_tps(name) / PAPER_TPS[name] - 1,
               "device_only_4bit_tps": device_only_tps(name), "cloud_only_tps": MODELS[name].cloud_tps, "ours": []}
        for rank, shared_a, dtype in ((128, False, "fp16"), (128, True, "int8"), (32, True, "int8")):
            for rtt in rtts:
                link = Link(rtt_s=rtt)
                row["ours"].append({"rank": rank, "shared_a": shared_a, "dtype": dtype, "rtt_ms": rtt * 1000,
                                    "single_user_tps": 1 / ours_single_s(name, rank, shared_a, dtype, link),
                                    "aggregate_tps": {str(u): ours_aggregate_tps(name, u, rank, shared_a, dtype, link)
                                                      for u in users}})
        rows.append(row)
    return {"assumptions": {"phone_bandwidth_Bps": PHONE_BW, "device_bandwidth_efficiency": DEVICE_BW_EFFICIENCY,
                            "up_bps": UP_5G, "down_bps": DOWN_5G, "vocab": VOCAB,
                            "models": {k: asdict(v) for k, v in MODELS.items()},
                            "latency_wire": {"rank": LATENCY_WIRE[0], "shared_a": LATENCY_WIRE[1],
                                             "dtype": LATENCY_WIRE[2]},
                            "adapted_layers": "A of the L layers carry the adapter; a chain costs A + 1 round "
                                              "trips and per-layer frames for A layers only",
                            "draft_tokens": "K tokens drafted on the device, verified in ONE chain of K + 1 rows; "
                                            "tokens per chain E = (1 - a^(K+1)) / (1 - a)",
                            "accept_rate": "accept_rate: per-token acceptance of drafted tokens; the shipped tiny "
                                           "model's measured acceptance is an example, fill in your own",
                            "draft_model": f"about {DRAFT_PARAM_FRACTION:.3g} of the target's parameters, "
                                           f"{DRAFT_BITS}-bit, memory bound at the calibrated device bandwidth "
                                           f"({DEVICE_BW_EFFICIENCY:.3f} x {PHONE_BW / 1e9:.1f} GB/s)",
                            "extra_row_cost": "each extra row in the cloud: 2 * params / 312e12 s"},
            "device_only_7b_paper": PAPER_DEVICE_ONLY_7B, "device_only_paper": PAPER_DEVICE_ONLY,
            "device_only_calibrated_on": CALIBRATED_ON, "models": rows,
            "latency": latency_rows(rtts, draft_tokens, accept_rate),
            "device_only_tps": {m.name: device_only_tps(k) for k, m in MODELS.items()}}
