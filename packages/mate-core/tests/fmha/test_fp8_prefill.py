"""FP8 (float8_e4m3fn) prefill on the TileLang prefill kernel: layout facts and configurations
(CPU), compile checks for sm_90a (`-m compile`) and the kernel vs the reference on the GPU
(`-m gpu`) over a grid modeled on upstream's hopper/test_flash_attn.py, with its FP8 rule: the
error is at most twice (three times with softcap) that of the low-precision reference (normalized
attention weights rounded to float8_e4m3fn before multiplying V, output in bfloat16), plus twice
the bfloat16 rounding error of out_ref + 0.3 - 0.3.

Upstream checks no LSE for FP8. Here it is checked against the reference with a tolerance relative
to its size: FP8 wgmma accumulates Q K^T with fewer mantissa bits than fp32 (measured errors up to
~7e-4 of the scores' size on an H100)."""

import re
import time

import pytest

pytest.importorskip("tilelang")

import torch  # noqa: E402

from mate import jit, platform, testing  # noqa: E402
from mate.mha_interface import flash_attn_varlen_func, flash_attn_with_kvcache  # noqa: E402
from mate.ops.fmha import forward_kernel, reference  # noqa: E402

FP8 = torch.float8_e4m3fn
HEAD_DIMS = [(64, 64), (96, 96), (128, 128), (192, 192), (192, 128), (256, 256)]
LSE_RTOL = 2e-3


# ---- layout facts and configurations (CPU) --------------------------------------------------

def test_fp8_key_permutation_keeps_scores_in_their_thread():
    # PTX wgmma fragments, per row and 32-key group, thread with lane % 4 = c: the fp32
    # accumulator holds columns {8 g + 2 c + e}, the 8-bit A operand columns {16 h + 4 c + e'}.
    # Column j of P must take a score the same thread holds, and every key exactly once.
    for c in range(4):
        accumulator = {8 * g + 2 * c + e for g in range(4) for e in range(2)}
        a_operand = {16 * h + 4 * c + e for h in range(2) for e in range(4)}
        assert {forward_kernel.fp8_key_of(j) for j in a_operand} == accumulator
    for group in range(4):
        keys = [forward_kernel.fp8_key_of(32 * group + j) for j in range(32)]
        assert sorted(keys) == list(range(32 * group, 32 * group + 32))


def test_transposed_values_feed_the_permuted_p():
    # The pre-pass's layout (its PyTorch reference: zero-padded whole blocks, keys permuted inside
    # 32-key groups) times the kernel's P (column j of a block holds the score of key
    # block * block_n + fp8_key_of(j)) is P V.
    gen = torch.Generator().manual_seed(0)
    count, block_n = 300, 128
    v = torch.randn(count, 1, 32, generator=gen).to(FP8)
    vt = forward_kernel.transposed_values_reference(v, [0], [count], block_n)[0]
    assert vt.shape == (32, 3 * block_n)
    p = torch.cat([torch.rand(7, count, generator=gen), torch.zeros(7, 3 * block_n - count)], dim=1)
    keys = torch.tensor([b * block_n + forward_kernel.fp8_key_of(j) for b in range(3) for j in range(block_n)])
    torch.testing.assert_close(p[:, keys] @ vt.T, p[:, :count] @ v[:, 0].float())


