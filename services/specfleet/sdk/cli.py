"""`specfleet client generate "prompt"` and `specfleet client chat "message"`: stream a continuation, or the answer to
a conversation, from a running router over gRPC."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specfleet.runtime.security import TOKEN_ENV, TOKEN_FILE_ENV, resolve_tokens, single
from specfleet.sdk.core import DEFAULT_TARGET


def _stream_to_stdout(args, start) -> int:
    """Streams `start(client, **sampling)` (a chunk iterator) to stdout and its usage to stderr."""
    from specfleet.sdk import Client, SpecfleetError

    usage, finish_reason, tokens = None, "", 0
    try:
        # env vars and files keep the token out of `ps` and --help; a file is how a Kubernetes Secret is mounted
        token = single(resolve_tokens(args.token, args.token_file, "--token", TOKEN_ENV, TOKEN_FILE_ENV))
        targets = [t for t in args.target.split(",") if t]  # several router replicas: retries move between them
        with Client(targets or args.target, token=token, tls=args.tls, root_certificates=args.ca_cert,
                    timeout=args.timeout, retries=args.retries) as client:
            for chunk in start(client, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                tokens += len(chunk.token_ids)
                usage = chunk.usage or usage
                finish_reason = chunk.finish_reason or finish_reason
    except (SpecfleetError, ValueError) as exc:
        if tokens:
            sys.stdout.write("\n")  # end the partial text so that the error starts a line
        sys.exit(f"error: {exc}")
    sys.stdout.write("\n")
    line = f"[{tokens} tokens, finish_reason={finish_reason or '?'}"
    if usage is not None:
        line += (f", prompt {usage.prompt_tokens} tokens, {usage.rounds} target forward passes, "
                 f"{usage.accepted_tokens}/{usage.draft_tokens} drafted tokens accepted")
    print(line + "]", file=sys.stderr)
    return 0


def cmd_client_generate(args) -> int:
    return _stream_to_stdout(args, lambda client, **sampling: client.generate(args.prompt, **sampling))


def cmd_client_chat(args) -> int:
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.message}]
    return _stream_to_stdout(args, lambda client, **sampling: client.chat_stream(messages, **sampling))


def _call_flags(g: argparse.ArgumentParser) -> None:
    """The connection and sampling flags of every `client` action."""
    g.add_argument("--target", default=DEFAULT_TARGET,
                   help="router address, host:port; several router replicas comma-separated (a failed attempt "
                        "resumes the request on the next)")
    g.add_argument("--token", default=None,
                   help="bearer token sent as 'authorization' metadata; $SPECFLEET_TOKEN when not given")
    g.add_argument("--token-file", type=Path, default=None,
                   help="read the bearer token from this file (its first token line); $SPECFLEET_TOKEN_FILE when "
                        "not given")
    g.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --ca-cert)")
    g.add_argument("--ca-cert", type=Path, default=None, help="PEM file of the CA that signed the router's "
                   "certificate (implies --tls)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed; equal seeds give equal samples "
                   "(None: a random one)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--timeout", type=float, default=60.0, help="deadline of each attempt, seconds")
    g.add_argument("--retries", type=int, default=3, help="retries after a failover or timeout")


def add_client_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `client generate` and `client chat` to the `specfleet` command's subparsers; returns the `client`
    parser."""
    p = subparsers.add_parser("client", help="talk to a running specfleet router over gRPC")
    csub = p.add_subparsers(dest="client_command", metavar="ACTION", required=True)
    g = csub.add_parser("generate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        help="stream a continuation from a router",
                        description="Sends PROMPT to the router's Generate RPC and streams the continuation to "
                                    "stdout (usage to stderr). Failovers are retried transparently: each token is "
                                    "printed once.")
    g.add_argument("prompt", help="text to continue")
    _call_flags(g)
    g.set_defaults(func=cmd_client_generate)
    c = csub.add_parser("chat", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        help="stream the answer to a chat message from a router",
                        description="Sends MESSAGE as the user's turn (after --system, if given) and streams the "
                                    "assistant's answer to stdout (usage to stderr); the router renders the "
                                    "conversation with the model's chat template.")
    c.add_argument("message", help="the user's message")
    c.add_argument("--system", default=None, help="a system message before it")
    _call_flags(c)
    c.set_defaults(func=cmd_client_chat)
    return p
