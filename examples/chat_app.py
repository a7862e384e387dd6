"""An app on the device, written against the official OpenAI client: it talks to
`privatelora api` on this machine, so its prompts and the model's answers never leave it.

    ./dev api --adapter me=me.safetensors &          # the device's API (the cloud: --connect HOST:PORT)
    .venv/bin/python examples/chat_app.py --model me "Who's there?"

It lists the models the device serves, then streams a chat answer as it is generated.
"""

import argparse
import os
import sys

from openai import OpenAI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("message", help="what the user says")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=os.environ.get("PRIVATELORA_API_KEY", "unused"))
    p.add_argument("--model", default=None, help="a model the device serves (default: the first)")
    p.add_argument("--max-tokens", type=int, default=48)
    args = p.parse_args(argv)

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    models = [m.id for m in client.models.list().data]
    print(f"models on this device: {', '.join(models)}", file=sys.stderr)
    model = args.model or models[0]
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": args.message}],
                                            max_tokens=args.max_tokens, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
