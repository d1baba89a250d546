"""`toolvlm serve`: the assistant over HTTP (a web page and an OpenAI-compatible API) on loopback by default.

    toolvlm serve [--profile P] [--host 127.0.0.1] [--port 8000] [--sessions DIR] [--workers N] [--queue N]
                  [--max-body-mb X] [--max-image-mb X] [--max-image-pixels N] [--max-question-chars N]
                  [--turn-timeout S] [--controller profile|workflow]

The models load once, before the server listens; every conversation is a session folder under `--sessions`.
"""

from __future__ import annotations

import argparse
import sys

from .config import ServeConfig

DEFAULTS = ServeConfig()


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of `toolvlm serve`."""
    d = DEFAULTS
    parser.add_argument(
        "--profile", default=None, help="a profile YAML path or name (default: the default bundle)"
    )
    parser.add_argument(
        "--host", default=d.host, help=f"address to listen on (default {d.host}: this machine only)"
    )
    parser.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port})")
    parser.add_argument("--sessions", default=d.sessions, metavar="DIR", help="folder of the session folders")
    parser.add_argument("--workers", type=int, default=d.workers, help="turns computed at once")
    parser.add_argument("--queue", type=int, default=d.queue, help="turns waiting before new ones get 429")
    parser.add_argument(
        "--max-body-mb", type=float, default=d.max_body_bytes / 2**20, help="request body limit"
    )
    parser.add_argument(
        "--max-image-mb", type=float, default=d.max_image_bytes / 2**20, help="one image, encoded"
    )
    parser.add_argument(
        "--max-image-pixels", type=int, default=d.max_image_pixels, help="one image, width x height"
    )
    parser.add_argument("--max-question-chars", type=int, default=d.max_question_chars, help="one question")
    parser.add_argument(
        "--turn-timeout", type=float, default=d.turn_timeout_s, metavar="S", help="per-turn time"
    )
    parser.add_argument(
        "--controller",
        choices=("profile", "workflow"),
        default=d.controller,
        help="'workflow': a fast rule-based controller with the profile's tools (tests, load benchmarks)",
    )


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of parsed arguments."""
    return ServeConfig.from_dict(
        {
            "host": args.host,
            "port": args.port,
            "profile": args.profile,
            "controller": args.controller,
            "sessions": args.sessions,
            "workers": args.workers,
            "queue": args.queue,
            "max_body_bytes": int(args.max_body_mb * 2**20),
            "max_image_bytes": int(args.max_image_mb * 2**20),
            "max_image_pixels": args.max_image_pixels,
            "max_question_chars": args.max_question_chars,
            "turn_timeout_s": args.turn_timeout,
        }
    )


def run(args: argparse.Namespace, command: str) -> int:
    """Load the models, then serve until interrupted."""
    import uvicorn

    from toolvlm.agent.profiles import ProfileError

    from .app import create_app

    try:
        config = config_from_args(args)
        app = create_app(config)
    except (ProfileError, ValueError, FileNotFoundError) as err:
        print(f"toolvlm serve: {err}", file=sys.stderr)
        return 2
    print(
        f"toolvlm serve: http://{config.host}:{config.port}/ (OpenAI API at /v1), sessions in {config.sessions}"
    )
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    return 0
