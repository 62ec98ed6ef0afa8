"""Triton kernels and their launchers, installed as ``maskkern.triton_kernels``.

Import only where Triton is wanted: the launchers need ``triton`` and, on CPU, TRITON_INTERPRET=1
set before this package is imported.
"""
