"""The split-KV decode kernel (flash_attn_with_kvcache without append): host heuristics (CPU),
compile checks for sm_90a (`-m compile`: nvcc, no GPU) and the kernel vs the reference on the GPU
(`-m gpu`), with upstream's tolerance rule (as in test_attention_kernel.py)."""

import time

import pytest

pytest.importorskip("tilelang")

import torch  # noqa: E402

from mate import jit, platform, testing  # noqa: E402
from mate.ops.fmha import decode_kernel, reference  # noqa: E402
from mate.ops.fmha.attention import DECODE  # noqa: E402
from mate.testing import kernels as kernel_checks  # noqa: E402

ATOL = {torch.bfloat16: 4e-3, torch.float16: 5e-4}


# ---- host side (CPU) ------------------------------------------------------------------------

def test_num_splits_heuristic():
    # Grid already fills the GPU: no split (the bench shape: 128 x 8 kv heads).
    assert decode_kernel.num_splits_heuristic(128, 8, 1, 8192, 128, 132) == 1
    # One sequence, one kv head, long cache: many splits, bounded by the key blocks and the cap.
    n = decode_kernel.num_splits_heuristic(1, 1, 1, 8192, 128, 132)
    assert 1 < n <= min(decode_kernel.MAX_SPLITS, 8192 // 64)
    # Never more splits than key blocks.
    assert decode_kernel.num_splits_heuristic(1, 1, 1, 100, 128, 132) <= 2
    assert decode_kernel.num_splits_heuristic(1, 1, 1, 1, 128, 132) == 1
    # FP8 at d = 128 counts its 128-key blocks: no more splits than those.
    assert decode_kernel.num_splits_heuristic(1, 1, 1, 200, 128, 132, fp8=True) <= 2


def test_varlen_tile_map():
    # Sequences of 1, 2, 0, 8 and 200 queries, 8 query heads per kv head: 64-row tiles of q * 8 rows.
    cu_seqlens_q = torch.tensor([0, 1, 3, 3, 11, 211], dtype=torch.int32)
    tile_seq, tile_row = decode_kernel._varlen_tiles(cu_seqlens_q, 8, 211, 200)
    tiles = [(seq, row) for seq, row in zip(tile_seq.tolist(), tile_row.tolist(), strict=True) if seq < 5]
    assert tiles == [(0, 0), (1, 0), (3, 0)] + [(4, 64 * t) for t in range(25)]
    # The map has a static length (no host sync): ceil(211 * 8 / 64) + batch entries; the rest is past the end.
    assert tile_seq.shape == (-(-211 * 8 // 64) + 5,) and tile_seq[len(tiles):].eq(5).all()


def test_varlen_tile_map_of_decode_is_one_tile_per_sequence():
    # At most 64 rows per sequence (8 queries x 8 heads): tile t is sequence t from row 0, an empty
    # sequence included (its tile writes nothing), from cached vectors.
    cu_seqlens_q = torch.tensor([0, 1, 9, 9, 12], dtype=torch.int32)
    tile_seq, tile_row = decode_kernel._varlen_tiles(cu_seqlens_q, 8, 12, 8)
    assert tile_seq.tolist() == [0, 1, 2, 3] and tile_row.tolist() == [0, 0, 0, 0]
    again, _ = decode_kernel._varlen_tiles(torch.tensor([0, 1, 2], dtype=torch.int32), 4, 2, 1)
    assert again.tolist() == [0, 1] and again.data_ptr() == tile_seq.data_ptr()


def test_build_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dtype"):
        decode_kernel.build("float32", 128, True, False)
    with pytest.raises(ValueError, match="head_dim"):
        decode_kernel.build("bfloat16", 96, True, False)
    with pytest.raises(ValueError, match="qv needs"):
        decode_kernel.build("bfloat16", 128, True, False, head_dim_v=512, qv=True)
    with pytest.raises(ValueError, match="qv needs"):
        decode_kernel.build("float8_e4m3fn", 64, True, False, head_dim_v=512, qv=True)
    with pytest.raises(ValueError, match="head_dim_v equal"):
        decode_kernel.build("bfloat16", 64, True, False, head_dim_v=512)


# ---- host side: what launch hands the kernel (CPU, fake GPU, kernels recorded) --------------------

def _recorded_launch(monkeypatch, *args, **kwargs):
    """Run decode_kernel.launch with the kernel and the combine replaced by recorders; returns the
    kernel call and the combine's arguments (None when the kernel wrote the output itself)."""
    from mate.ops.fmha import api as fmha_api

    kernels = kernel_checks.record_kernel_calls(monkeypatch)
    combines = []
    monkeypatch.setattr(fmha_api, "combine_into", lambda *combine_args: combines.append(combine_args))
    decode_kernel.launch(*args, **kwargs)
    (kernel,) = kernels
    assert len(combines) <= 1
    return kernel, combines[0] if combines else None


def _assert_combine_views(combine_args):
    out_partial, lse_partial, out, lse, laid_out, _ = combine_args
    assert laid_out  # fresh partials, contiguous outputs: the layout is not checked again
    assert lse_partial.shape == out_partial.shape[:-1] and out.shape == out_partial.shape[1:]
    assert lse.shape == out.shape[:-1]


LAUNCH_CASES = {
    "paged-bf16": dict(dtype=torch.bfloat16, paged=True),
    "dense-fp16-sink-leftpad-batch_idx": dict(dtype=torch.float16, paged=False, sink=True, leftpad=True,
                                              batch_idx=True),
    "varlen-local-softcap-cp": dict(dtype=torch.bfloat16, paged=True, varlen=True, local=True),
    "fp8-descales": dict(dtype=torch.float8_e4m3fn, paged=True, descales=True),
    "fp8-default-descales": dict(dtype=torch.float8_e4m3fn, paged=False),
    "qv-paged": dict(dtype=torch.bfloat16, paged=True, qv=True),
    "qv-dense-varlen": dict(dtype=torch.float16, paged=False, qv=True, varlen=True),
}


@pytest.mark.parametrize("num_splits", [1, 2])
@pytest.mark.parametrize("case", LAUNCH_CASES)
def test_launch_arguments_match_the_kernel_signature(monkeypatch, case, num_splits):
    opts = LAUNCH_CASES[case]
    dtype, batch, heads_q, heads_k, d = opts["dtype"], 3, 8, 2, 128
    dv = d
    if opts.get("qv"):
        d, dv = 64, 512
    k = torch.randn(6, 16, heads_k, d).to(dtype)
    page_table = torch.arange(6, dtype=torch.int32).view(3, 2) if opts["paged"] else None
    if not opts["paged"]:
        k = torch.randn(batch, 32, heads_k, d).to(dtype)
    v = torch.randn(*k.shape[:-1], dv).to(dtype)
    kwargs = {}
    if opts.get("varlen"):
        q = torch.randn(7, heads_q, d).to(dtype)
        kwargs.update(cu_seqlens_q=torch.tensor([0, 1, 3, 7], dtype=torch.int32), max_seqlen_q=4)
        out, lse = torch.empty(7, heads_q, dv, dtype=dtype), torch.empty(heads_q, 7)
    else:
        q = torch.randn(batch, 2, heads_q, d).to(dtype)
        out = torch.empty(*q.shape[:-1], dv, dtype=torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype)
        lse = torch.empty(batch, heads_q, 2)
    if opts.get("qv"):
        kwargs["qv"] = torch.randn(*q.shape[:-1], dv).to(dtype)
    if opts.get("sink"):
        kwargs["learnable_sink"] = torch.randn(heads_q)
    if opts.get("leftpad"):
        kwargs["cache_leftpad"] = torch.tensor([1, 0, 2], dtype=torch.int32)
    if opts.get("batch_idx"):
        kwargs["cache_batch_idx"] = torch.tensor([2, 0, 1], dtype=torch.int32)
    if opts.get("local"):
        kwargs.update(window=(5, 0), attention_chunk=8, softcap=3.0, cp_world_size=2, cp_rank=1,
                      cp_tot_seqused_k=torch.tensor([40, 9, 20], dtype=torch.int32))
    if opts.get("descales"):
        kwargs.update(q_descale=torch.rand(batch, heads_k), k_descale=torch.rand(batch, heads_k),
                      v_descale=torch.rand(batch, heads_k))
    cache_seqlens = torch.tensor([20, 4, 9], dtype=torch.int32)
    kernel, combine = _recorded_launch(monkeypatch, q, k, v, page_table, cache_seqlens, d ** -0.5, True, out, lse,
                                       num_splits=num_splits, **kwargs)
    kernel_checks.assert_call_matches_signature(kernel)
    # One split: the kernel writes out and lse in place (no combine).
    assert kernel.variant["split_kv"] == (num_splits > 1) and (combine is None) == (num_splits == 1)
    if combine is None:  # out_partial and lse_partial, 11th and 10th from the end, are out and lse
        assert (kernel.args[-11].data_ptr(), kernel.args[-10].data_ptr()) == (out.data_ptr(), lse.data_ptr())
    else:
        _assert_combine_views(combine)


@pytest.mark.parametrize("paged", [False, True])
def test_qv_api_calls_take_the_decode_kernel(monkeypatch, paged):
    # On a (fake) GPU, qv calls run the decode kernel whatever their query count, fixed-length or
    # packed keys; the arguments fit its signature.
    from mate.mha_interface import flash_attn_varlen_func, flash_attn_with_kvcache

    kernels = kernel_checks.record_kernel_calls(monkeypatch)
    gen = testing.generator(f"qv-route{paged}")
    q, qv = torch.randn(2, 20, 8, 64, generator=gen).bfloat16(), torch.randn(2, 20, 8, 512, generator=gen).bfloat16()
    k, v = torch.randn(4, 16, 1, 64, generator=gen).bfloat16(), torch.randn(4, 16, 1, 512, generator=gen).bfloat16()
    page_table = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32) if paged else None
    if not paged:
        k, v = k.view(2, 32, 1, 64), v.view(2, 32, 1, 512)
    flash_attn_with_kvcache(q, k, v, cache_seqlens=torch.tensor([30, 20], dtype=torch.int32), page_table=page_table,
                           qv=qv, causal=True)
    cu = torch.tensor([0, 20, 40], dtype=torch.int32)
    flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1)[:40], v.flatten(0, 1)[:40], cu, cu, 20, 20,
                           qv=qv.flatten(0, 1))
    decodes = [call for call in kernels if call.op == DECODE.name]
    assert len(decodes) == 2 and all(call.variant["qv"] and call.variant["head_dim_v"] == 512 for call in decodes)
    for call in decodes:
        kernel_checks.assert_call_matches_signature(call)


