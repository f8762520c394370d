"""Model-agnostic evaluation: cross-modal retrieval protocols and product search metrics.

Names load on first use so `vitrine --help` does not pay for numpy/PIL/matplotlib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vitrine.lazy import lazy_exports

_EXPORTS = {
    "Encoder": "vitrine.protocols",
    "Evaluator": "vitrine.evaluation.evaluator",
    "EncoderError": "vitrine.evaluation.encoder",
    "load_encoder": "vitrine.evaluation.encoder",
    "EvalConfig": "vitrine.evaluation.evaluator",
    "run_evaluation": "vitrine.evaluation.evaluator",
    "SampleRetrievalEvaluator": "vitrine.evaluation.evaluator",
    "FullRetrievalEvaluator": "vitrine.evaluation.evaluator",
    "TextToProductEvaluator": "vitrine.evaluation.evaluator",
    "ImageToProductEvaluator": "vitrine.evaluation.evaluator",
    "RetrievalSet": "vitrine.evaluation.protocols",
    "write_report": "vitrine.evaluation.report",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from vitrine.evaluation.encoder import EncoderError, load_encoder
    from vitrine.evaluation.evaluator import (
        EvalConfig,
        Evaluator,
        FullRetrievalEvaluator,
        ImageToProductEvaluator,
        SampleRetrievalEvaluator,
        TextToProductEvaluator,
        run_evaluation,
    )
    from vitrine.evaluation.protocols import RetrievalSet
    from vitrine.evaluation.report import write_report
    from vitrine.protocols import Encoder


__getattr__ = lazy_exports(__name__, _EXPORTS)
