"""Tools that maintain the repository (python -m tools.NAME from its root)."""