@pytest.mark.parametrize("seqlen_q, table_width, kernel", [(1, 4, "decode"), (8, 4, "decode"), (40, 16, "decode"),
                                                      (64, 16, "prefill"), (64, 4, "prefill")])
def test_paged_calls_dominated_by_prefill_take_the_prefill_kernel(monkeypatch, seqlen_q, table_width, kernel):
    # Rule: the prefill kernel over a gathered copy when the queries are >= 1/4 of the copy's rows
    # (2 sequences x table width x 16-token pages), else the decode kernel on the pages.
    from mate.mha_interface import flash_attn_with_kvcache
    from mate.ops.fmha.attention import FWD

    kernels = kernel_checks.record_kernel_calls(monkeypatch)
    gen = testing.generator(f"paged-route{seqlen_q}{table_width}")
    q = torch.randn(2, seqlen_q, 4, 128, generator=gen).bfloat16()
    k, v = (torch.randn(2 * table_width, 16, 2, 128, generator=gen).bfloat16() for _ in range(2))
    page_table = torch.randperm(2 * table_width, generator=gen).view(2, table_width).to(torch.int32)
    flash_attn_with_kvcache(q, k, v, cache_seqlens=torch.tensor([16 * table_width, 70], dtype=torch.int32),
                            page_table=page_table, causal=True)
    assert kernels[0].op == (DECODE.name if kernel == "decode" else FWD.name)


