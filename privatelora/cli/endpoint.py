"""The ``cloud`` and ``edge`` commands: one cloud endpoint process, one device process.

``privatelora cloud`` serves a backbone's cloud part over TCP in this one process (no
Ray); ``privatelora edge`` is a device outside any cluster that talks to it (or to a Ray
``serve``) with the same wire protocol.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

from privatelora.cli.common import (add_cloud_link_args, add_draft_args, add_endpoint_bounds, add_kv_cache_bytes,
                                    add_prompt_args, decode, draft_from_args, endpoint_bounds, kv_cache_kw,
                                    prompt_ids, split_config)
from privatelora.config import UsageError


def _cfg(args):
    return split_config(args)


def _tls_server_kw(args) -> dict:
    kw = {}
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            from privatelora.config import UsageError
            raise UsageError("--tls-cert and --tls-key go together")
        kw.update(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
    return kw


def cmd_cloud(args) -> dict:
    """A deployable cloud: it loads only the decoder layers it runs (``load_cloud_backbone``:
    no embedding, final norm, LM head or device layers), and training steps (``tune
    --connect``) run on the same cloud part."""
    from privatelora.api import load_cloud_backbone
    from privatelora.runtime.cloud import CloudPart
    from privatelora.serving.endpoint import CloudEndpoint
    from privatelora.transport import TLSRequiredError

    if args.metrics_sd_file and args.no_metrics:
        raise UsageError("--metrics-sd-file lists /metrics: it does not go with --no-metrics")
    metrics = None
    if not args.no_metrics:      # /metrics by default, on --host; a port in use fails before the model loads
        from privatelora.serving.metrics import Metrics, instrument
        metrics = Metrics()
        metrics.serve(args.metrics_port, args.host)     # a port in use: MetricsPortError, one line, exit 2
    try:
        cfg = _cfg(args)
        backbone = load_cloud_backbone(args.model, cfg)
        cloud = CloudPart(backbone, cfg, **kv_cache_kw(args))     # no keyword: the device's memory decides
        ep = CloudEndpoint(cloud, args.host, args.port, max_sessions=args.max_sessions,
                           idle_timeout_s=args.idle_timeout, **endpoint_bounds(args), **_tls_server_kw(args))
    except BaseException as e:
        if metrics is not None:
            metrics.close()
        if isinstance(e, TLSRequiredError):
            raise UsageError(str(e))
        raise
    if metrics is not None:
        instrument(ep, metrics=metrics)

    async def main():
        await ep.start()
        host, port = ep.address
        ready = {"event": "listening", "host": host, "port": port, "model": backbone.name,
                 "fingerprint": backbone.fingerprint, "layers": cloud.layer_ids, "adapted_layers": cloud.exchange_ids,
                 "tls": ep.server.ssl_context is not None}
        if metrics is not None:
            ready["metrics"] = _serve_metrics(args, metrics)
        if args.json:
            print(json.dumps(ready), flush=True)
        else:
            print(f"[cloud] {backbone.name}: layers {cloud.layer_ids[0]}-{cloud.layer_ids[-1]}, "
                  f"rank {cfg.rank}, listening on {host}:{port}{' (TLS)' if ready['tls'] else ''}",
                  file=sys.stderr, flush=True)
            if metrics is not None:
                print(f"[cloud] metrics on http://{ready['metrics']}/metrics", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await ep.stop()
        if metrics is not None:
            _stop_metrics(args, metrics)
        return {"event": "stopped", **ep.stats()}

    return asyncio.run(main())


def _serve_metrics(args, metrics) -> str:
    """Write the discovery file of /metrics (served since the start, on --host); its address."""
    from privatelora.serving.metrics import sd_target, write_sd_file
    host, port = metrics.address
    if args.metrics_sd_file:
        write_sd_file(args.metrics_sd_file, [(host, port, 0)])
    return sd_target(host, port)


def _stop_metrics(args, metrics) -> None:
    from privatelora.serving.metrics import write_sd_file
    if args.metrics_sd_file:
        write_sd_file(args.metrics_sd_file, [])   # a clean stop leaves no target to scrape
    metrics.close()


def parse_address(s: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(f"--connect must be HOST:PORT, got {s!r}")
    return host.strip("[]"), int(port)


def network_error(host: str, port: int, e: BaseException) -> UsageError:
    """One line for a device command whose cloud failed: never reached, or lost."""
    import socket
    if isinstance(e, (ConnectionRefusedError, socket.gaierror)) or (isinstance(e, OSError) and
                                                                    not isinstance(e, (ConnectionError, TimeoutError))):
        return UsageError(f"cannot connect to {host}:{port}: {getattr(e, 'strerror', None) or e}")
    return UsageError(f"lost the cloud at {host}:{port}: {type(e).__name__} {e}")


def cmd_edge(args) -> dict:
    from privatelora.api import load_device_backbone, load_user_adapter, resolve_config
    from privatelora.config import UsageError
    from privatelora.model.sampling import SamplingParams
    from privatelora.runtime.device import DevicePart
    from privatelora.serving.remote import run_remote
    from privatelora.transport import RemoteError
    from privatelora.transport.link import get_profile

    host, port = parse_address(args.connect)
    if args.prompt is None and args.prompt_ids is None:
        raise UsageError("give --prompt TEXT or --prompt-ids IDS")     # before loading any model
    try:
        link = get_profile(args.link)
    except ValueError as e:
        raise UsageError(str(e))
    cfg = resolve_config(_cfg(args), args.adapter)
    bb = load_device_backbone(args.model, cfg)        # a device reads only its own tensors
    device = DevicePart(bb, cfg, load_user_adapter(bb, cfg, args.adapter))
    ids = prompt_ids(bb, args)
    draft = draft_from_args(args, bb)
    stop = (bb.tokenizer.eos_token_id,) if bb.tokenizer is not None and bb.tokenizer.eos_token_id is not None else ()
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop_ids=stop)

    async def main():
        from privatelora.serving.remote import AddressConnector, Resume, ResumeFailed
        from privatelora.transport import TLSRequiredError
        conn = AddressConnector(host, port, ca=args.tls_ca, server_hostname=args.tls_server_name, link=link,
                                timeout=args.timeout)
        resume = Resume(attempts=args.resume_attempts) if args.resume_attempts else None
        try:
            t0 = time.perf_counter()
            gen = await run_remote(conn, device, ids, params, dtype=args.wire_dtype, timeout=args.timeout,
                                   draft=draft, draft_tokens=args.draft_tokens, resume=resume)
            dt = time.perf_counter() - t0
        except TLSRequiredError as e:
            raise UsageError(str(e))
        except RemoteError as e:
            raise UsageError(f"the cloud refused the session: {e}")
        except ResumeFailed as e:
            if not e.started:
                raise UsageError(f"cannot connect to {host}:{port}: {e}")
            raise UsageError(f"lost the cloud at {host}:{port} and could not resume: {e}")
        except OSError as e:          # ConnectionError and TimeoutError included
            raise network_error(host, port, e)
        finally:
            stats = conn.stats().as_dict()
            await conn.close()
        if gen.error is not None:
            raise UsageError(f"the cloud answered {gen.error.code}: {gen.error.reason}")
        return gen, dt, stats

    gen, dt, stats = asyncio.run(main())
    return {"tokens": gen.tokens, "text": decode(bb, gen.tokens), "finish_reason": gen.finish_reason,
            "prompt_tokens": len(ids), "seconds": dt, "tokens_per_s": len(gen.tokens) / dt if dt else 0.0,
            "link": args.link, "wire_dtype": args.wire_dtype, "wire": stats, **gen.stats(),
            "bytes": {"to_cloud": stats["up"]["total"]["wire"], "to_device": stats["down"]["total"]["wire"]}
            if "up" in stats else stats}


def print_edge(res):
    print(res["text"] if res["text"] is not None else " ".join(map(str, res["tokens"])))
    b = res["bytes"]
    print(f"[edge] {len(res['tokens'])} tokens in {res['seconds']:.2f}s ({res['tokens_per_s']:.1f} tok/s) over "
          f"{res['link']}, {res['wire_dtype']} activations; wire bytes to cloud {b['to_cloud']}, "
          f"to device {b['to_device']}; {res['round_trips']} round trips"
          + (f", draft {res['draft']['name']}: {res['draft']['accepted']}/{res['draft']['proposed']} accepted"
             if res.get("draft") else ""), file=sys.stderr)


def add_commands(sub, add_split_args, positive):
    c = sub.add_parser("cloud", help="serve a backbone's cloud part over TCP in this process (no Ray)",
                       description="Single-process cloud endpoint: loads only the decoder layers it runs (no "
                       "embedding, final norm or LM head), keeps per-session KV "
                       "caches, batches every session's stages. Stops cleanly on Ctrl-C / SIGTERM. Off loopback "
                       "it requires TLS (--tls-cert/--tls-key).")
    add_split_args(c, with_adapter=False)
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=positive, default=7431, help="TCP port (0: any free port)")
    c.add_argument("--max-sessions", type=positive, default=256)
    c.add_argument("--idle-timeout", type=float, default=120.0,
                   help="seconds of silence after which a session is closed and its KV cache freed")
    add_endpoint_bounds(c)
    add_kv_cache_bytes(c)
    c.add_argument("--tls-cert", help="PEM certificate chain of this endpoint")
    c.add_argument("--tls-key", help="PEM private key of this endpoint")
    c.add_argument("--tls-ca", help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    c.add_argument("--metrics-port", type=positive, default=9431,     # privatelora.serving.metrics.DEFAULT_PORT
                   help="serve Prometheus /metrics on this port, same host as --host (default 9431; 0: any free port)")
    c.add_argument("--no-metrics", action="store_true", help="serve no /metrics")
    c.add_argument("--metrics-sd-file", help="write a Prometheus file_sd targets JSON file listing /metrics")
    c.add_argument("--json", action="store_true", help="JSON lines: one when listening, one when stopped")
    c.set_defaults(func=cmd_cloud, printer=lambda r: print(
        f"[cloud] stopped after {r['stages']} stages (mean batch {r['mean_batch_size']:.2f} sessions); "
        f"refused frames: {r['refusals'] or 'none'}", file=sys.stderr))

    e = sub.add_parser("edge", help="a device outside Ray: generate through a running cloud endpoint",
                       description="Runs the device part here (tokens, embedding, LM head, your adapter) and "
                       "the decoder layers on the cloud at --connect; only low-rank activations cross.")
    add_split_args(e)
    e.add_argument("--connect", required=True, help="HOST:PORT of a cloud endpoint")
    add_prompt_args(e)
    e.add_argument("--max-new-tokens", type=positive, default=32)
    e.add_argument("--temperature", type=float, default=0.0)
    e.add_argument("--top-p", type=float, default=1.0)
    e.add_argument("--seed", type=int, default=0)
    add_cloud_link_args(e)
    add_draft_args(e)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_edge, printer=print_edge)
