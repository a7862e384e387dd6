"""A multi-user serving job to submit to a running Ray cluster.

    ray job submit --address http://HEAD:8265 -- python examples/serve_job.py --users 4

The cluster needs nodes with the ``privatelora_cloud`` resource (backbone replicas) and
nodes with ``privatelora_edge`` (the users' edge actors), e.g. for one machine:

    ray start --head --resources '{"privatelora_cloud": 8, "privatelora_edge": 64}'

The job starts the backbone pool, one edge actor per user with that user's private
adapter, runs them concurrently and prints one JSON object (each user's text, aggregate
tokens/s, mean stage batch size, bytes versus a naive split). When the head requires Ray's
token authentication, submit with ``RAY_AUTH_MODE=token`` in the environment.
"""

import argparse
import json

import privatelora.actors  # noqa: F401  (Ray's auth mode, before Ray is imported)
from privatelora.actors.commands import demo


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--model", default="tiny")
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    result = demo(users=args.users, max_new_tokens=args.max_new_tokens, model=args.model, rank=args.rank,
                  address="auto", quiet=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
