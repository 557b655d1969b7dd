"""rnnkit.models: heads and whole models (each engineer adds the imports of their modules)."""
from .forecaster import Forecaster, ForecasterConfig
