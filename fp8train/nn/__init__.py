"""Autograd functions and drop-in modules (FP8Linear, grouped experts, MoE)."""
__all__: list[str] = []
