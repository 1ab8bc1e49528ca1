"""Triton kernels of fastshare, installed as ``fastshare.kernels`` (never a top-level ``kernels``).

Importing a submodule imports Triton; ``import fastshare`` never does.
"""
