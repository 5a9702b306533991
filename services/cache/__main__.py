"""The cache service process: `python -m services.cache`."""

from services.cache.service import start
from services.common.logs import setup_logging
from services.common.server import run
from services.common.settings import CacheSettings

settings = CacheSettings()
setup_logging("cache", settings.log_level, settings.log_format)
run(lambda: start(settings), settings.grace_seconds)
