"""The ``api`` command: the device's OpenAI-compatible HTTP server (``serving/openai_app.py``).

It runs the device part in this process and reaches the backbone at ``--connect`` (a
``cloud`` endpoint or a ``serve`` front door), or, without it, runs the cloud part here
too. It imports no Ray.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys

from privatelora.cli.common import add_cloud_link_args, add_draft_args, add_split_args, positive, read_chat_template, split_config
from privatelora.config import UsageError


def parse_adapters(specs) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs or ():
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--adapter takes NAME=FILE, got {spec!r}")
        if name in out:
            raise UsageError(f"--adapter {name} is given twice")
        if not os.path.isfile(path):
            raise UsageError(f"--adapter {name}: no such file {path!r}")
        out[name] = path
    return out


def resolve(args, files: dict[str, str]):
    """The split configuration every served model shares: the first adapter's (checked
    against the flags), else the flags. Every other adapter must have been made for it:
    ``load_adapter`` refuses one that was not."""
    if files:
        args.adapter = next(iter(files.values()))
    return split_config(args)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}")
    sock.listen(128)
    sock.setblocking(False)
    return sock


def build_service(args, connect, files: dict[str, str], template: str | None, link):
    from privatelora.api import load_device_backbone, load_user_adapter
    from privatelora.model.loading import load_backbone
    from privatelora.runtime.cloud import CloudPart
    from privatelora.serving.device_service import DeviceService, draft_factory

    cfg = resolve(args, files)
    if connect is None:           # the whole split here: one backbone for both parts
        bb = load_backbone(args.model, dtype=cfg.torch_dtype)
        cloud = CloudPart(bb, cfg)
    else:                         # a device reads only its own tensors
        bb, cloud = load_device_backbone(args.model, cfg), None
    if bb.tokenizer is None:
        raise UsageError("this checkpoint has no tokenizer: the API needs one")
    adapters = {name: load_user_adapter(bb, cfg, path) for name, path in files.items()}
    base = args.served_model_name or args.model
    if base in adapters:
        raise UsageError(f"--adapter {base} has the base model's name")
    return DeviceService(bb, cfg, adapters, base_name=base, connect=connect, tls_ca=args.tls_ca,
                         tls_server_name=args.tls_server_name, wire_dtype=args.wire_dtype, timeout=args.timeout,
                         resume_attempts=args.resume_attempts, chat_template=template,
                         draft=draft_factory(args.draft, bb), draft_tokens=args.draft_tokens, cloud=cloud, link=link)


def _server(config):
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises a SIGTERM/SIGINT it caught once it has shut down, which would
        end the process before the device part stops and reports: here they only stop it."""

        @contextlib.contextmanager
        def capture_signals(self):
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
            try:
                yield
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    return Server(config)


def cmd_api(args) -> dict | None:
    import uvicorn

    from privatelora.cli.common import stdout_kept_for_json
    from privatelora.serving.openai_app import create_app

    from privatelora.cli.endpoint import parse_address
    from privatelora.transport.link import get_profile

    if args.draft_tokens < 1:
        raise UsageError("--draft-tokens must be at least 1")
    connect = parse_address(args.connect) if args.connect else None
    files = parse_adapters(args.adapters)
    try:
        link = get_profile(args.link)
    except ValueError as e:
        raise UsageError(str(e))
    template = read_chat_template(args.chat_template)
    api_key = args.api_key or os.environ.get("PRIVATELORA_API_KEY") or None
    sock = bind(args.host, args.port)          # a taken port fails before the model loads
    try:
        service = build_service(args, connect, files, template, link)
    except BaseException:
        sock.close()
        raise
    app = create_app(service, api_key=api_key, manage=False)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.access_log, lifespan="on")
    server = _server(config)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    async def main(out):
        await service.start()
        try:
            task = asyncio.ensure_future(server.serve(sockets=[sock]))
            while not server.started and not task.done():
                await asyncio.sleep(0.02)
            if server.started:
                ready = {"event": "listening", "url": url, "host": host, "port": port,
                         "models": list(service.parts), "cloud": service.cloud_address, "api_key": bool(api_key)}
                if args.json:
                    print(json.dumps(ready), file=out, flush=True)
                else:
                    print(f"[api] OpenAI-compatible API on {url}/v1 (models: {', '.join(service.parts)}; cloud: "
                          f"{service.cloud_address}); Ctrl-C stops", file=sys.stderr, flush=True)
                    if host not in ("127.0.0.1", "::1", "localhost") and not api_key:
                        print("[api] warning: listening off loopback without --api-key: anyone who reaches this "
                              "address can read this device's models", file=sys.stderr, flush=True)
            await task
        finally:
            await service.stop()
        return {"event": "stopped", "served": service.served}

    with stdout_kept_for_json() as out:
        res = asyncio.run(main(out))
        if args.json:
            print(json.dumps(res), file=out, flush=True)
    return None


def add_commands(sub) -> None:
    a = sub.add_parser("api", help="an OpenAI-compatible HTTP API on the device (prompts and outputs stay here)",
                       description="Serves /v1/models, /v1/completions, /v1/chat/completions (streaming too) and "
                       "/health on this device, bound to 127.0.0.1 by default. The device part (tokenizer, "
                       "embedding, LM head, your adapters) runs here; the backbone runs at --connect (a `cloud` "
                       "or a `serve`), or in this process without it. Any OpenAI client works: "
                       "OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='unused').")
    add_split_args(a, with_adapter=False)
    a.add_argument("--adapter", action="append", dest="adapters", metavar="NAME=FILE",
                   help="serve this private adapter as model NAME (repeatable); without any, only the base model")
    a.add_argument("--served-model-name", metavar="NAME", help="the base model's name in the API (default: --model)")
    a.add_argument("--connect", metavar="HOST:PORT",
                   help="the cloud: a `privatelora cloud` endpoint or a `serve` front door (default: run the "
                   "backbone in this process)")
    a.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this device only)")
    a.add_argument("--port", type=positive, default=8000, help="HTTP port (default 8000; 0: any free port)")
    a.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $PRIVATELORA_API_KEY, "
                   "else none)")
    a.add_argument("--chat-template", metavar="FILE", help="Jinja chat template instead of the checkpoint's")
    add_cloud_link_args(a)
    add_draft_args(a)
    a.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    a.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False,
                   help="log each request line (method, path, status; never bodies)")
    a.add_argument("--json", action="store_true", help="JSON lines: one when listening, one when stopped")
    a.set_defaults(func=cmd_api)
