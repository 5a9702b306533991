"""The gateway process: `python -m services.gateway` (gRPC API and HTTP facade); with a
command (`keys`, `tenants`, `cleanup`), the operator commands of services.gateway.cli."""

import sys

from services.common.logs import setup_logging
from services.common.settings import GatewaySettings

if len(sys.argv) > 1:
    from services.gateway.cli import main

    raise SystemExit(main(sys.argv[1:]))

from services.common.server import run
from services.gateway.service import start

settings = GatewaySettings()
setup_logging("gateway", settings.log_level, settings.log_format)
run(lambda: start(settings), settings.grace_seconds)
