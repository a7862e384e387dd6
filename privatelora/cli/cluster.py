"""The Ray commands, ``demo`` and ``serve``: they import the Ray side only when run.
"""

from __future__ import annotations

import contextlib

from privatelora.cli.common import split_config, stdout_kept_for_json


def cmd_demo(args) -> dict:
    if args.in_process:
        from privatelora.runtime.demo import run_inprocess_demo
        return run_inprocess_demo(users=args.users, max_new_tokens=args.max_new_tokens, model=args.model,
                                  rank=args.rank or 16, quiet=args.json, adapted_layers=args.adapted_layers,
                                  draft=args.draft, draft_tokens=args.draft_tokens)
    from privatelora.actors.commands import demo
    # the report is printed as the demo runs: only --json needs stdout kept clean
    with stdout_kept_for_json() if args.json else contextlib.nullcontext():
        return demo(users=args.users, max_new_tokens=args.max_new_tokens, model=args.model, rank=args.rank or 16,
                    address=args.address, quiet=args.json, adapted_layers=args.adapted_layers, draft=args.draft,
                    draft_tokens=args.draft_tokens)


def cmd_serve(args) -> dict:
    from privatelora.actors.commands import serve
    if not args.json:
        return serve(args, split_config(args))
    with stdout_kept_for_json() as out:          # events as JSON lines, Ray's own chatter to stderr
        return serve(args, split_config(args), out=out)