@pytest.mark.parametrize("feature", ["attention_chunk", "context_parallel"])
def test_prefill_features_only_the_decode_kernel_has_run_on_it(monkeypatch, feature):
    # Prefill-size bf16 calls with attention chunks (Llama 4) or context parallelism: the prefill
    # kernel lacks them, the decode kernel serves them at any query count (dense or packed keys).
    from mate.mha_interface import flash_attn_varlen_func

    kernels = kernel_checks.record_kernel_calls(monkeypatch)
    gen = testing.generator(f"prefill-on-decode{feature}")
    q, k, v = (torch.randn(40, 8, 128, generator=gen).bfloat16() for _ in range(3))
    cu = torch.tensor([0, 15, 40], dtype=torch.int32)
    extra = {"attention_chunk": 8} if feature == "attention_chunk" else {
        "cp_world_size": 2, "cp_rank": 1, "cp_tot_seqused_k": torch.tensor([30, 50], dtype=torch.int32)}
    flash_attn_varlen_func(q, k, v, cu, cu, 25, 25, causal=True, **extra)
    assert kernels[0].op == DECODE.name
    kernel_checks.assert_call_matches_signature(kernels[0])


# ---- compile (sm_90a, no GPU) ----------------------------------------------------------------

COMPILE_VARIANTS = [
    pytest.param({"dtype": torch.bfloat16, "head_dim": 128, "paged": True, "causal": True},
                 id="bf16-d128-paged-causal"),
    pytest.param({"dtype": torch.float16, "head_dim": 64, "paged": False, "causal": False}, id="fp16-d64-dense"),
    pytest.param({"dtype": torch.bfloat16, "head_dim": 128, "paged": True, "causal": True, "leftpad": True,
                  "batch_idx": True, "sink": True}, id="bf16-d128-paged-leftpad-batchidx-sink"),
    pytest.param({"dtype": torch.bfloat16, "head_dim": 64, "head_dim_v": 512, "qv": True, "paged": True,
                  "causal": True}, id="bf16-qv-64-512-paged-causal"),
    pytest.param({"dtype": torch.float16, "head_dim": 64, "head_dim_v": 256, "qv": True, "paged": False,
                  "causal": False}, id="fp16-qv-64-256-dense"),
    pytest.param({"dtype": torch.bfloat16, "head_dim": 128, "paged": True, "causal": True, "varlen_q": True,
                  "split_kv": False}, id="bf16-d128-paged-varlen-one-split"),
    pytest.param({"dtype": torch.float8_e4m3fn, "head_dim": 128, "paged": False, "causal": False,
                  "split_kv": False}, id="fp8-d128-dense-one-split"),
]


