"""Triton decode kernels and their torch references."""