@pytest.mark.parametrize("head_dim, head_dim_v", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_fp8_configs_fit_the_chip(head_dim, head_dim_v, causal):
    cfg = forward_kernel.default_config(head_dim, head_dim_v, causal, dtype="float8_e4m3fn")
    assert cfg.block_n % 32 == 0 and cfg.block_m in (128, 192)
    assert forward_kernel.shared_memory_bytes(head_dim, head_dim_v, cfg, "float8_e4m3fn") <= 227 * 1024
    forward_kernel.build("float8_e4m3fn", head_dim, head_dim_v, causal, False, False)  # builds the IR
    forward_kernel.build_v_transpose(head_dim_v, cfg.block_n)


@pytest.mark.parametrize("kwargs, match", [
    ({"head_dim": 80, "head_dim_v": 80}, "multiple of 32"),
    ({"block_n": 80}, "block_n"),
])
def test_fp8_build_rejects_bad_configs(kwargs, match):
    args = {"dtype": "float8_e4m3fn", "head_dim": 128, "head_dim_v": 128, "causal": False, "has_window": False,
            "has_softcap": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        forward_kernel.build(**args)
    with pytest.raises(ValueError, match="block_n"):
        forward_kernel.build_v_transpose(128, 80)


# ---- compile checks (nvcc, no GPU) -----------------------------------------------------------

COMPILE_VARIANTS = [
    pytest.param({"head_dim": 128, "head_dim_v": 128, "causal": False}, id="d128"),
    pytest.param({"head_dim": 64, "head_dim_v": 64, "causal": True}, id="d64-causal"),
    pytest.param({"head_dim": 256, "head_dim_v": 256, "causal": True, "has_seqused": True, "has_sink": True},
                 id="d256-causal-seqused-sink"),
    pytest.param({"head_dim": 192, "head_dim_v": 128, "causal": False, "has_window": True, "has_softcap": True},
                 id="d192x128-local-softcap"),
]


@pytest.mark.compile
@pytest.mark.parametrize("var", COMPILE_VARIANTS)
def test_fp8_kernel_compiles_for_sm90a(var):
    var = {"dtype": "float8_e4m3fn", "has_window": False, "has_softcap": False, **var}
    start = time.perf_counter()
    kernel = jit.get_kernel("fmha.flash_attn_fwd", var, platform.tilelang_target("sm_90a"), forward_kernel.build)
    seconds = time.perf_counter() - start
    src = kernel.get_kernel_source()
    cfg = forward_kernel.default_config(var["head_dim"], var["head_dim_v"], var["causal"], var["has_window"],
                                        var["has_softcap"], "float8_e4m3fn")
    fp8 = "tl::DataType::kFloat8_e4m3"
    # S = Q K^T from shared memory and O += P V with P in registers, both 8-bit, 32 keys a k step;
    # the softmax overlaps the P V gemm; warp-specialized with ping-pong.
    assert re.search(rf"wgmma_ss<{fp8}, {fp8}, tl::DataType::kFloat32, 64, {cfg.block_n}, 32", src)
    assert re.search(rf"wgmma_rs<{fp8}, {fp8}, tl::DataType::kFloat32, 64, {var['head_dim_v']}, 32", src)
    assert "wait_wgmma<1>" in src and "__named_barrier_arrive" in src
    assert f"__launch_bounds__({cfg.threads}, 1)" in src
    # P is converted to fp8 pairwise inside each thread; V arrives transposed by TMA.
    assert "__nv_cvt_float2_to_fp8x2" in src
    assert src.count("tl::tma_load(") >= 3
    assert "q_descale[" in src and "k_descale[" in src and "v_descale[" in src
    for name in ("int max_seqlen_q", "int batch_plus_1", "int total_q"):
        assert name in src
    transpose = jit.get_kernel("fmha.fp8_v_transpose", {"head_dim_v": var["head_dim_v"], "block_n": cfg.block_n},
                               platform.tilelang_target("sm_90a"), forward_kernel.build_v_transpose)
    assert "mate_fp8_vt_piece(" in transpose.get_kernel_source()  # V transposed in registers
    print(f"compile {var}: {seconds:.1f} s")


# ---- GPU vs the reference --------------------------------------------------------------------

def _fp8(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(FP8)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim_v, block_n",
                         [(64, 128), (64, 160), (64, 192), (128, 192), (128, 128), (256, 128), (96, 96), (192, 64)])
def test_v_transpose_kernel_matches_its_reference(head_dim_v, block_n):
    """The pre-pass kernel byte for byte: an empty sequence (one zero block), short ones, the last one
    padded past the end of v, and, with one block too few, the columns past vt's end dropped."""
    gen = torch.Generator().manual_seed(testing.seed_for(f"vt{head_dim_v}{block_n}"))
    counts = [5, 0, 200, 1, 77, 33]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    v = torch.randn(sum(counts), 3, head_dim_v, generator=gen).to(FP8)
    kernel = jit.get_kernel("fmha.fp8_v_transpose", {"head_dim_v": head_dim_v, "block_n": block_n},
                            platform.device_info("cuda").tilelang_target, forward_kernel.build_v_transpose)
    as_int32 = lambda values: torch.tensor(values, dtype=torch.int32, device="cuda")  # noqa: E731
    want = forward_kernel.transposed_values_reference(v, starts, counts, block_n)
    blocks = want.shape[-1] // block_n
    for max_blocks in (blocks, blocks - 1):
        vt, _ = forward_kernel.transpose_values(kernel, v.cuda(), as_int32(starts), as_int32(counts), max(counts),
                                                block_n, max_blocks)
        assert torch.equal(vt.float().cpu(), want[..., :max_blocks * block_n])


def _descales(gen, batch, heads_k):
    return [torch.rand(batch, heads_k, generator=gen, device="cuda") * 2 for _ in range(3)]


def _rounded_weights_attention(q, k, v, descales, b, *, softmax_scale, causal=False, window=(-1, -1), softcap=0.0,
                               sink=None):
    """One sequence as upstream's attention_ref(intermediate_dtype=float8_e4m3fn) computes it:
    dequantized float32 inputs, normalized weights rounded to float8_e4m3fn. q (sq, h, d), k / v
    (sk, hk, d) in FP8; descales (q, k, v) (batch, hk); returns (sq, h, dv) float32."""
    group = q.shape[1] // k.shape[1]
    qd, kd, vd = (t[b].repeat_interleave(group)[None, :, None] for t in descales)
    k, v = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.float() * qd, k * kd) * softmax_scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    seqlen_q, seqlen_k = q.shape[0], k.shape[0]
    keep = reference.visible_keys(torch.arange(seqlen_q, device="cuda") + seqlen_k - seqlen_q,
                                  torch.arange(seqlen_k, device="cuda"), seqlen_k, causal=causal, window_size=window)
    scores = scores.masked_fill(~keep, float("-inf"))
    if sink is not None:
        scores = torch.cat([scores, sink.float()[:, None, None].expand(-1, seqlen_q, 1)], dim=-1)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)[..., :seqlen_k]
    return torch.einsum("hqk,khd->qhd", weights.to(FP8).float(), v * vd)


