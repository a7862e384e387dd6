"""What every command shares: the one-line-error parser, argument types, the split
arguments and the one resolver of a split's configuration (flags, then the adapter
file's metadata, then defaults), prompt handling, and keeping stdout for ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from privatelora.config import PLACEMENT_HELP, PROJECTION_HELP, PROJECTIONS, UsageError


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage + error otherwise)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def positive(v: str) -> int:
    try:
        i = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}")
    if i < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v!r}")
    return i


def non_negative(v: str) -> float:
    """A number >= 0 (e.g. GPUs per replica: Ray takes fractions)."""
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}")
    if not 0 <= x < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {v!r}")
    return x


BYTE_SUFFIXES = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def byte_size(v: str) -> int:
    """A positive byte count: a plain integer or one with a binary suffix K, M, G or T
    (optionally followed by B or iB, any case): ``512M`` is 512 * 2**20, ``4G`` 4 * 2**30."""
    text = v.strip().upper()
    for tail in ("IB", "B"):
        if text.endswith(tail) and text[:-len(tail)][-1:] in "KMGT" and len(text) > len(tail):
            text = text[:-len(tail)]
            break
    unit = text[-1:] if text[-1:] in "KMGT" else ""
    number = text[:len(text) - len(unit)]
    try:
        n = float(number) * BYTE_SUFFIXES[unit] if "." in number else int(number) * BYTE_SUFFIXES[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a byte count such as 1073741824, 512M or 4G, got {v!r}")
    if not 0 < n < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive byte count, got {v!r}")
    return int(n)


def add_kv_cache_bytes(p) -> None:
    """``--kv-cache-bytes`` of ``serve`` and ``cloud``."""
    p.add_argument("--kv-cache-bytes", type=byte_size, default=None, metavar="N",
                   help="KV cache budget of each backbone (bytes; suffixes K, M, G: 512M, 4G); sessions are "
                   "admitted while their cache fits (default: sized from the device's memory)")


def kv_cache_kw(args) -> dict:
    """The cloud part's keyword for ``--kv-cache-bytes``: none when not given (its default)."""
    n = getattr(args, "kv_cache_bytes", None)
    return {} if n is None else {"kv_cache_bytes": n}


def add_split_args(p, with_adapter=True):
    p.add_argument("--model", default="tiny", help="local HF checkpoint directory, 'tiny' (default) or tiny-llama|tiny-mistral|tiny-qwen2")
    if with_adapter:
        p.add_argument("--adapter", help="private adapter file (.safetensors); its rank/targets/shared-A/seed/"
                       "adapted layers win")
    p.add_argument("--rank", type=positive, help="rank r of A, M, B (default 16; taken from --adapter if given)")
    p.add_argument("--targets", help="adapted projections, comma separated subset of q,k,v (default q,k,v)")
    p.add_argument("--shared-a", action="store_true", default=None, help="one A per layer shared by q, k, v")
    p.add_argument("--device-head-layers", type=positive, default=0, help="first K decoder layers run on the device")
    p.add_argument("--device-tail-layers", type=positive, default=0, help="last K decoder layers run on the device")
    p.add_argument("--projection-seed", type=positive, default=None, help="public seed of A and B (default 0)")
    p.add_argument("--projection", choices=sorted(PROJECTIONS), default=None,
                   help=PROJECTION_HELP + " (taken from --adapter if given)")
    p.add_argument("--adapted-layers", metavar="SPEC", default=None,
                   help=PLACEMENT_HELP + " (taken from --adapter if given)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype")


def split_config(args):
    from privatelora.config import PrivateLoRAConfig
    from privatelora.model.adapters import config_from_adapter, read_adapter_metadata
    kw = dict(device_head_layers=args.device_head_layers, device_tail_layers=args.device_tail_layers, dtype=args.dtype)
    if getattr(args, "adapter", None):
        cfg = config_from_adapter(args.adapter, PrivateLoRAConfig(**kw))
        for name, have in (("rank", cfg.rank), ("shared_a", cfg.shared_a), ("projection_seed", cfg.seed),
                           ("projection", cfg.projection)):
            given = getattr(args, name)
            if given is not None and given != have:
                raise UsageError(f"--{name.replace('_', '-')} {given} conflicts with the adapter file ({have})")
        if args.targets and tuple(sorted(args.targets.split(","))) != tuple(sorted(cfg.targets)):
            raise UsageError(f"--targets {args.targets} conflicts with the adapter file ({','.join(cfg.targets)})")
        given = getattr(args, "adapted_layers", None)
        if given is not None:
            n = int(read_adapter_metadata(args.adapter)["n_layers"])
            if PrivateLoRAConfig(adapted_layers=given).adapted(n) != cfg.adapted(n):
                raise UsageError(f"--adapted-layers {given} conflicts with the adapter file ({cfg.adapted_layers})")
        return cfg
    if args.rank is not None:
        kw["rank"] = args.rank
    if args.targets:
        kw["targets"] = tuple(t.strip() for t in args.targets.split(","))
    if args.shared_a:
        kw["shared_a"] = True
    if args.projection_seed is not None:
        kw["seed"] = args.projection_seed
    if getattr(args, "projection", None) is not None:
        kw["projection"] = args.projection
    if getattr(args, "adapted_layers", None) is not None:
        kw["adapted_layers"] = args.adapted_layers
    return PrivateLoRAConfig(**kw)


