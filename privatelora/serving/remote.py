"""The device driver over TCP: ``run_remote(client, part, prompt, params)`` drives one
device session over a ``transport.Client``: exactly the ``Generation`` state machine the
in-process runner uses.
"""

from __future__ import annotations

from privatelora import wire
from privatelora.model.sampling import SamplingParams
from privatelora.runtime.generation import Generation
from privatelora.transport import Client


async def run_remote(client: Client, part, prompt, params: SamplingParams | None = None, *,
                     dtype: str = "fp32", keep_logits: bool = False, timeout: float = 60.0,
                     observe=None, draft=None, draft_tokens: int = 4, on_tokens=None) -> Generation:
    """Generate for one user over ``client``; returns the finished ``Generation``.

    ``observe(msg)``, if given, sees every message the cloud sent (benchmarks use it to
    tell prefill from decode traffic). ``draft``: speculative decoding drafted on the
    device (``runtime/draft.py``). ``on_tokens(n)``: called when the session has produced
    ``n`` tokens in all (benchmarks time the arrivals)."""
    params = params or SamplingParams()
    geometry = wire.session_geometry(part.exchange_ids, part.model_config.hidden_size, part.cfg, dtype)
    sess = await client.open(geometry)
    dev = part.session(sess.id, bytes_per_number=wire.DTYPES[dtype])
    gen = Generation(dev, list(prompt), params, keep_logits=keep_logits, draft=draft, draft_tokens=draft_tokens)
    if draft is not None:
        draft.reset()
    try:
        msg = gen.start()
        while msg is not None:
            if isinstance(msg, wire.Handoff):
                await sess.send(msg, dtype=wire.HANDOFF_DTYPE[dtype])
            else:
                await sess.send(msg)
            ans = await sess.recv(timeout)
            if observe is not None:
                observe(ans)
            have = len(gen.tokens)
            msg = gen.on(ans)
            if on_tokens is not None and len(gen.tokens) > have:
                on_tokens(len(gen.tokens))
    finally:
        if not client.closed:
            await sess.close()
    return gen
