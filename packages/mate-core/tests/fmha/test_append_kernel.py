"""flash_attn_with_kvcache with new keys/values (and rotary) on the GPU: the append kernel writes
the cache in place, then the decode or prefill kernel attends over it. Kernel vs the reference
(outputs with upstream's tolerance rule, the updated caches to the rounding of one element), over a
grid modeled on upstream's hopper/test_flash_attn.py test_flash_attn_kvcache; CUDA-graph capture.
Compile checks of the append kernel for sm_90a (`-m compile`) need nvcc only."""

import itertools
import time

import pytest
import torch

from mate import jit, platform, testing
from mate.mha_interface import flash_attn_with_kvcache
from mate.ops.fmha import reference

pytest.importorskip("tilelang")

from mate.ops.fmha import append_kernel  # noqa: E402

ATOL = {torch.bfloat16: 4e-3, torch.float16: 5e-4}
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float8_e4m3fn: 2.0**-3}  # one rounding step

LAYOUTS = ["dense", "batch_idx", "leftpad", "page1", "page16", "page256"]
ROTARY = [None, "interleaved", "neox"]
SEQLEN_Q = [1, 3, 128]
SEQLEN_K = [128, 339, 1024, 2048]
DTYPE_DIMS = [(torch.bfloat16, 128), (torch.float16, 64)]


