"""Build configuration, as upstream's setup.py generates it into `flash_attn_config.py`.

MATE has no build flags of its own; this records what the MATE wrapper serves in upstream's
terms: every feature of the forward pass, and no backward.
"""

CONFIG = {
    "build_flags": {
        "FLASHATTENTION_DISABLE_BACKWARD": True,
        "FLASHATTENTION_DISABLE_SPLIT": False,
        "FLASHATTENTION_DISABLE_PAGEDKV": False,
        "FLASHATTENTION_DISABLE_APPENDKV": False,
        "FLASHATTENTION_DISABLE_LOCAL": False,
        "FLASHATTENTION_DISABLE_SOFTCAP": False,
        "FLASHATTENTION_DISABLE_PACKGQA": False,
        "FLASHATTENTION_DISABLE_FP16": False,
        "FLASHATTENTION_DISABLE_FP8": False,
        "FLASHATTENTION_DISABLE_VARLEN": False,
        "FLASHATTENTION_DISABLE_CLUSTER": False,
        "FLASHATTENTION_DISABLE_HDIM64": False,
        "FLASHATTENTION_DISABLE_HDIM96": False,
        "FLASHATTENTION_DISABLE_HDIM128": False,
        "FLASHATTENTION_DISABLE_HDIM192": False,
        "FLASHATTENTION_DISABLE_HDIM256": False,
        "FLASHATTENTION_DISABLE_SM8x": False,
        "FLASHATTENTION_ENABLE_VCOLMAJOR": False,
        "FLASH_ATTENTION_DISABLE_HDIMDIFF64": False,
        "FLASH_ATTENTION_DISABLE_HDIMDIFF192": False,
    }
}


def show():
    from pprint import pprint

    pprint(CONFIG)
