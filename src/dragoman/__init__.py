"""Dragoman: a lockless, Redis-backed scheduler for real-time speech-translation networks."""

__version__ = "0.1.0"
__all__ = ["__version__"]
