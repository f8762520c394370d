"""Vitrine's trainer: dual-encoder models, losses and concept knowledge (the only torch package)."""
