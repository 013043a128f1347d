"""The service: watching, claiming, scheduling, reporting (never imports torch at module level)."""
