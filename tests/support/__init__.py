"""Helpers shared by test modules (not part of the package)."""
