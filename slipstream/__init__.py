"""Slipstream: train large language models fast on PyTorch."""

__version__ = "0.1.0"