def _check(out, lse, exact, exact_lse, low_precision, softcap=0.0):
    out_ref = exact.to(torch.bfloat16)
    atol = 2 * (out_ref + 0.3 - 0.3 - out_ref).abs().max().item() if out_ref.numel() else 0.0
    testing.assert_within_low_precision_error(out, exact, low_precision.to(torch.bfloat16),
                                              multiple=2 if softcap == 0 else 3, atol=atol)
    assert torch.equal(lse.isinf(), exact_lse.isinf())
    finite = exact_lse[exact_lse.isfinite()]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    assert testing.max_abs_error(lse, exact_lse) <= LSE_RTOL * scale


@pytest.fixture
def prefill_launches(monkeypatch):
    """Counts forward_kernel.launch calls (which still run): FP8 prefill must take the prefill kernel."""
    return testing.count_calls(monkeypatch, forward_kernel, "launch")


SEQLENS = [(113, 203), (128, 217), (239, 1), (799, 3), (1023, 1024), (2048, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("seqlens", SEQLENS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mha_type", ["mha", "gqa"])
def test_fp8_fixed_length(head_dim, seqlens, causal, mha_type, prefill_launches):
    (seqlen_q, seqlen_k), d = seqlens, head_dim
    gen = torch.Generator(device="cuda").manual_seed(testing.seed_for(f"fp8-fixed{d}{seqlens}{causal}{mha_type}"))
    batch, heads = 2, 6
    heads_k = heads if mha_type == "mha" else 2
    q, k, v = _fp8(gen, batch, seqlen_q, heads, d), _fp8(gen, batch, seqlen_k, heads_k, d), \
        _fp8(gen, batch, seqlen_k, heads_k, d)
    descales = _descales(gen, batch, heads_k)
    out = testing.poison(torch.empty(batch, seqlen_q, heads, d, dtype=torch.bfloat16, device="cuda"))
    out, lse = flash_attn_varlen_func(q, k, v, causal=causal, q_descale=descales[0], k_descale=descales[1],
                                      v_descale=descales[2], out=out, return_softmax_lse=True)
    assert prefill_launches == [1] and lse.shape == (batch, heads, seqlen_q)
    exact, exact_lse = reference.attention_forward(q, k, v, causal=causal, q_descale=descales[0],
                                                   k_descale=descales[1], v_descale=descales[2])
    low = torch.stack([_rounded_weights_attention(q[b], k[b], v[b], descales, b, softmax_scale=d ** -0.5,
                                                  causal=causal) for b in range(batch)])
    _check(out, lse, exact, exact_lse, low)


def _packed(lengths):
    return torch.tensor([0] + lengths, device="cuda").cumsum(0).int()


@pytest.mark.gpu
# A sample of the head dims in each mode (each variant is a compile).
@pytest.mark.parametrize("head_dims, causal", [((64, 64), False), ((128, 128), False), ((80, 80), False),
                                               ((192, 128), False), ((64, 64), True), ((128, 128), True),
                                               ((256, 256), True)])
def test_fp8_varlen_mixed(head_dims, causal, prefill_launches):
    """Mixed lengths in one batch: a one-query sequence, one without keys (rows get out 0, LSE
    -inf), decode-sized and long ones; head dims between the compiled ones run zero-padded."""
    d, dv = head_dims
    gen = torch.Generator(device="cuda").manual_seed(testing.seed_for(f"fp8-varlen{head_dims}{causal}"))
    heads, heads_k = 8, 2
    lengths_q = [1, 113, 9, 799, 5, 239, 1000]
    lengths_k = [1, 203, 64, 3, 0, 239, 2048]
    cu_q, cu_k = _packed(lengths_q), _packed(lengths_k)
    q = _fp8(gen, sum(lengths_q), heads, d)
    k, v = _fp8(gen, sum(lengths_k), heads_k, d), _fp8(gen, sum(lengths_k), heads_k, dv)
    descales = _descales(gen, len(lengths_q), heads_k)
    kwargs = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lengths_q), max_seqlen_k=max(lengths_k),
                  causal=causal, q_descale=descales[0], k_descale=descales[1], v_descale=descales[2])
    out = testing.poison(torch.empty(sum(lengths_q), heads, dv, dtype=torch.bfloat16, device="cuda"))
    out, lse = flash_attn_varlen_func(q, k, v, out=out, return_softmax_lse=True, **kwargs)
    assert prefill_launches == [1]
    exact, exact_lse = reference.attention_forward(q, k, v, **kwargs)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    low = torch.cat([_rounded_weights_attention(q[bounds_q[b]:bounds_q[b + 1]], k[bounds_k[b]:bounds_k[b + 1]],
                                                v[bounds_k[b]:bounds_k[b + 1]], descales, b, softmax_scale=d ** -0.5,
                                                causal=causal) for b in range(len(lengths_q))])
    _check(out, lse, exact, exact_lse, low)


FEATURES = ["window", "causal+window", "softcap", "causal+softcap", "sink", "causal+seqused+sink"]


@pytest.mark.gpu
@pytest.mark.parametrize("features", FEATURES)
def test_fp8_varlen_features(features, prefill_launches):
    """Local windows, softcap, learnable sinks and seqused_q / seqused_k below the cu_seqlens extents."""
    gen = torch.Generator(device="cuda").manual_seed(testing.seed_for(f"fp8-features{features}"))
    d, heads, heads_k = 128, 8, 2
    softcap = 15.0 if "softcap" in features else 0.0
    lengths_q, lengths_k = [1, 113, 64, 333, 7, 300], [1, 203, 64, 301, 517, 300]
    used_q, used_k = [1, 100, 0, 333, 3, 300], [1, 150, 64, 0, 500, 300]
    cu_q, cu_k = _packed(lengths_q), _packed(lengths_k)
    q = _fp8(gen, sum(lengths_q), heads, d, scale=softcap / 4 if softcap else 1.0)
    k, v = _fp8(gen, sum(lengths_k), heads_k, d), _fp8(gen, sum(lengths_k), heads_k, d)
    descales = _descales(gen, len(lengths_q), heads_k)
    causal, seqused = "causal" in features, "seqused" in features
    window = (45, 7) if "window" in features else (-1, -1)
    sink = torch.randn(heads, generator=gen, device="cuda") * 2 if "sink" in features else None
    kwargs = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lengths_q), max_seqlen_k=max(lengths_k),
                  causal=causal, window_size=window, softcap=softcap, learnable_sink=sink,
                  q_descale=descales[0], k_descale=descales[1], v_descale=descales[2])
    if seqused:
        kwargs.update(seqused_q=torch.tensor(used_q, dtype=torch.int32, device="cuda"),
                      seqused_k=torch.tensor(used_k, dtype=torch.int32, device="cuda"))
    else:
        used_q, used_k = lengths_q, lengths_k
    out = testing.poison(torch.empty(sum(lengths_q), heads, d, dtype=torch.bfloat16, device="cuda"))
    out, lse = flash_attn_varlen_func(q, k, v, out=out, return_softmax_lse=True, **kwargs)
    assert prefill_launches == [1]
    exact, exact_lse = reference.attention_forward(q, k, v, **kwargs)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    rows = torch.cat([torch.arange(bounds_q[b], bounds_q[b] + used_q[b]) for b in range(len(used_q))]).cuda()
    low = torch.cat([_rounded_weights_attention(
        q[bounds_q[b]:bounds_q[b] + used_q[b]], k[bounds_k[b]:bounds_k[b] + used_k[b]],
        v[bounds_k[b]:bounds_k[b] + used_k[b]], descales, b, softmax_scale=d ** -0.5, causal=causal, window=window,
        softcap=softcap, sink=sink) for b in range(len(used_q))])
    _check(out[rows], lse[:, rows], exact[rows], exact_lse[:, rows], low, softcap)