def add_prompt_args(p) -> None:
    """The prompt flags of ``generate`` and ``edge``."""
    p.add_argument("--prompt", help="prompt text, tokenized here as the checkpoint's tokenizer does it "
                   "(tokenizer(TEXT): its own special tokens, e.g. a BOS where it adds one)")
    p.add_argument("--prompt-ids", help="prompt as comma separated token ids instead of text")
    p.add_argument("--add-special-tokens", action=argparse.BooleanOptionalAction, default=None,
                   help="override the tokenizer's own choice of special tokens around --prompt (default: "
                   "the tokenizer decides, as transformers does)")
    p.add_argument("--chat", action="store_true",
                   help="--prompt is a user message: render it with the checkpoint's chat template")
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message before it")
    p.add_argument("--chat-template", metavar="FILE",
                   help="with --chat: a Jinja chat template file to use instead of the checkpoint's")


def read_chat_template(path) -> str | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"cannot read the chat template {path}: {e.strerror or e}")


def prompt_ids(backbone, args) -> list[int]:
    from privatelora.runtime.prompts import PromptError, check_prompt, encode_chat, encode_prompt
    chat = getattr(args, "chat", False)
    if args.prompt is None and args.prompt_ids is None:
        raise UsageError("give --prompt TEXT or --prompt-ids IDS")
    if args.prompt_ids:
        if chat or args.add_special_tokens is not None:
            raise UsageError("--chat and --[no-]add-special-tokens apply to --prompt text, not --prompt-ids")
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise UsageError("--prompt-ids must be comma separated integers")
    else:
        if (getattr(args, "system", None) or getattr(args, "chat_template", None)) and not chat:
            raise UsageError("--system and --chat-template go with --chat")
        try:
            if chat:
                if args.add_special_tokens is not None:
                    raise UsageError("with --chat the chat template places the special tokens: drop "
                                     "--[no-]add-special-tokens")
                messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                    [{"role": "user", "content": args.prompt}]
                ids = encode_chat(backbone.tokenizer, messages, read_chat_template(args.chat_template))
            else:
                ids = encode_prompt(backbone.tokenizer, args.prompt, args.add_special_tokens)
        except PromptError as e:
            raise UsageError(f"{e} (or give --prompt-ids)" if backbone.tokenizer is None else str(e))
    cfg = backbone.model.config
    if len(ids) + args.max_new_tokens > cfg.max_position_embeddings:
        raise UsageError(f"prompt ({len(ids)} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds the "
                         f"model's {cfg.max_position_embeddings} positions")
    try:
        check_prompt(ids, cfg.vocab_size, cfg.max_position_embeddings, args.max_new_tokens)
    except PromptError as e:
        raise UsageError(str(e))
    return ids


def decode(backbone, ids) -> str | None:
    return None if backbone.tokenizer is None else backbone.tokenizer.decode(ids, skip_special_tokens=True)


@contextlib.contextmanager
def stdout_kept_for_json():
    """While Ray runs, send file descriptor 1 to stderr: Ray's own warnings (e.g. about
    worker start-up, or a worker killed) may be printed on stdout, which ``--json`` keeps
    for JSON. Yields a text stream on the real stdout, for JSON lines written meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(os.dup(saved), "w", buffering=1)
    try:
        yield real
    finally:
        real.close()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def add_cloud_link_args(p) -> None:
    """How a device reaches its cloud (``edge``, ``api``): wire dtype, link, TLS, patience."""
    p.add_argument("--wire-dtype", choices=["fp32", "fp16", "bf16", "int8"], default="fp32",
                   help="dtype of activations on the wire (hand-offs use fp16 for int8)")
    p.add_argument("--link", default="loopback", help="emulate a link to the cloud: loopback, lan, wifi, 5g, 4g")
    p.add_argument("--tls-ca", help="PEM CA (or self-signed certificate) of the cloud to trust; required off "
                   "loopback")
    p.add_argument("--tls-server-name", help="expected certificate host name, if not the --connect host")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for any answer from the cloud")
    p.add_argument("--resume-attempts", type=positive, default=8,
                   help="when the cloud loses a session (dropped connection, busy, replica gone), open a new one "
                   "and replay the tokens held here, up to this many times (0: give up at once)")


def add_draft_args(p) -> None:
    p.add_argument("--draft", metavar="ngram|tiny|PATH", default=None,
                   help="speculative decoding drafted on the device: ngram (lookup in the session's own "
                        "context), tiny (the draft shipped for the tiny model) or a local Llama-family "
                        "checkpoint sharing the tokenizer; the output stays exact")
    p.add_argument("--draft-tokens", type=positive, default=4, metavar="K",
                   help="tokens drafted per verify chain (default 4)")


def draft_from_args(args, backbone):
    """The draft ``--draft`` names, or None; a bad one is a usage error."""
    if not getattr(args, "draft", None):
        return None
    if args.draft_tokens < 1:
        raise UsageError("--draft-tokens must be at least 1")
    from privatelora.runtime.draft import load_draft
    return load_draft(args.draft, backbone)



def add_endpoint_bounds(p: argparse.ArgumentParser) -> None:
    """Options bounding what one peer can cost a replica (``CloudEndpoint``)."""
    g = p.add_argument_group("bounds per replica")
    g.add_argument("--max-open", type=positive, default=0,
                   help="open sessions in all, running or not (0: twice --max-sessions plus the waiting queue)")
    g.add_argument("--max-open-per-connection", type=positive, default=256,
                   help="open sessions on one connection (an edge host carries many users on one)")
    g.add_argument("--send-timeout", type=float, default=10.0,
                   help="seconds a peer's socket may stay full before the peer is disconnected")


def endpoint_bounds(args) -> dict:
    if args.send_timeout <= 0:
        raise UsageError("--send-timeout must be > 0")
    if args.max_open_per_connection < 1:
        raise UsageError("--max-open-per-connection must be >= 1")
    out = {"max_open_per_connection": args.max_open_per_connection, "send_timeout_s": args.send_timeout}
    if args.max_open:
        out["max_open"] = args.max_open
    return out
