"""The `effnet` command.

`serve` stays torch-free; `build` and `variants` import the build package (PyTorch)
only when they are asked for, so the runtime image needs no torch.
"""

from __future__ import annotations

import argparse
import sys

BUILD_COMMANDS = {"build", "variants"}
EVAL_COMMANDS = {"eval", "report"}


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the HTTP service (configured by EFFNET_* environment variables)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in BUILD_COMMANDS:
        try:
            from effnet_build.cli import main as build_main
        except ImportError as exc:  # the serving image ships without the build step (and without torch)
            print(f"effnet {argv[0]}: the build step is not installed here ({exc}); "
                  "install effnet-serve[build] where models are built", file=sys.stderr)
            return 2
        return build_main(argv)
    if argv and argv[0] in EVAL_COMMANDS:
        from .tools.eval_cli import main as eval_main

        return eval_main(argv)
    if argv and argv[0] == "tune":
        from .tools.tune import main as tune_main

        return tune_main(argv[1:])

    parser = argparse.ArgumentParser(prog="effnet", description="Serve the EfficientNet family.")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    for name in sorted(BUILD_COMMANDS):
        sub.add_parser(name, help=f"see `effnet {name} --help` (needs the build extra)")
    for name in sorted(EVAL_COMMANDS):
        sub.add_parser(name, help=f"see `effnet {name} --help`")
    sub.add_parser("tune", help="measure each model's best batch size here, into <repo>/batch_sizes.json")
    args = parser.parse_args(argv)

    if args.command == "serve":
        from .supervisor import serve

        return serve(host=args.host, port=args.port)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
