"""HTTP routers, one per area: search, products, health (and metrics)."""
