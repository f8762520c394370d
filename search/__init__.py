"""Vitrine's serving side: catalogs, runtime encoders, evaluation and the HTTP service.

Imports nothing from torch: everything here runs on numpy, onnxruntime and faiss.
"""
__version__ = "0.1.0"
