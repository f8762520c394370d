"""Vitrine's foundation: catalogs, the model bundle runtime (onnxruntime), product embedding,
scoring, evaluation, the typed seams between layers, and the `vitrine` command host.

Imports no other first-party package: `trainer` and `indexer` build on it, `search` on all three.
"""
__version__ = "0.1.0"
