"""Simulated DSA-110 groups with known truth (see core.py)."""

from .core import FAULT_KINDS, PRESETS, simulate_groups

__all__ = ["FAULT_KINDS", "PRESETS", "simulate_groups"]
