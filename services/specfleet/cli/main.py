"""The `specfleet` command's parser: every command group in the order `specfleet --help` lists them."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    from specfleet.cli import bench, demo, generate, models, profile, security, serve, train, up
    from specfleet.sdk.cli import add_client_parser
    from specfleet_operator.cli import add_parsers as add_operator_parsers
    from specfleet_operator.simulator.cli import add_parsers as add_simulate_parsers

    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="specfleet",
        description="Lossless collaborative speculative decoding: generate text, train and measure the bundled "
                    "model family.",
        epilog="Quick start: `make demo` (or `specfleet demo`), then `specfleet generate --prompt 'def main():'`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in (generate, demo, train, bench, profile, security, serve, up):
        group.add_parser(sub, fmt)
    add_operator_parsers(sub, fmt)
    add_simulate_parsers(sub, fmt)
    add_client_parser(sub)
    models.add_parser(sub, fmt)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
