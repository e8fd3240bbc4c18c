"""`from flash_attn_3 import flash_attn_config`: the top-level build configuration module."""

from flash_attn_config import *  # noqa: F403
from flash_attn_config import CONFIG, show  # noqa: F401
