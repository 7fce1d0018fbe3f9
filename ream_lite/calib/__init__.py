"""Calibration and evaluation text: sources, tokenization, windows."""
