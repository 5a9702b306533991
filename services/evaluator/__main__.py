"""The evaluator process: `python -m services.evaluator`."""

from services.common.logs import setup_logging
from services.common.server import run
from services.common.settings import EvaluatorSettings
from services.evaluator.service import start

settings = EvaluatorSettings()
setup_logging("evaluator", settings.log_level, settings.log_format)
run(lambda: start(settings), settings.grace_seconds)
