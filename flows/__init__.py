"""Prefect flows: thin tasks over rlsc stage functions (rlsc never imports this package)."""