@pytest.mark.gpu
def test_fp8_dense_cache_prefill(prefill_launches):
    """flash_attn_with_kvcache over a dense FP8 cache with more than 8 queries: cache_seqlens,
    cache_leftpad, cache_batch_idx and a sink on the prefill kernel (default descales: 1)."""
    gen = torch.Generator(device="cuda").manual_seed(testing.seed_for("fp8-dense-cache"))
    d, heads, heads_k, seqlen_q = 128, 8, 2, 40
    k_cache, v_cache = _fp8(gen, 3, 300, heads_k, d), _fp8(gen, 3, 300, heads_k, d)
    q = _fp8(gen, 2, seqlen_q, heads, d)
    kwargs = dict(cache_seqlens=torch.tensor([300, 77], dtype=torch.int32, device="cuda"),
                  cache_batch_idx=torch.tensor([2, 0], dtype=torch.int32, device="cuda"),
                  cache_leftpad=torch.tensor([10, 0], dtype=torch.int32, device="cuda"),
                  learnable_sink=torch.randn(heads, generator=gen, device="cuda"), causal=True)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, return_softmax_lse=True, **kwargs)
    assert prefill_launches == [1] and out.dtype == torch.bfloat16
    exact, exact_lse = reference.attention_forward(q, k_cache, v_cache, seqused_k=kwargs["cache_seqlens"],
                                                   kv_batch_idx=kwargs["cache_batch_idx"],
                                                   leftpad_k=kwargs["cache_leftpad"],
                                                   learnable_sink=kwargs["learnable_sink"], causal=True)
    ones = [torch.ones(2, heads_k, device="cuda")] * 3
    low = torch.stack([_rounded_weights_attention(q[b], k_cache[row, pad:end], v_cache[row, pad:end], ones, b,
                                                  softmax_scale=d ** -0.5, causal=True,
                                                  sink=kwargs["learnable_sink"])
                       for b, (row, pad, end) in enumerate([(2, 10, 300), (0, 0, 77)])])
    _check(out, lse, exact, exact_lse, low)
