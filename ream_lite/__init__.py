"""ream-lite: compress Mixture-of-Experts checkpoints layer by layer, streaming, on hardware people own."""

__version__ = "0.1.0"
