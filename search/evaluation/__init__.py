"""Model-agnostic evaluation: cross-modal retrieval protocols and product search metrics.

Names load on first use so `vitrine --help` does not pay for numpy/PIL/matplotlib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from search.lazy import lazy_exports

_EXPORTS = {
    "Encoder": "search.evaluation.encoder",
    "EncoderError": "search.evaluation.encoder",
    "load_encoder": "search.evaluation.encoder",
    "EvalConfig": "search.evaluation.evaluator",
    "run_evaluation": "search.evaluation.evaluator",
    "SampleRetrievalEvaluator": "search.evaluation.evaluator",
    "FullRetrievalEvaluator": "search.evaluation.evaluator",
    "TextToProductEvaluator": "search.evaluation.evaluator",
    "ImageToProductEvaluator": "search.evaluation.evaluator",
    "RetrievalSet": "search.evaluation.protocols",
    "blend_product_embs": "search.evaluation.product_search",
    "weighted_t2p": "search.evaluation.product_search",
    "weighted_i2p": "search.evaluation.product_search",
    "write_report": "search.evaluation.report",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from search.evaluation.encoder import Encoder, EncoderError, load_encoder
    from search.evaluation.evaluator import (
        EvalConfig,
        FullRetrievalEvaluator,
        ImageToProductEvaluator,
        SampleRetrievalEvaluator,
        TextToProductEvaluator,
        run_evaluation,
    )
    from search.evaluation.product_search import blend_product_embs, weighted_i2p, weighted_t2p
    from search.evaluation.protocols import RetrievalSet
    from search.evaluation.report import write_report


__getattr__ = lazy_exports(__name__, _EXPORTS)
