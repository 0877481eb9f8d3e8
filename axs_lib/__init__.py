"""Axion-Sat: bit-exact reproducible PyTorch training for SAR-to-optical translation."""

__version__ = "0.1.0"