@pytest.mark.compile
@pytest.mark.parametrize("var", COMPILE_VARIANTS)
def test_kernel_compiles_for_sm90a(var):
    start = time.perf_counter()
    kernel = jit.get_kernel(DECODE.name, var, platform.tilelang_target("sm_90a"), DECODE.build)
    seconds = time.perf_counter() - start
    src = kernel.get_kernel_source()
    # Sizes are runtime values: one kernel for every batch, head count, split count, page size.
    for name in ("int batch", "int heads_q", "int heads_k", "int seqlen_q", "int kv0"):
        assert name in src
    # One split writes the output dtype itself; splits write float32 partials for the combine.
    split_kv = var.get("split_kv", True)
    assert ("int num_splits" in src) == split_kv
    assert ("float* __restrict__ out_partial" in src) == split_kv
    if var["paged"]:
        assert "int max_pages" in src and "int page_size" in src  # page size: a runtime value
    # K / V rows arrive as 16-byte cp.async gathers through a ring: all but one slot in flight.
    fp8 = var["dtype"] == torch.float8_e4m3fn
    _, stages = decode_kernel.default_config(var["head_dim"], var.get("head_dim_v"), fp8)
    assert "cp_async_gs_conditional<16>" in src and f"cp_async_wait<{stages - 1}>" in src
    # FP8 V is widened to fp16 (one cvt per two values) for P V.
    assert ("__tl_cvt_fp8x2_to_half2" in src) == fp8
    # S = Q K^T from shared memory and O += P V with P in registers (in shared memory with qv, which
    # splits the columns over two warpgroups), on wgmma.
    assert "wgmma_ss<" in src and ("wgmma_rs<" in src) != bool(var.get("qv"))
    assert "-CUDART_INF_F" in src
    print(f"compile {var}: {seconds:.1f} s")


# ---- GPU vs the reference --------------------------------------------------------------------

def _check(out, lse, q, k, v, **kwargs):
    if q.dtype != torch.float8_e4m3fn:  # FP8 stays FP8: the reference dequantizes it (in float32)
        q, k, v = q.double(), k.double(), v.double()
    exact, exact_lse = reference.attention_forward(q, k, v, **kwargs)
    testing.assert_within_low_precision_error(out, exact, exact.to(out.dtype), atol=ATOL[out.dtype])
    assert torch.equal(lse.isinf(), exact_lse.isinf())
    # FP8 scores come from fp8 wgmma, whose accumulator keeps fewer bits than fp32 (as upstream's).
    assert testing.max_abs_error(lse, exact_lse) <= (5e-3 if q.dtype == torch.float8_e4m3fn else 2e-3)


