"""Triton kernels of teskd_fast, installed as ``teskd_fast.kernels``.

Importing this package imports Triton; ``teskd_fast`` itself only does so when the triton backend runs.
"""
