"""``bench fidelity``: how much a lossy wire dtype changes the model's output.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from privatelora.bench.geometry import one_thread

SAMPLE_TEXT = Path(__file__).resolve().parents[1] / "zoo" / "samples" / "heldout.txt"


def fidelity(model: str = "tiny", dtype: str = "int8", positions: int = 256, rank: int = 16,
             shared_a: bool = False, free_tokens: int = 64, seed: int = 0, text_file=None, quiet: bool = False) -> dict:
    """How much a lossy wire dtype changes the model's output, over a real socket.

    Teacher forcing: the same ``positions`` tokens of held-out text go through an fp32
    session and a ``dtype`` session; the next-token argmax is compared at every position.
    Free running: greedy decoding from the same prefix on both; reports where (if) they
    first diverge. The user has a non-zero M (with M = 0 the replies are exactly zero and
    the activations' quantization could not show).
    """
    from privatelora.api import build_split
    from privatelora.config import PrivateLoRAConfig
    from privatelora.model.loading import load_backbone
    from privatelora.model.sampling import SamplingParams
    from privatelora.serving.endpoint import CloudEndpoint
    from privatelora.serving.remote import run_remote
    from privatelora.transport import Client
    from privatelora.wire import HANDOFF_DTYPE

    one_thread()
    bb = load_backbone(model)
    split = build_split(cfg=PrivateLoRAConfig(rank=rank, shared_a=shared_a), backbone=bb)
    split.adapter.randomize_(seed + 1, scale=0.5)
    text = Path(text_file or SAMPLE_TEXT).read_text(encoding="utf-8")
    ids = bb.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < positions:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than {positions} positions")
    ids = ids[:positions]

    async def main():
        async with CloudEndpoint(split.cloud) as ep:
            client = await Client.connect(*ep.address)
            out = {}
            for dt in ("fp32", dtype):
                if not quiet:
                    print(f"[bench fidelity] {positions} positions and {free_tokens} free tokens in {dt}",
                          file=sys.stderr, flush=True)
                g = await run_remote(client, split.device, ids, SamplingParams(max_new_tokens=1), dtype=dt,
                                     keep_logits=True)
                free = await run_remote(client, split.device, ids[:16], SamplingParams(max_new_tokens=free_tokens),
                                        dtype=dt)
                out[dt] = (g.logits[0], free.tokens)
            await client.close()
            return out
    out = asyncio.run(main())
    ref, got = out["fp32"][0], out[dtype][0]
    err = (ref - got).abs()
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    a, b = out["fp32"][1], out[dtype][1]
    diverge = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return {"model": bb.name, "dtype": dtype, "handoff_dtype": HANDOFF_DTYPE[dtype], "rank": rank,
            "shared_a": shared_a, "positions": positions, "argmax_agreement": agree,
            "mean_abs_logit_error": err.mean().item(), "max_abs_logit_error": err.max().item(),
            "logit_scale": ref.abs().mean().item(),
            "free_running_tokens": free_tokens, "first_divergence": diverge}
