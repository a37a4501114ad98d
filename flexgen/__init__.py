"""flexgen: high-throughput offline generation for large language models on one small accelerator."""

from flexgen.engine import FlexGenModel, GenerationStats, load_model
from flexgen.errors import FlexGenError
from flexgen.policy import Policy

__all__ = ["FlexGenError", "FlexGenModel", "GenerationStats", "Policy", "load_model"]
__version__ = "0.2.0.dev0"
