"""deep_gemm.utils: scale-factor layouts and FP8 casts (upstream's deep_gemm/utils)."""

from . import layout, math  # noqa: F401
from .layout import *  # noqa: F401,F403
from .math import *  # noqa: F401,F403

get_m_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout  # noqa: F405
get_k_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout  # noqa: F405
