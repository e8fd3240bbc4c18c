"""`from flash_attn_3 import flash_attn_interface`: the top-level `flash_attn_interface` module
under the package name, with the low-level forward/backward as upstream exposes them."""

import flash_attn_interface as _interface
from flash_attn_interface import *  # noqa: F403
from flash_attn_interface import __all__  # noqa: F401

_flash_attn_forward = _interface._flash_attn_forward
_flash_attn_backward = _interface._flash_attn_backward
