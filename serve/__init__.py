"""Serving the assistant over HTTP (`toolvlm serve`): a web page and an OpenAI-compatible API.

config.py (settings and limits), inputs.py (checking what requests bring), sessions.py (models loaded once,
session folders and their writer locks), runner.py (the bounded worker pool), wire.py (events as JSON),
app.py (the page's routes), openai_api.py (/v1), workflow.py (a fast rule-based controller for tests and
benchmarks), cli.py (the command). Importing this package loads nothing heavy.
"""

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
