"""TileLang pieces the GEMM kernels share (FP8 and BF16, :mod:`fp8_kernel`, :mod:`bf16_kernel`):
which B group and how many rows a block of A rows has under each M-grouped layout, the order in
which the persistent kernels walk their tiles, and the store of a finished output tile."""

import tilelang.language as T


def group_of(layout: str, aux, m0, bz):
    """The B group (expert) of the row block at m0 of A group bz: contiguous reads m_indices
    (padding rows, -1, use group 0; they are written as zeros), masked has one per A group."""
    if layout == "contiguous":
        return T.max(aux[m0], 0)
    return bz if layout == "masked" else 0


def rows_of(layout: str, aux, M, m0, bz):
    """Rows of the block at m0 to compute and store (masked: up to masked_m of the group)."""
    return T.min(aux[bz], M) - m0 if layout == "masked" else M - m0


def panel_tile(t, m_blocks, n_blocks: int, panel: int):
    """(N block, M block) of the t-th tile of an m_blocks x n_blocks grid in the persistent order:
    panels of `panel` M blocks, walked M block first within a panel (tiles in flight together
    share B columns and A rows in L2)."""
    per_panel = panel * n_blocks
    rows = T.min(panel, m_blocks - t // per_panel * panel)
    return t % per_panel // rows, t // per_panel * panel + t % per_panel % rows


@T.macro
def store_tile(d, d_s, bz, m0, n0, rows, n, masked: bool, block_m: int, width: int):
    """D[bz, m0:m0 + block_m, n0:n0 + width] = the staged tile d_s. Masked layouts write only rows
    below masked_m (and columns below n): D's other rows belong to the caller. Otherwise one copy
    (a TMA store, clipped to D's bounds)."""
    if masked:
        for i, j in T.Parallel(block_m, width):
            if i < rows and n0 + j < n:
                d[bz, m0 + i, n0 + j] = d_s[i, j]
    else:
        T.copy(d_s, d[bz, m0:m0 + block_m, n0:n0 + width])
