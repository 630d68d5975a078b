"""TA-OPD core: teachability statistics, normalization, selectors, budget, losses, metrics.

The core is every module directly in this package (statistics, normalization, selectors, budget,
selection, losses, metrics, forward KL, teacher outputs, vocabulary, rollout alignment): it imports
torch and numpy only (``rollout``/``vocab`` take Hugging Face objects as arguments) and never
verl, Ray, vLLM, pandas or matplotlib (``tests/test_layering.py``). ``ta_opd.tools`` sits beside
it and may import it, never the other way round: the fixed-context diagnostic, the toy task and
pair, the selector demo. The numerical contract is ``docs/spec.md``; equation numbers refer to
arXiv 2605.26844.

Shapes (``docs/spec.md``, "Shapes"): B sequences, R response tokens, P prompt width, S = P + R,
V vocabulary, K student support (``topk``), K' teacher's shipped top-K' (``teacher_topk``), N
flattened positions (n: a chunk), M extra ids per position. T is the teacher, never a shape.
"""

from ta_opd.budget import BudgetResult, budget_count, select_budget
from ta_opd.config import TAConfig
from ta_opd.errors import TAConfigError, TAInputError
from ta_opd.losses import LossInputs, LossOutput, aggregate, available_losses, compute_loss, register_loss
from ta_opd.normalize import apply_range, quantile_range, quantiles, robust_normalize
from ta_opd.select import Normalized, Selection, normalize_batch, select_positions
from ta_opd.selectors import available_selectors, get_selector, register_selector
from ta_opd.stats import (PositionStats, StudentTopK, dense_position_stats, sparse_position_stats, student_topk,
                          topk_position_stats)

__version__ = "0.1.0"

__all__ = [
    "TAConfig", "TAConfigError", "TAInputError",
    "PositionStats", "dense_position_stats", "sparse_position_stats", "StudentTopK", "student_topk",
    "topk_position_stats",
    "quantiles", "quantile_range", "apply_range", "robust_normalize",
    "available_selectors", "get_selector", "register_selector",
    "budget_count", "select_budget", "BudgetResult",
    "Normalized", "Selection", "normalize_batch", "select_positions",
    "LossInputs", "LossOutput", "aggregate", "available_losses", "compute_loss", "register_loss",
]
