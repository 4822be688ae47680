#!/usr/bin/env python3
"""Sends one chat completion to a Caravan server with the official `openai` client and prints the
reply as it streams in, then the token counts.

Usage: python/stream_chat.py --url http://127.0.0.1:8000 [--message TEXT] [--max-tokens N]
                             [--temperature T]
"""
import argparse
import sys

import openai


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="the server's base URL")
    ap.add_argument("--message", default="Write a haiku about caravans crossing the desert.")
    ap.add_argument("--system", default="You are a helpful assistant.")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=None,
                    help="0 for the greedy (reproducible) answer; default: the server's (1)")
    args = ap.parse_args()

    client = openai.OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    print(f"> {args.message}", file=sys.stderr)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": args.system}, {"role": "user", "content": args.message}],
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            print(choice.delta.content or "", end="", flush=True)
        usage = chunk.usage or usage
    print()
    if usage is not None:
        print(f"[{usage.prompt_tokens} prompt tokens, {usage.completion_tokens} completion tokens]", file=sys.stderr)


if __name__ == "__main__":
    main()
