"""FlashAttention-3 (`flash_attn_3`), served by MATE.

As upstream, `from flash_attn_3 import flash_attn_interface` gives the interface module; the
public functions are also importable from the package itself.
"""

from importlib.metadata import PackageNotFoundError, version

from flash_attn_interface import (
    FlashAttnFunc,
    FlashAttnQKVPackedFunc,
    FlashAttnVarlenFunc,
    flash_attn_combine,
    flash_attn_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    get_scheduler_metadata,
)

try:
    __version__ = version("flash_attn_3")
except PackageNotFoundError:  # running from a source tree
    __version__ = "3.0.0"

__all__ = [
    "FlashAttnFunc",
    "FlashAttnQKVPackedFunc",
    "FlashAttnVarlenFunc",
    "__version__",
    "flash_attn_combine",
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "get_scheduler_metadata",
]
