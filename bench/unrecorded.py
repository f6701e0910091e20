"""The bench's *mediation* target: `broker serve` for one config, with recording off.

    python -m bench.unrecorded --config broker.toml

Everything the broker does per call runs as in `broker serve` (token check, pins, `decide()`,
argument canonicalisation, rate limits, every detector, output policy) except recording: no
session or event is written. `make bench` runs it beside the full broker, so the cost of
recording is the difference between the two, measured in the same run (issue 5 bounds it at
0.5 ms p50 per call at concurrency 1). Not a way to run a broker: see `broker.app.create_app`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import uvicorn

from broker.app import create_app
from broker.config import load_config
from broker.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.unrecorded", description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    options = parser.parse_args(argv)
    os.umask(0o077)
    config = load_config(options.config, os.environ)
    configure_logging(os.environ.get("BROKER_LOG_LEVEL", "INFO"))
    uvicorn.run(
        create_app(config, record=False),
        host=config.server.host,
        port=config.server.port,
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
