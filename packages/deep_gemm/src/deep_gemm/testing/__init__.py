"""deep_gemm.testing: the similarity metric upstream's tests use."""

from mate.ops.gemm.reference import calc_diff  # noqa: F401

__all__ = ["calc_diff"]
