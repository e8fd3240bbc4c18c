"""The FP8 GEMM kernel: configuration checks (TileLang only) and sm_90a compile checks (`-m compile`:
nvcc, no GPU) of the generated CUDA: TMA loads into a multi-stage ring fed by a producer
warpgroup, wgmma with FP8 operands, the swizzled rasterization and one dynamic M."""

import re

import pytest

from mate import jit, platform

pytest.importorskip("tilelang")

from mate.ops.gemm import fp8_kernel, fp8_launch, support  # noqa: E402


@pytest.mark.parametrize("kwargs,match", [
    ({"k": 200}, "k must be a positive multiple of 128"),
    ({"n": 100}, "n must be a positive multiple of 8"),
    ({"layout": "ragged"}, "layout must be one of"),
    ({"block_n": 96}, "block_n"),
    ({"block_n": 192}, "block_n"),  # 192 only in the persistent kernel
    ({"block_m": 64, "threads": 256}, "block_m"),
    ({"layout": "masked", "splits": 2}, "splits"),
    ({"block_n": 256, "splits": 2}, "splits"),
    ({"persistent": True, "block_n": 32}, "persistent needs block_n 64, 128, 192 or 256"),
    ({"persistent": True, "splits": 2}, "persistent needs .* no splits"),
])
def test_build_rejects_bad_configs(kwargs, match):
    args = {"n": 256, "k": 512, "layout": "dense"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fp8_kernel.fp8_gemm_kernel(args.pop("n"), args.pop("k"), **args)


def test_kernel_variants_are_supported_dispatch_variants():
    for layout, op in (("dense", support.FP8_GEMM), ("contiguous", support.M_GROUPED_FP8_GEMM),
                       ("masked", support.M_GROUPED_FP8_GEMM)):
        assert not op.support.violations(fp8_launch.kernel_variant(2112, 7168, layout))


@pytest.mark.parametrize("m,n,k,layout,tile", [
    (4096, 7168, 2048, "dense", "p128n256"),
    (4096, 2112, 7168, "dense", "p128n192"),  # 128 x 192 fills the waves of N = 2112
    (4096, 32768, 512, "dense", "p128n192"),  # short K: the deeper ring
    (4096, 24576, 1536, "dense", "p128n256"),
    (1024, 7168, 2048, "masked", "p128n256"),
])
def test_large_m_tile_rule(m, n, k, layout, tile):
    assert fp8_launch.tile_for(m, n, k, layout, 132) == tile


@pytest.mark.parametrize("m,n,k,tile", [
    (64, 7168, 2048, "p64n64"),  # ties with m64n64 (112 tiles): the persistent kernel
    (128, 7168, 2048, "p128n64"),
    (96, 7168, 16384, "p128n64"),
    (128, 24576, 1536, "p128n192"),  # 128 tiles fill more SMs than m128n256's 96
    (16, 24576, 1536, "p64n192"),  # 128-row tiles only from 65 rows on
    (1, 32768, 512, "p64n256"),
    (128, 2112, 7168, "m128n64s4"),
    (64, 4096, 7168, "m64n64s2"),
])
def test_small_m_tile_rule(m, n, k, tile):
    assert fp8_launch.tile_for(m, n, k, "dense", 132) == tile


@pytest.mark.compile
@pytest.mark.parametrize("layout,n,k,tile", [("dense", 2112, 7168, "m128n128"), ("dense", 7168, 2048, "p64n64"),
                                           ("dense", 7168, 2048, "m128n256"), ("contiguous", 4096, 7168, "m128n256"),
                                           ("masked", 7168, 2048, "m128n128"), ("masked", 4096, 7168, "m128n256"),
                                           ("dense", 2112, 7168, "m64n64s4"), ("dense", 7168, 2048, "p128n256"),
                                           ("dense", 2112, 7168, "p128n128"), ("contiguous", 4096, 7168, "p128n256"),
                                           ("masked", 7168, 2048, "p128n256"), ("dense", 2112, 7168, "p128n192"),
                                           ("masked", 2112, 7168, "p128n192"), ("dense", 7168, 2048, "p128n64")])
def test_kernel_compiles_for_sm90a(layout, n, k, tile):
    op = support.FP8_GEMM if layout == "dense" else support.M_GROUPED_FP8_GEMM
    kernel = jit.get_kernel(op.name, fp8_launch.kernel_variant(n, k, layout, tile),
                            platform.tilelang_target("sm_90a"), op.build)
    src = kernel.get_kernel_source()
    assert "tl::tma_load(a_desc" in src and "tl::tma_load(b_desc" in src and "tl::tma_load(sfa_desc" in src
    block_n = fp8_kernel.TILES[tile]["block_n"] % 256 or 128  # 128 x 256 tiles: two 128-column wgmma passes
    assert re.search(r"wgmma_ss<tl::DataType::kFloat8_e4m3, tl::DataType::kFloat8_e4m3, tl::DataType::kFloat32, "
                     rf"64, {block_n}, 32", src)
    assert "warpgroup_reg_dealloc" in src and "warpgroup_reg_alloc" in src  # producer / consumer split
    if tile.startswith("p"):  # persistent: `ctas` CTAs loop over the tiles
        assert "int ctas" in src and "for (int it = 0;" in src
        assert "tl::tma_store_wait<0, true>()" in src  # the stores are waited for one tile later
    else:
        assert "rasterization2DRow" in src
    if tile.endswith("n256"):
        assert src.count("tl::tma_load(b_desc") == 2 and "float acc1[64]" in src  # one B tile and accumulator per half
    splits = fp8_kernel.TILES[tile].get("splits", 1)
    assert f"kb < {k // 128 // splits}" in src  # the K loop has a compile-time trip count
    if splits > 1:  # the last CTA of a tile (counted atomically after a fence) sums the splits
        assert "__threadfence();" in src and "AtomicAddRet(" in src
    assert "int M" in src  # M is a runtime argument
    if layout == "masked" and not tile.startswith("p"):
        assert "tl::tma_store" not in src  # rows past masked_m are not written
    elif layout == "masked":  # a group's last, partial block is stored row-guarded, full ones by TMA
        assert "tl::tma_store(d_desc" in src and "if (rows < 128)" in src
    else:
        assert "tl::tma_store(d_desc" in src


@pytest.mark.compile
@pytest.mark.parametrize("major_a,major_b,out_dtype,tile", [("K", "K", "bfloat16", "m128n256"),
                                                          ("MN", "MN", "float32", "m128n256"),
                                                          ("K", "MN", "float16", "m64n128"),
                                                          ("K", "K", "bfloat16", "m128n192")])
def test_bf16_kernel_compiles_for_sm90a(major_a, major_b, out_dtype, tile):
    import torch

    from mate.ops.gemm import bf16_kernel, bf16_launch

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    ab = torch.float16 if out_dtype == "float16" else torch.bfloat16
    variant = bf16_launch.variant(ab, major_a, major_b, dtypes[out_dtype], False, 2048, 7168)
    variant.update(n=2048, k=7168, tile=tile)
    op = support.BF16_GEMM
    kernel = jit.get_kernel(op.name, variant, platform.tilelang_target("sm_90a"), op.build)
    src = kernel.get_kernel_source()
    assert "tl::tma_load(a_desc" in src and "tl::tma_load(b_desc" in src
    assert "warpgroup_reg_alloc" in src and "kb < 112" in src  # warp-specialized; static K loop (7168 / 64)
    block_n = 128 if out_dtype == "float32" else bf16_kernel.TILES[tile]["block_n"]
    dtype = "kFloat16" if ab == torch.float16 else "kBFloat16"
    assert re.search(rf"wgmma_ss<tl::DataType::{dtype}, tl::DataType::{dtype}, tl::DataType::kFloat32, "
                     rf"64, {block_n}, 16", src)
    assert "tl::tma_store(d_desc" in src
    assert bf16_kernel.TILES[tile]
