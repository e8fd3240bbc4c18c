"""The TileLang forward (prefill) kernel: configuration checks (need TileLang only) and compile
checks for sm_90a (`-m compile`: need nvcc, no GPU), which look at the structure of the CUDA
source: warp specialization, TMA loads, wgmma with both operand kinds, ping-pong barriers."""

import re
import time

import pytest

from mate import jit, platform

pytest.importorskip("tilelang")

from mate.ops.fmha import forward_kernel  # noqa: E402

OP = "fmha.flash_attn_fwd"
HEAD_DIMS = [(64, 64), (96, 96), (128, 128), (192, 192), (192, 128), (256, 256)]


def variant(dtype="bfloat16", head_dim=128, head_dim_v=128, causal=False, has_window=False, has_softcap=False,
            **extra):
    return {"dtype": dtype, "head_dim": head_dim, "head_dim_v": head_dim_v, "causal": causal,
            "has_window": has_window, "has_softcap": has_softcap, **extra}


@pytest.mark.parametrize("head_dim,head_dim_v", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_default_configs_fit_the_chip(head_dim, head_dim_v, causal):
    cfg = forward_kernel.default_config(head_dim, head_dim_v, causal)
    assert cfg.block_m in (128, 192) and cfg.block_n % 16 == 0
    assert forward_kernel.shared_memory_bytes(head_dim, head_dim_v, cfg) <= 227 * 1024
    forward_kernel.build("bfloat16", head_dim, head_dim_v, causal, False, False)  # builds the IR


@pytest.mark.parametrize("kwargs,match", [
    ({"dtype": "float32"}, "dtype"),
    ({"head_dim": 100, "head_dim_v": 100}, "head dims"),
    ({"head_dim": 512, "head_dim_v": 512}, "head dims"),
    ({"block_m": 96}, "block_m"),
    ({"block_n": 24}, "block_n"),
    ({"head_dim": 256, "head_dim_v": 256, "block_n": 256}, "shared memory"),
])
def test_build_rejects_bad_configs(kwargs, match):
    args = variant()
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        forward_kernel.build(**args)


def test_launch_argument_order_and_empty_calls():
    calls = []
    fake = lambda *args: calls.append(args)  # noqa: E731

    class Cu:
        shape = (3,)

    cu_q, lse = Cu(), ["lse row 0"]
    forward_kernel.launch(fake, "q", "k", "v", cu_q, "cuk", 77, "out", lse, 0.125, (5, -1), 30.0)
    # Kernels built without seqused / sink get placeholders of the right kinds (never read).
    assert calls == [("q", "k", "v", cu_q, "cuk", cu_q, "cuk", "out", lse, "lse row 0", "cuk", lse, lse, lse, 77,
                      0.125, 5, -1, 30.0)]
    forward_kernel.launch(fake, "q", "k", "v", cu_q, "cuk", 9, "out", lse, 0.5, seqused_q="uq", seqused_k="uk",
                          sink="sink", v_block="vb", descales=("qd", "kd", "vd"))
    assert calls[1] == ("q", "k", "v", cu_q, "cuk", "uq", "uk", "out", lse, "sink", "vb", "qd", "kd", "vd", 9, 0.5,
                        -1, -1, 0.0)
    forward_kernel.launch(fake, "q", "k", "v", cu_q, "cuk", 0, "out", lse, 0.125)  # nothing to do
    assert len(calls) == 2


# A small matrix: each sm_90a compile takes 20-70 s on two cores.
COMPILE_VARIANTS = [
    pytest.param(variant(), id="bf16-d128"),
    pytest.param(variant("float16", 64, 64, causal=True), id="fp16-d64-causal"),
    pytest.param(variant("bfloat16", 192, 128, has_window=True, has_softcap=True), id="bf16-d192x128-local-softcap"),
    pytest.param(variant(causal=True, has_seqused=True, has_sink=True), id="bf16-d128-causal-seqused-sink"),
]


@pytest.mark.compile
@pytest.mark.parametrize("var", COMPILE_VARIANTS)
def test_kernel_compiles_for_sm90a(var):
    start = time.perf_counter()
    kernel = jit.get_kernel(OP, var, platform.tilelang_target("sm_90a"), forward_kernel.build)
    seconds = time.perf_counter() - start
    src = kernel.get_kernel_source()
    cfg = forward_kernel.default_config(var["head_dim"], var["head_dim_v"], var["causal"], var["has_window"],
                                        var["has_softcap"])
    dtype = {"bfloat16": "kBFloat16", "float16": "kFloat16"}[var["dtype"]]

    # One kernel, warp-specialized: producer warpgroup + block_m / 64 consumer warpgroups.
    assert f"__launch_bounds__({cfg.threads}, 1)" in src
    assert "tl::warpgroup_reg_dealloc<24>" in src or "setmaxnreg.dec" in src or "set_max_nreg" in src
    # Q, K, V arrive by TMA (tensor maps passed as __grid_constant__ kernel parameters) on mbarriers.
    for name in ("q_desc", "k_desc", "v_desc"):
        assert f"__grid_constant__ const CUtensorMap {name}" in src
    assert src.count("tl::tma_load(") >= 3
    # S = Q K^T from shared memory, O += P V with P in registers, fp32 accumulators.
    assert re.search(rf"wgmma_ss<tl::DataType::{dtype}, tl::DataType::{dtype}, tl::DataType::kFloat32, 64, "
                     rf"{cfg.block_n}, 16", src)
    assert re.search(rf"wgmma_rs<tl::DataType::{dtype}, tl::DataType::{dtype}, tl::DataType::kFloat32, 64, "
                     rf"{var['head_dim_v']}, 16", src)
    # The softmax overlaps the P V gemm (wait for all but one wgmma group).
    assert "wait_wgmma<1>" in src
    # Ping-pong of the consumer warpgroups on named barriers.
    if cfg.consumers > 1:
        assert "__named_barrier_arrive" in src
    # Sizes are runtime values: one kernel serves every batch and sequence length.
    for name in ("int max_seqlen_q", "int batch_plus_1", "int total_q"):
        assert name in src
    if var["has_softcap"]:
        assert "tanh.approx.f32" in src
    if var.get("has_seqused"):
        assert "seqused_q[" in src and "seqused_k[" in src
    if var.get("has_sink"):
        assert "sink[" in src
    # The mask is applied only to blocks that straddle a boundary.
    assert src.count("-CUDART_INF_F") >= 2
    print(f"compile {var}: {seconds:.1f} s")
