"""Policy optimizer: hardware profiles, a cost model, and a linear-program policy search.

    hw = load_hardware("t4")              # or a JSON path; flexgen.calibrate.measure_hardware(dir) measures
    est = estimate(args_from_name("opt-30b"), policy, 512, 32, hw)   # models.registry
    policy, est = search(args_from_name("llama-3-70b"), 512, 32, hw,
                         gpu_mem=16 * GIB, cpu_mem=200 * GIB, disk_mem=1500 * GIB)
    print(format_estimate(est))
"""

from flexgen.optimizer.cost_model import (DEFAULT_ENGINE, GIB, BlockModel, EngineConstants, Estimate,
                                          estimate, fractions_of, original_weight_split)
from flexgen.optimizer.hardware import (HardwareProfile, default_profile_path, load_hardware)
from flexgen.optimizer.report import format_estimate
from flexgen.optimizer.solver import Budgets, SearchResult, check_budgets, search, search_detailed

__all__ = [
    "GIB", "HardwareProfile", "load_hardware", "default_profile_path",
    "Estimate", "estimate", "BlockModel", "EngineConstants", "DEFAULT_ENGINE", "fractions_of",
    "original_weight_split", "Budgets", "check_budgets", "search", "search_detailed",
    "SearchResult", "format_estimate",
]
