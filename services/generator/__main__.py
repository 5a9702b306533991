"""The generator process: `python -m services.generator` (GeneratorService and queue workers)."""

from services.common.logs import setup_logging
from services.common.server import run
from services.common.settings import GeneratorSettings
from services.generator.service import start

settings = GeneratorSettings()
setup_logging("generator", settings.log_level, settings.log_format)
run(lambda: start(settings), settings.grace_seconds)
