"""Operator families; importing this package registers every family's ops with dispatch."""

from mate.ops import fmha  # noqa: F401
from mate.ops.gemm import support as _gemm_support  # noqa: F401
