"""Operator families; importing this package registers every family's ops with dispatch."""

from mate.ops import fmha  # noqa: F401
