"""The gateway process: `python -m services.gateway` (gRPC API and HTTP facade)."""

from services.common.logs import setup_logging
from services.common.server import run
from services.common.settings import GatewaySettings
from services.gateway.service import start

settings = GatewaySettings()
setup_logging("gateway", settings.log_level)
run(lambda: start(settings), settings.grace_seconds)
