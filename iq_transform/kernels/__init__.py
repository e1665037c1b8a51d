"""Execution paths: the spike-free static model run in real low-bit kernels.

It sits above the method and the checkpoint export (it converts what they
produce) and below evaluation and composition (which run what it converts).
"""
