"""Our own GPU ops, each with a pure-PyTorch reference that is also the CPU fallback.

This package never imports sam3d_core.
"""
