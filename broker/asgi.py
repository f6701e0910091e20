"""``broker.asgi:create``: the app factory uvicorn imports in each worker of ``serve --workers``.

A worker process starts from nothing, so the factory reads what `broker serve` handed it through
the environment: the config path in ``BROKER_CONFIG`` (default ``./broker.toml``), overrides as
``BROKER_*`` (``serve --host/--port`` become ``BROKER_SERVER__HOST/PORT``), the log level in
``BROKER_LOG_LEVEL``. Also usable by any ASGI server: ``uvicorn --factory broker.asgi:create``.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.applications import Starlette

__all__ = ["create"]


def create() -> Starlette:
    """Load the config named by ``BROKER_CONFIG`` and build the broker's app.

    Raises:
        ConfigError: the config is invalid (the message names the key).
    """
    from broker.app import create_app
    from broker.config import default_config_path, load_config
    from broker.logs import configure_logging

    # BROKER_LOG_LEVEL is the process's, not a config key.
    environ = {k: v for k, v in os.environ.items() if k != "BROKER_LOG_LEVEL"}
    path = environ.get("BROKER_CONFIG")
    config = load_config(Path(path) if path else default_config_path(environ), environ)
    configure_logging(os.environ.get("BROKER_LOG_LEVEL", "INFO"))
    return create_app(config)