def _cases():
    """Every (layout, rotary, seqlen_q) with seqlen_k, causal, dtype/head dim and new-token count
    cycled so that each value meets the others (a full product would be thousands of calls)."""
    cases = []
    for n, (layout, rotary, seqlen_q) in enumerate(itertools.product(LAYOUTS, ROTARY, SEQLEN_Q)):
        dtype, d = DTYPE_DIMS[(n // 3) % 2]
        seqlen_k = SEQLEN_K[n % 4]
        causal = (n // 2) % 2 == 1
        seqlen_new = (1, seqlen_q, 5)[n % 3]
        cases.append(pytest.param(layout, rotary, seqlen_q, seqlen_k, seqlen_new, causal, dtype, d,
                                  id=f"{layout}-{rotary}-q{seqlen_q}-k{seqlen_k}-new{seqlen_new}-"
                                     f"{'causal' if causal else 'full'}-{str(dtype)[6:]}-d{d}"))
    return cases


def _inputs(layout, rotary, seqlen_q, seqlen_k, seqlen_new, dtype, d, seed, batch=3, heads=6, heads_k=2):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

    def randint(low, high, count):
        return torch.randint(low, high, (count,), generator=gen, device="cuda").to(torch.int32)

    # Keys already cached: random, leaving room for the new ones.
    cache_seqlens = randint(0, seqlen_k - seqlen_new + 1, batch)
    args = {"q": randn(batch, seqlen_q, heads, d), "k": randn(batch, seqlen_new, heads_k, d),
            "v": randn(batch, seqlen_new, heads_k, d), "cache_seqlens": cache_seqlens}
    batch_cache = batch
    if layout == "batch_idx":
        batch_cache = batch + 2
        args["cache_batch_idx"] = torch.randperm(batch_cache, generator=gen, device="cuda")[:batch].to(torch.int32)
    if layout == "leftpad":
        args["cache_leftpad"] = (torch.rand(batch, generator=gen, device="cuda") * (cache_seqlens + 1)).to(
            torch.int32).clamp(max=cache_seqlens)
    if layout.startswith("page"):
        page_size = int(layout[4:])
        pages_per_seq = -(-seqlen_k // page_size)
        num_pages = batch * pages_per_seq + 3
        args["page_table"] = torch.randperm(num_pages, generator=gen, device="cuda")[
            :batch * pages_per_seq].view(batch, pages_per_seq).to(torch.int32)
        args["k_cache"] = randn(num_pages, page_size, heads_k, d)
        args["v_cache"] = randn(num_pages, page_size, heads_k, d)
    else:
        args["k_cache"] = randn(batch_cache, seqlen_k, heads_k, d)
        args["v_cache"] = randn(batch_cache, seqlen_k, heads_k, d)
    if rotary is not None:
        rotary_dim = d // 2 if rotary == "neox" else d
        capacity = args["page_table"].shape[1] * args["k_cache"].shape[1] if "page_table" in args else seqlen_k
        angles = torch.rand(capacity + seqlen_q, rotary_dim // 2, generator=gen, device="cuda") * 6.283
        args.update(rotary_cos=angles.cos().to(dtype), rotary_sin=angles.sin().to(dtype),
                    rotary_interleaved=rotary == "interleaved")
    return args


def _reference(args, causal, **features):
    """The reference run on copies of the caches, in the inputs' dtype (rotated values rounded as the
    kernels round them; attention computed in float32): (out, lse, k_cache, v_cache)."""
    k_cache, v_cache = args["k_cache"].clone(), args["v_cache"].clone()
    out, lse = reference.attention_forward(
        args["q"], k_cache, v_cache, k_new=args["k"], v_new=args["v"], seqused_k=args["cache_seqlens"],
        page_table=args.get("page_table"), kv_batch_idx=args.get("cache_batch_idx"),
        leftpad_k=args.get("cache_leftpad"), rotary_cos=args.get("rotary_cos"), rotary_sin=args.get("rotary_sin"),
        rotary_interleaved=args.get("rotary_interleaved", True), causal=causal, **features)
    return out, lse, k_cache, v_cache


def _check(out, lse, k_cache, v_cache, expected, lse_tolerance=2e-3, low_precision=None):
    exact, exact_lse, k_want, v_want = expected
    low_precision = exact if low_precision is None else low_precision
    testing.assert_within_low_precision_error(out, exact, low_precision.to(out.dtype), atol=ATOL[out.dtype])
    assert torch.equal(lse.isinf(), exact_lse.isinf())
    assert testing.max_abs_error(lse, exact_lse) <= lse_tolerance
    # The caches: every element as the reference wrote it, to one rounding step (FMA contraction).
    for got, want in ((k_cache, k_want), (v_cache, v_want)):
        torch.testing.assert_close(got.float(), want.float(), rtol=ULP[got.dtype], atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("layout, rotary, seqlen_q, seqlen_k, seqlen_new, causal, dtype, d", _cases())
def test_kvcache_append(layout, rotary, seqlen_q, seqlen_k, seqlen_new, causal, dtype, d):
    seed = testing.seed_for(f"append{layout}{rotary}{seqlen_q}{seqlen_k}{seqlen_new}{causal}{dtype}{d}")
    args = _inputs(layout, rotary, seqlen_q, seqlen_k, seqlen_new, dtype, d, seed)
    expected = _reference(args, causal)
    out, lse = flash_attn_with_kvcache(**args, causal=causal, return_softmax_lse=True)
    torch.cuda.synchronize()
    _check(out, lse, args["k_cache"], args["v_cache"], expected)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["dense", "page16"])
@pytest.mark.parametrize("rotary", ROTARY)
@pytest.mark.parametrize("seqlen_q", [1, 40])
def test_kvcache_append_fp8(layout, rotary, seqlen_q):
    # An FP8 cache with new FP8 keys (rotated in float32, rounded back to e4m3 as upstream does) and
    # per-(sequence, kv head) descales: the decode kernel attends after, or the FP8 prefill kernel for
    # 40 queries over a dense cache. That one multiplies V by fp8 weights, so its low-precision
    # counterpart rounds the weights to e4m3 (upstream's intermediate_dtype rule).
    fp8 = torch.float8_e4m3fn
    seed = testing.seed_for(f"append-fp8{layout}{rotary}{seqlen_q}")
    args = _inputs(layout, rotary, seqlen_q, 339, seqlen_q, fp8, 128, seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    descales = {name: torch.rand(3, 2, generator=gen, device="cuda") + 0.5
                for name in ("q_descale", "k_descale", "v_descale")}
    expected = _reference(args, True, **descales)
    prefill_kernel = layout == "dense" and seqlen_q > 8
    low_precision = _reference(args, True, **descales, weights_dtype=fp8)[0] if prefill_kernel else None
    out, lse = flash_attn_with_kvcache(**args, **descales, causal=True, return_softmax_lse=True)
    _check(out, lse, args["k_cache"], args["v_cache"], expected, lse_tolerance=5e-3, low_precision=low_precision)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["dense", "page16"])
@pytest.mark.parametrize("seqlen_q", [1, 3])
def test_kvcache_append_with_attention_chunk(layout, seqlen_q):
    # Llama 4's decode step: append (rotated), then chunked attention (on the decode kernel).
    args = _inputs(layout, "interleaved", seqlen_q, 339, seqlen_q, torch.bfloat16, 128,
                   testing.seed_for(f"append-chunk{layout}{seqlen_q}"))
    expected = _reference(args, True, attention_chunk=64)
    out, lse = flash_attn_with_kvcache(**args, causal=True, attention_chunk=64, return_softmax_lse=True)
    _check(out, lse, args["k_cache"], args["v_cache"], expected)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_kvcache_append_varlen_new_tokens(causal):
    """cu_seqlens_k_new: a different number of new keys per sequence (0 included)."""
    gen = torch.Generator(device="cuda").manual_seed(testing.seed_for(f"append-varlen{causal}"))
    dtype, batch, heads, heads_k, d = torch.bfloat16, 4, 8, 2, 128
    counts = [3, 0, 7, 1]
    cu_new = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32, device="cuda")
    angles = torch.rand(600, d // 2, generator=gen, device="cuda") * 6.283
    args = {"q": torch.randn(batch, 2, heads, d, generator=gen, device="cuda").to(dtype),
            "k_cache": torch.randn(batch, 512, heads_k, d, generator=gen, device="cuda").to(dtype),
            "v_cache": torch.randn(batch, 512, heads_k, d, generator=gen, device="cuda").to(dtype),
            "k": torch.randn(sum(counts), heads_k, d, generator=gen, device="cuda").to(dtype),
            "v": torch.randn(sum(counts), heads_k, d, generator=gen, device="cuda").to(dtype),
            "cache_seqlens": torch.tensor([0, 17, 400, 505], dtype=torch.int32, device="cuda"),
            "rotary_cos": angles.cos().to(dtype), "rotary_sin": angles.sin().to(dtype),
            "rotary_seqlens": torch.tensor([5, 0, 390, 505], dtype=torch.int32, device="cuda")}
    k_cache, v_cache = args["k_cache"].clone(), args["v_cache"].clone()
    exact, exact_lse = reference.attention_forward(
        args["q"], k_cache, v_cache, k_new=args["k"], v_new=args["v"], cu_seqlens_k_new=cu_new,
        seqused_k=args["cache_seqlens"], rotary_cos=args["rotary_cos"], rotary_sin=args["rotary_sin"],
        seqlens_rotary=args["rotary_seqlens"], causal=causal)
    out, lse = flash_attn_with_kvcache(**args, cu_seqlens_k_new=cu_new, causal=causal, return_softmax_lse=True)
    _check(out, lse, args["k_cache"], args["v_cache"], (exact, exact_lse, k_cache, v_cache))


@pytest.mark.gpu
def test_kvcache_append_cuda_graph():
    """Capture one decode step (append with rotary into a paged cache, then attention) and replay
    it with other cache lengths: same results as eager reference calls, no host sync inside."""
    gen = torch.Generator(device="cuda").manual_seed(testing.seed_for("append-graph"))
    dtype, batch, heads, heads_k, d, page_size, pages_per_seq = torch.bfloat16, 4, 8, 2, 128, 16, 16
    num_pages = batch * pages_per_seq
    angles = torch.rand(page_size * pages_per_seq, d // 2, generator=gen, device="cuda") * 6.283
    static = {"q": torch.randn(batch, 1, heads, d, generator=gen, device="cuda").to(dtype),
              "k_cache": torch.randn(num_pages, page_size, heads_k, d, generator=gen, device="cuda").to(dtype),
              "v_cache": torch.randn(num_pages, page_size, heads_k, d, generator=gen, device="cuda").to(dtype),
              "k": torch.randn(batch, 1, heads_k, d, generator=gen, device="cuda").to(dtype),
              "v": torch.randn(batch, 1, heads_k, d, generator=gen, device="cuda").to(dtype),
              "cache_seqlens": torch.tensor([1, 50, 100, 200], dtype=torch.int32, device="cuda"),
              "page_table": torch.randperm(num_pages, generator=gen, device="cuda").view(batch, -1).to(torch.int32),
              "rotary_cos": angles.cos().to(dtype), "rotary_sin": angles.sin().to(dtype)}
    k_start, v_start = static["k_cache"].clone(), static["v_cache"].clone()

    def step():
        return flash_attn_with_kvcache(**static, causal=True, rotary_interleaved=False, return_softmax_lse=True)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles and warms up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    for lengths in ([7, 0, 255, 31], [100, 200, 3, 128]):
        static["cache_seqlens"].copy_(torch.tensor(lengths, dtype=torch.int32))
        static["k_cache"].copy_(k_start)
        static["v_cache"].copy_(v_start)
        expected = _reference({**static, "k_cache": k_start, "v_cache": v_start, "rotary_interleaved": False},
                              causal=True)
        graph.replay()
        torch.cuda.synchronize()
        _check(out, lse, static["k_cache"], static["v_cache"], expected)


# ---- compile checks (no GPU) ----------------------------------------------------------------------

def test_build_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dtype"):
        append_kernel.build("float32", 128)
    with pytest.raises(ValueError, match="head dims"):
        append_kernel.build("bfloat16", 100)


def test_launch_argument_order():
    calls = []

    class Fake:
        def __init__(self, *shape):
            self.shape = shape

        def view(self, *shape):
            return ("view", shape)

    q, cu_q, q_rot, k_new, v_new, cu_new = Fake(20, 4, 64), Fake(3), Fake(20, 4, 64), Fake(5, 2, 64), "v_new", Fake(3)
    cos = Fake(40, 16)
    append_kernel.launch(lambda *args: calls.append(args), q, cu_q, q_rot, k_new, v_new, cu_new, "kc", "vc", "table",
                         "rows", "seqlens", "start", cos, "sin", q_per_token=True, interleaved=False)
    assert calls == [(q, cu_q, q_rot, k_new, v_new, cu_new, "kc", "vc", "table", "rows", "seqlens", "start", cos,
                      "sin", 3, 1, 16, 0, 1, 1)]


@pytest.mark.compile
@pytest.mark.parametrize("dtype, head_dim, head_dim_v", [("bfloat16", 128, 128), ("float16", 192, 128),
                                                      ("float8_e4m3fn", 128, 128)])
def test_append_kernel_compiles_for_sm90a(dtype, head_dim, head_dim_v):
    start = time.perf_counter()
    kernel = jit.get_kernel("fmha.kvcache_append", {"dtype": dtype, "head_dim": head_dim, "head_dim_v": head_dim_v},
                            platform.tilelang_target("sm_90a"), append_kernel.build)
    src = kernel.get_kernel_source()
    # Every size, the layout (dense / paged), cache_batch_idx and the rotary style are runtime values.
    for name in ("int total_q", "int total_new", "int batch_plus_1", "int kv1", "int pt1", "int ro_len",
                 "int q_blocks", "int q_per_token", "int rotary_half", "int interleaved", "int has_rows",
                 "int paged"):
        assert name in src
    assert "__syncthreads()" in src
    print(f"compile append {dtype} d{head_dim}x{head_dim_v}: {time.perf_counter() - start:.1f} s")
