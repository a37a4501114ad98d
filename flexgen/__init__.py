"""flexgen: high-throughput offline generation for large language models on one small accelerator."""

from flexgen.engine import FlexGenModel, GenerationStats, load_model
from flexgen.errors import FlexGenError
from flexgen.llm import LLM, BlockInfo, RequestOutput, SamplingParams, TokenLogprob
from flexgen.policy import Policy

__all__ = ["BlockInfo", "FlexGenError", "FlexGenModel", "GenerationStats", "LLM", "Policy", "RequestOutput",
           "SamplingParams", "TokenLogprob", "load_model"]
__version__ = "0.2.0.dev0"