def _cache(gen, batch, seqlen_cache, heads_k, d, dtype, page_size, dv=None):
    """Dense cache (page_size None) or a paged one with shuffled pages; returns k, v, page_table."""
    if page_size is None:
        k = torch.randn(batch, seqlen_cache, heads_k, d, generator=gen, device="cuda").to(dtype)
        v = torch.randn(batch, seqlen_cache, heads_k, dv or d, generator=gen, device="cuda").to(dtype)
        return k, v, None
    pages = -(-seqlen_cache // page_size)
    num_pages = batch * pages + 3
    k = torch.randn(num_pages, page_size, heads_k, d, generator=gen, device="cuda").to(dtype)
    v = torch.randn(num_pages, page_size, heads_k, dv or d, generator=gen, device="cuda").to(dtype)
    perm = torch.randperm(num_pages, generator=gen, device="cuda")[:batch * pages]
    return k, v, perm.view(batch, pages).to(torch.int32)


def _run(q, k, v, page_table, cache_seqlens, causal, num_splits=0, **features):
    batch, seqlen_q, heads, d = q.shape
    out = testing.poison(torch.empty_like(q))
    lse = testing.poison(torch.empty(batch, heads, seqlen_q, dtype=torch.float32, device="cuda"))
    decode_kernel.launch(q, k, v, page_table, cache_seqlens, d ** -0.5, causal, out, lse, num_splits=num_splits,
                         **features)
    return out, lse


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 1, 16, 64])
@pytest.mark.parametrize("seqlen_q", [1, 4])
@pytest.mark.parametrize("heads", [(32, 8), (8, 8)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_splits", [0, 1, 3, 16])
def test_decode_vs_reference(page_size, seqlen_q, heads, causal, num_splits):
    dtype, d = torch.bfloat16, 128
    gen = torch.Generator(device="cuda").manual_seed(
        testing.seed_for(f"decode{page_size}{seqlen_q}{heads}{causal}{num_splits}"))
    heads_q, heads_k = heads
    seqlen_cache = 700
    cache_seqlens = torch.tensor([1, 700, 129, 64, 5], dtype=torch.int32, device="cuda")
    if causal:
        cache_seqlens = cache_seqlens.clamp(min=seqlen_q)
    batch = cache_seqlens.numel()
    q = torch.randn(batch, seqlen_q, heads_q, d, generator=gen, device="cuda").to(dtype)
    k, v, page_table = _cache(gen, batch, seqlen_cache, heads_k, d, dtype, page_size)
    out, lse = _run(q, k, v, page_table, cache_seqlens, causal, num_splits)
    _check(out, lse, q, k, v, page_table=page_table, seqused_k=cache_seqlens, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, d", [(torch.float16, 64), (torch.bfloat16, 256)])
@pytest.mark.parametrize("page_size", [None, 16])
def test_decode_other_head_dims(dtype, d, page_size):
    gen = torch.Generator(device="cuda").manual_seed(testing.seed_for(f"decode-hd{dtype}{d}{page_size}"))
    cache_seqlens = torch.tensor([300, 1, 77], dtype=torch.int32, device="cuda")
    q = torch.randn(3, 2, 16, d, generator=gen, device="cuda").to(dtype)
    k, v, page_table = _cache(gen, 3, 300, 4, d, dtype, page_size)
    out, lse = _run(q, k, v, page_table, cache_seqlens, True, 4)
    _check(out, lse, q, k, v, page_table=page_table, seqused_k=cache_seqlens, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 1, 16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_splits", [1, 5])
@pytest.mark.parametrize("features", ["leftpad", "batch_idx", "sink", "all"])
def test_decode_leftpad_batch_idx_sink(page_size, causal, num_splits, features):
    dtype, d, seqlen_q, heads_q, heads_k = torch.bfloat16, 128, 2, 16, 4
    gen = torch.Generator(device="cuda").manual_seed(
        testing.seed_for(f"decode-features{page_size}{causal}{num_splits}{features}"))
    cache_rows = 6
    k, v, page_table = _cache(gen, cache_rows, 400, heads_k, d, dtype, page_size)
    cache_seqlens = torch.tensor([400, 37, 130, 2], dtype=torch.int32, device="cuda")
    batch = cache_seqlens.numel()
    use = {features} if features != "all" else {"leftpad", "batch_idx", "sink"}
    kwargs = {}
    if "leftpad" in use:
        # Keys [leftpad, cache_seqlens): one sequence keeps none of its keys but the last two.
        kwargs["cache_leftpad"] = torch.tensor([13, 0, 100, 0], dtype=torch.int32, device="cuda")
    if "batch_idx" in use:
        kwargs["cache_batch_idx"] = torch.tensor([5, 0, 3, 2], dtype=torch.int32, device="cuda")
    if "sink" in use:
        kwargs["learnable_sink"] = torch.randn(heads_q, generator=gen, device="cuda") * 2
    q = torch.randn(batch, seqlen_q, heads_q, d, generator=gen, device="cuda").to(dtype)
    out, lse = _run(q, k, v, page_table, cache_seqlens, causal, num_splits, **kwargs)
    _check(out, lse, q, k, v, page_table=page_table, seqused_k=cache_seqlens, causal=causal,
           kv_batch_idx=kwargs.get("cache_batch_idx"), leftpad_k=kwargs.get("cache_leftpad"),
           learnable_sink=kwargs.get("learnable_sink"))


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("features", ["window", "chunk", "softcap", "cp", "window-sink-cp"])
def test_decode_masks_softcap_context_parallel(page_size, causal, num_splits, features):
    dtype, d, seqlen_q, heads_q, heads_k = torch.bfloat16, 128, 3, 8, 2
    gen = torch.Generator(device="cuda").manual_seed(
        testing.seed_for(f"decode-masks{page_size}{causal}{num_splits}{features}"))
    k, v, page_table = _cache(gen, 4, 500, heads_k, d, dtype, page_size)
    cache_seqlens = torch.tensor([500, 37, 260, 3], dtype=torch.int32, device="cuda")
    q = torch.randn(4, seqlen_q, heads_q, d, generator=gen, device="cuda").to(dtype)
    window, chunk, softcap, cp, sink = (-1, -1), 0, 0.0, {}, None
    if "window" in features:
        window = (70, -1) if causal else (70, 5)
    if features == "chunk":
        chunk = 128
    if features == "softcap":
        softcap = 2.0
    if "cp" in features:
        # This rank holds global keys 1, 3, 5, ... (world 2, rank 1); queries align to the global count.
        cp = {"cp_world_size": 2, "cp_rank": 1,
              "cp_tot_seqused_k": cache_seqlens * 2 + torch.tensor([1, 0, 1, 2], dtype=torch.int32, device="cuda")}
    if "sink" in features:
        sink = torch.randn(heads_q, generator=gen, device="cuda")
    # As attention._forward_op passes them: a causal window or chunk is a local mask with right bound 0.
    local = window != (-1, -1) or chunk > 0
    kernel_window = (window[0], 0 if causal else window[1]) if local else (-1, -1)
    out, lse = _run(q, k, v, page_table, cache_seqlens, causal and not local, num_splits, learnable_sink=sink,
                    window=kernel_window, attention_chunk=chunk, softcap=softcap, **cp)
    _check(out, lse, q, k, v, page_table=page_table, seqused_k=cache_seqlens, causal=causal, window_size=window,
           attention_chunk=chunk, softcap=softcap, learnable_sink=sink, **cp)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 1, 64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_splits", [0, 3])
@pytest.mark.parametrize("mixed", [False, True])
def test_decode_varlen_queries(page_size, causal, num_splits, mixed):
    # vLLM's call: flash_attn_varlen_func with cu_seqlens_q, seqused_k and a block table.
    dtype, d, heads_q, heads_k = torch.bfloat16, 128, 16, 2
    gen = torch.Generator(device="cuda").manual_seed(
        testing.seed_for(f"decode-varlen{page_size}{causal}{num_splits}{mixed}"))
    seqlens_q = [1, 3, 0, 8, 2] if not mixed else [1, 200, 0, 1, 37]  # mixed: vLLM's prefill + decode batch
    cu_seqlens_q = torch.tensor([0] + seqlens_q, device="cuda").cumsum(0).to(torch.int32)
    cache_seqlens = torch.tensor([300, 9, 50, 211, 2], dtype=torch.int32, device="cuda")
    k, v, page_table = _cache(gen, 5, 320, heads_k, d, dtype, page_size)
    q = torch.randn(sum(seqlens_q), heads_q, d, generator=gen, device="cuda").to(dtype)
    out = testing.poison(torch.empty_like(q))
    lse = testing.poison(torch.empty(heads_q, q.shape[0], dtype=torch.float32, device="cuda"))
    decode_kernel.launch(q, k, v, page_table, cache_seqlens, d ** -0.5, causal, out, lse, num_splits=num_splits,
                         cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max(seqlens_q))
    _check(out, lse, q, k, v, page_table=page_table, seqused_k=cache_seqlens, causal=causal,
           cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max(seqlens_q))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, dv", [(torch.bfloat16, 512), (torch.float16, 256)])
@pytest.mark.parametrize("page_size", [None, 1, 64])
@pytest.mark.parametrize("seqlen_q, causal", [(1, False), (2, True), (37, True)])
@pytest.mark.parametrize("heads", [(16, 1), (8, 2)])
@pytest.mark.parametrize("num_splits", [0, 3])
def test_decode_with_qv(dtype, dv, page_size, seqlen_q, causal, heads, num_splits):
    # FA3's qv (MLA-style absorbed attention, as SGLang's FA3 backend calls it): scores q.k + qv.v.
    d, (heads_q, heads_k) = 64, heads
    gen = torch.Generator(device="cuda").manual_seed(
        testing.seed_for(f"decode-qv{dtype}{dv}{page_size}{seqlen_q}{causal}{heads}{num_splits}"))
    cache_seqlens = torch.tensor([239, 1, 799, 40], dtype=torch.int32, device="cuda").clamp(min=seqlen_q)
    batch = cache_seqlens.numel()
    k, v, page_table = _cache(gen, batch, 799, heads_k, d, dtype, page_size, dv=dv)
    q = torch.randn(batch, seqlen_q, heads_q, d, generator=gen, device="cuda").to(dtype)
    qv = torch.randn(batch, seqlen_q, heads_q, dv, generator=gen, device="cuda").to(dtype)
    out = testing.poison(torch.empty(batch, seqlen_q, heads_q, dv, dtype=dtype, device="cuda"))
    lse = testing.poison(torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32, device="cuda"))
    scale = (d + dv) ** -0.5
    decode_kernel.launch(q, k, v, page_table, cache_seqlens, scale, causal, out, lse, num_splits=num_splits, qv=qv)
    _check(out, lse, q, k, v, qv=qv.double(), page_table=page_table, seqused_k=cache_seqlens, causal=causal,
           softmax_scale=scale)


@pytest.fixture
def decode_launches(monkeypatch):
    """Counts decode_kernel.launch calls (which still run)."""
    return testing.count_calls(monkeypatch, decode_kernel, "launch")


@pytest.mark.gpu
def test_varlen_api_call_runs_the_decode_kernel(decode_launches):
    from mate.mha_interface import flash_attn_varlen_func

    gen = torch.Generator(device="cuda").manual_seed(3)
    k, v, page_table = _cache(gen, 3, 128, 2, 128, torch.bfloat16, 16)
    cu_seqlens_q = torch.tensor([0, 1, 2, 6], dtype=torch.int32, device="cuda")
    seqused_k = torch.tensor([128, 17, 64], dtype=torch.int32, device="cuda")
    q = torch.randn(6, 8, 128, generator=gen, device="cuda").to(torch.bfloat16)
    out, lse = flash_attn_varlen_func(q, k, v, cu_seqlens_q, None, 4, 128, seqused_k=seqused_k,
                                      page_table=page_table, causal=True, return_softmax_lse=True)
    assert decode_launches == [1]
    _check(out, lse, q, k, v, page_table=page_table, seqused_k=seqused_k, causal=True, cu_seqlens_q=cu_seqlens_q,
           max_seqlen_q=4)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 1, 16])
@pytest.mark.parametrize("seqlen_q", [1, 4])
@pytest.mark.parametrize("num_splits", [0, 3])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_decode_fp8(page_size, seqlen_q, num_splits, d):
    # FP8 e4m3 q / k / v with per-(batch, kv head) descales, bfloat16 out (the FP8 KV-cache path).
    gen = torch.Generator(device="cuda").manual_seed(
        testing.seed_for(f"decode-fp8{page_size}{seqlen_q}{num_splits}{d}"))
    heads_q, heads_k, fp8 = 16, 2, torch.float8_e4m3fn
    cache_seqlens = torch.tensor([300, 17, 128, 4], dtype=torch.int32, device="cuda")
    k, v, page_table = _cache(gen, 4, 300, heads_k, d, torch.float32, page_size)
    k, v = (t.mul(3).to(fp8) for t in (k, v))
    q = torch.randn(4, seqlen_q, heads_q, d, generator=gen, device="cuda").mul(3).to(fp8)
    q_descale, k_descale, v_descale = (torch.rand(4, heads_k, generator=gen, device="cuda") * 0.5 + 0.1
                                       for _ in range(3))
    out = testing.poison(torch.empty(q.shape, dtype=torch.bfloat16, device="cuda"))
    lse = testing.poison(torch.empty(4, heads_q, seqlen_q, dtype=torch.float32, device="cuda"))
    scale = d ** -0.5
    decode_kernel.launch(q, k, v, page_table, cache_seqlens, scale, True, out, lse, num_splits=num_splits,
                         q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    _check(out, lse, q, k, v, page_table=page_table, seqused_k=cache_seqlens, causal=True, softmax_scale=scale,
           q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)


@pytest.mark.gpu
def test_fp8_kvcache_api_call_runs_the_decode_kernel(decode_launches):
    from mate.mha_interface import flash_attn_with_kvcache

    gen = torch.Generator(device="cuda").manual_seed(11)
    k, v, page_table = _cache(gen, 3, 256, 2, 128, torch.float32, 64)
    k, v = (t.to(torch.float8_e4m3fn) for t in (k, v))
    q = torch.randn(3, 2, 8, 128, generator=gen, device="cuda").to(torch.float8_e4m3fn)
    cache_seqlens = torch.tensor([256, 9, 100], dtype=torch.int32, device="cuda")
    descale = torch.full((3, 2), 0.5, device="cuda")
    out, lse = flash_attn_with_kvcache(q, k, v, cache_seqlens=cache_seqlens, page_table=page_table, causal=True,
                                       q_descale=descale, k_descale=descale, v_descale=descale,
                                       return_softmax_lse=True)
    assert decode_launches == [1] and out.dtype == torch.bfloat16
    _check(out, lse, q, k, v, page_table=page_table, seqused_k=cache_seqlens, causal=True, q_descale=descale,
           k_descale=descale, v_descale=descale)


@pytest.mark.gpu
def test_qv_api_calls_run_the_decode_kernel(decode_launches):
    # SGLang's FA3 MLA decode: one latent kv head (rope part as k, latent as v), q_nope absorbed as qv;
    # and a packed-keys prefill call of the same shapes.
    from mate.mha_interface import flash_attn_varlen_func, flash_attn_with_kvcache

    gen = torch.Generator(device="cuda").manual_seed(12)
    k, v, page_table = _cache(gen, 3, 300, 1, 64, torch.bfloat16, 64, dv=512)
    q = torch.randn(3, 1, 16, 64, generator=gen, device="cuda").to(torch.bfloat16)
    qv = torch.randn(3, 1, 16, 512, generator=gen, device="cuda").to(torch.bfloat16)
    cache_seqlens = torch.tensor([300, 1, 77], dtype=torch.int32, device="cuda")
    out, lse = flash_attn_with_kvcache(q, k, v, cache_seqlens=cache_seqlens, page_table=page_table, qv=qv,
                                       causal=True, return_softmax_lse=True)
    _check(out, lse, q, k, v, qv=qv.double(), page_table=page_table, seqused_k=cache_seqlens, causal=True)
    cu = torch.tensor([0, 5, 105, 106], dtype=torch.int32, device="cuda")
    q, qv = q.new_empty(106, 16, 64).normal_(generator=gen), qv.new_empty(106, 16, 512).normal_(generator=gen)
    k, v = k.new_empty(106, 1, 64).normal_(generator=gen), v.new_empty(106, 1, 512).normal_(generator=gen)
    out, lse = flash_attn_varlen_func(q, k, v, cu, cu, 100, 100, qv=qv, causal=True, return_softmax_lse=True)
    assert decode_launches == [1, 1]
    _check(out, lse, q, k, v, qv=qv.double(), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=100,
           max_seqlen_k=100, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("feature", ["attention_chunk", "context_parallel"])
@pytest.mark.parametrize("packed", [False, True])
def test_prefill_size_chunk_and_context_parallel_calls(decode_launches, feature, packed):
    # The prefill kernel lacks both: prefill-size calls run on the decode kernel (many 64-row tiles).
    from mate.mha_interface import flash_attn_varlen_func, flash_attn_with_kvcache

    gen = torch.Generator(device="cuda").manual_seed(testing.seed_for(f"prefill-on-decode{feature}{packed}"))
    seqlens = [239, 113, 1]
    cu = torch.tensor([0] + seqlens, device="cuda").cumsum(0).to(torch.int32)
    extra = {"attention_chunk": 64} if feature == "attention_chunk" else {
        "cp_world_size": 2, "cp_rank": 1,
        "cp_tot_seqused_k": torch.tensor([2 * n + 1 for n in seqlens], dtype=torch.int32, device="cuda")}
    if packed:
        q, k, v = (torch.randn(sum(seqlens), heads, 128, generator=gen, device="cuda").bfloat16()
                   for heads in (16, 4, 4))
        out, lse = flash_attn_varlen_func(q, k, v, cu, cu, max(seqlens), max(seqlens), causal=True,
                                          return_softmax_lse=True, **extra)
        ref = {"cu_seqlens_q": cu, "cu_seqlens_k": cu, "max_seqlen_q": max(seqlens), "max_seqlen_k": max(seqlens)}
    else:
        q = torch.randn(3, 239, 16, 128, generator=gen, device="cuda").bfloat16()
        k, v = (torch.randn(3, 300, 4, 128, generator=gen, device="cuda").bfloat16() for _ in range(2))
        cache_seqlens = torch.tensor([300, 239, 250], dtype=torch.int32, device="cuda")
        if feature == "context_parallel":
            extra["cp_tot_seqused_k"] = cache_seqlens * 2 + 1
        out, lse = flash_attn_with_kvcache(q, k, v, cache_seqlens=cache_seqlens, causal=True, return_softmax_lse=True,
                                           **extra)
        ref = {"seqused_k": cache_seqlens}
    assert decode_launches == [1]
    _check(out, lse, q, k, v, causal=True, **ref, **extra)


@pytest.mark.gpu
def test_causal_rows_that_see_no_key():
    # seqlen_k < seqlen_q: the first rows see nothing (out 0, lse -inf), and many splits are empty.
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(2, 8, 8, 128, generator=gen, device="cuda").to(torch.bfloat16)
    k, v, page_table = _cache(gen, 2, 64, 2, 128, torch.bfloat16, 16)
    cache_seqlens = torch.tensor([3, 64], dtype=torch.int32, device="cuda")
    out, lse = _run(q, k, v, page_table, cache_seqlens, True, 8)
    _check(out, lse, q, k, v, page_table=page_table, seqused_k=cache_seqlens, causal=True)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    dtype, d = torch.bfloat16, 128
    gen = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(4, 1, 32, d, generator=gen, device="cuda").to(dtype)
    k, v, page_table = _cache(gen, 4, 1000, 8, d, dtype, 64)
    cache_seqlens = torch.tensor([1000, 17, 512, 1], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    lse = torch.empty(4, 32, 1, dtype=torch.float32, device="cuda")

    def call():
        decode_kernel.launch(q, k, v, page_table, cache_seqlens, d ** -0.5, True, out, lse)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # JIT and warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    # New cache contents, lengths and queries, written in place: the replay must see them.
    k.copy_(torch.randn(k.shape, generator=gen, device="cuda").to(dtype))
    v.copy_(torch.randn(v.shape, generator=gen, device="cuda").to(dtype))
    q.copy_(torch.randn(q.shape, generator=gen, device="cuda").to(dtype))
    cache_seqlens.copy_(torch.tensor([3, 999, 64, 640], dtype=torch.int32))
    testing.poison(out)
    graph.replay()
    torch.cuda.synchronize()
    _check(out, lse, q, k, v, page_table=page_table, seqused_k=cache_seqlens, causal=True)
