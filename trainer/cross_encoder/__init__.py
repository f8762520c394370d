"""The reranker: a FashionBERT-style cross-encoder over (query, title, image patches), trained with
KG-FLIP's attribute guidance and distilled to two layers. Mirrors the dual-encoder modules of `trainer`."""
