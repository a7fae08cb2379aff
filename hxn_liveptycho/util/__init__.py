"""Leaf helpers used across the package; they import nothing else from it but ``errors``."""
