"""Vitrine's top layer: the HTTP service (FastAPI), its web page and `vitrine demo`.

Imports `indexer` and `vitrine`; the demo reaches `trainer` only lazily, for its quick training.
Never imports torch.
"""
__version__ = "0.1.0"
