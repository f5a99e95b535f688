"""The Triton backend from the main test process.

The kernel tests (``tests/triton/``) need Triton's interpreter, which must be switched on before
triton is imported, so they run here in a subprocess with ``TRITON_INTERPRET=1`` (and skip when
the main process collects them without it). The other tests check how the backend reports itself
where it cannot run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_resnet import backends
from fused_resnet import triton as fr_triton

ROOT = Path(__file__).resolve().parent.parent
ALREADY_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


@pytest.mark.skipif(fr_triton.triton_import_error() is not None, reason="triton does not import")
@pytest.mark.skipif(ALREADY_INTERPRETED, reason="TRITON_INTERPRET is set: tests/triton runs in this process")
def test_interpreter_suite_passes():
    if (why := fr_triton.old_interpreter_reason()) is not None:
        pytest.skip(why)
    env = dict(os.environ, TRITON_INTERPRET="1", FUSED_RESNET_QUIET="1")
    env.pop("FUSED_RESNET_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", "tests/triton", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
           "-W", "ignore::DeprecationWarning"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout[-20000:] + proc.stderr[-5000:]
    assert proc.returncode == 0, f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{out}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], out


def test_old_interpreter_reason():
    assert "triton 3.6.0's interpreter" in fr_triton.old_interpreter_reason("3.6.0")
    assert "fixed in triton 3.7" in fr_triton.old_interpreter_reason("3.5.1")
    for ok in ("3.7.0", "3.8.0", "4.0.0", "3.10.1", "main"):
        assert fr_triton.old_interpreter_reason(ok) is None, ok


def test_cpu_without_interpreter_is_a_clear_fallback():
    if ALREADY_INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set in this process")
    why = backends.unsupported_reason("triton", torch.device("cpu"), torch.float32, "conv_bn_act")
    if fr_triton.triton_import_error() is not None:
        assert "triton does not import" in why
    else:
        assert "TRITON_INTERPRET=1" in why and "CUDA tensors" in why


@pytest.mark.skipif(fr_triton.triton_import_error() is not None, reason="triton does not import")
def test_dtype_reasons_on_cuda():
    cuda = torch.device("cuda")
    assert backends.unsupported_reason("triton", cuda, torch.float16, "conv_stats") is None
    assert backends.unsupported_reason("triton", cuda, torch.bfloat16, "conv_stats") is None
    why = backends.unsupported_reason("triton", cuda, torch.float64, "conv_stats")
    assert "float32/float16/bfloat16" in why and "float64" in why


def test_auto_order_puts_triton_second_on_cuda():
    assert backends._auto_order(torch.device("cuda")) == ("cuda", "triton", "torch")
    assert "triton" not in backends._auto_order(torch.device("cpu"))


# ----------------------------------------------------------------------------- packed-weight cache
# fused_resnet.triton._pack does not import triton: these run in the main process.


@pytest.fixture
def pack_cache(monkeypatch):
    from fused_resnet.triton import _pack

    monkeypatch.setattr(_pack, "MAX_ENTRIES", 512)
    _pack.clear()
    yield _pack
    _pack.clear()


def _expected_pack(w, groups):
    """Independent spelling of the packed layout: packed[g, r, s, c, k] = w[g * Kg + k, c, r, s]."""
    k, cg, r, s = w.shape
    kg = k // groups
    out = torch.empty(groups, r, s, cg, kg, dtype=w.dtype)
    for g in range(groups):
        out[g] = w[g * kg:(g + 1) * kg].permute(2, 3, 1, 0)
    return out


def test_pack_cache_hit_miss_and_layout(pack_cache):
    w = torch.randn(12, 2, 3, 3)
    a = pack_cache.packed_weight(w, 3)
    torch.testing.assert_close(a, _expected_pack(w, 3), rtol=0, atol=0)
    assert a.is_contiguous()
    b = pack_cache.packed_weight(w, 3)
    assert b is a
    info = pack_cache.cache_info()
    assert (info["hits"], info["misses"], info["entries"]) == (1, 1, 1)
    # The same storage packed for another number of groups is another entry.
    c = pack_cache.packed_weight(w, 6)
    torch.testing.assert_close(c, _expected_pack(w, 6), rtol=0, atol=0)
    # So is the same storage read with other strides (a transposed view).
    wt = w.transpose(2, 3)
    torch.testing.assert_close(pack_cache.packed_weight(wt, 3), _expected_pack(wt, 3), rtol=0, atol=0)
    assert pack_cache.cache_info()["entries"] == 3


def test_pack_cache_sees_in_place_updates(pack_cache):
    w = torch.randn(8, 4, 3, 3)
    first = pack_cache.packed_weight(w, 1).clone()
    w.add_(1)
    second = pack_cache.packed_weight(w, 1)
    torch.testing.assert_close(second, _expected_pack(w, 1), rtol=0, atol=0)
    torch.testing.assert_close(second, first + 1, rtol=0, atol=0)
    with torch.no_grad():  # an optimizer-style update of a parameter
        p = torch.nn.Parameter(torch.randn(8, 4, 1, 1))
        pack_cache.packed_weight(p, 1)
        p.mul_(-2)
    torch.testing.assert_close(pack_cache.packed_weight(p, 1), _expected_pack(p.detach(), 1), rtol=0, atol=0)
    assert pack_cache.cache_info()["entries"] == 2  # replaced, not one entry per version


def test_pack_cache_new_tensor_same_shape_and_freed_weights(pack_cache):
    w1 = torch.randn(6, 5, 3, 3)
    p1 = pack_cache.packed_weight(w1, 1)
    w2 = torch.randn(6, 5, 3, 3)  # same shape, other values
    p2 = pack_cache.packed_weight(w2, 1)
    torch.testing.assert_close(p2, _expected_pack(w2, 1), rtol=0, atol=0)
    assert not torch.equal(p1, p2)
    assert pack_cache.cache_info()["entries"] == 2
    del w1, w2, p1, p2
    assert pack_cache.cache_info()["entries"] == 0  # swept when the weights died
    # A freed weight's address reused by a new tensor (same shape, version 0) must not hit.
    for _ in range(20):
        w = torch.randn(4, 4, 3, 3)
        torch.testing.assert_close(pack_cache.packed_weight(w, 1), _expected_pack(w, 1), rtol=0, atol=0)
        del w


def test_pack_cache_is_bounded(pack_cache, monkeypatch):
    monkeypatch.setattr(pack_cache, "MAX_ENTRIES", 4)
    keep = [torch.randn(3, 2, 3, 3) for _ in range(10)]
    for w in keep:
        pack_cache.packed_weight(w, 1)
        assert pack_cache.cache_info()["entries"] <= 4
    info = pack_cache.cache_info()
    assert info["entries"] == 4 and info["evictions"] == 6
    # least recently used went first: the last four are hits, the first is a miss
    for w in keep[-4:]:
        pack_cache.packed_weight(w, 1)
    assert pack_cache.cache_info()["hits"] == 4
    pack_cache.packed_weight(keep[0], 1)
    assert pack_cache.cache_info()["misses"] == 11
    monkeypatch.setattr(pack_cache, "MAX_ENTRIES", 0)
    assert "disabled" in pack_cache.bypass_reason(keep[1])


def test_pack_cache_bypasses(pack_cache):
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = torch.randn(4, 4, 3, 3)
    assert pack_cache.bypass_reason(w) is None
    with torch.inference_mode():
        wi = torch.randn(4, 4, 3, 3)
    assert "inference tensor" in pack_cache.bypass_reason(wi)
    torch.testing.assert_close(pack_cache.packed_weight(wi, 1), _expected_pack(wi, 1), rtol=0, atol=0)
    assert "empty" in pack_cache.bypass_reason(torch.empty(0, 4, 3, 3))
    with FakeTensorMode() as mode:
        wf = mode.from_tensor(w)
        assert pack_cache.bypass_reason(wf) is not None
        assert pack_cache.packed_weight(wf, 1).shape == (1, 3, 3, 4, 4)
    assert pack_cache.cache_info()["entries"] == 0 and pack_cache.cache_info()["bypassed"] == 2


def test_pack_cache_bypassed_while_a_cuda_graph_is_captured(pack_cache, monkeypatch):
    """The condition only (capturing needs a GPU; tests/gpu replays a captured graph after an
    in-place weight update)."""
    w = torch.randn(4, 4, 3, 3)
    assert pack_cache._capturing(w.device) is False  # never on a CPU tensor
    monkeypatch.setattr(pack_cache, "_capturing", lambda device: True)
    assert "CUDA graph" in pack_cache.bypass_reason(w)
    pack_cache.packed_weight(w, 1)
    assert pack_cache.cache_info()["entries"] == 0


def test_pack_cache_is_traced_not_baked_in(pack_cache):
    """Under make_fx (the tracing torch.compile/export use) a cached weight would become a
    constant of the graph: the packing must appear as ops on the graph's input instead."""
    from torch.fx.experimental.proxy_tensor import make_fx

    w = torch.randn(8, 4, 3, 3)
    pack_cache.packed_weight(w, 1)  # cached
    gm = make_fx(lambda t: pack_cache.packed_weight(t, 1))(w)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert any("permute" in t for t in targets), targets
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"]
    w2 = torch.randn(8, 4, 3, 3)
    torch.testing.assert_close(gm(w2), _expected_pack(w2, 1), rtol=0, atol=0)


def test_pack_cache_threads(pack_cache, monkeypatch):
    import concurrent.futures

    monkeypatch.setattr(pack_cache, "MAX_ENTRIES", 16)
    shared = [torch.randn(8, 4, 3, 3) for _ in range(4)]
    expected_shared = [_expected_pack(w, 2) for w in shared]

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        own = torch.randn(6, 3, 3, 3, generator=g)
        for i in range(200):
            j = i % 4
            got = pack_cache.packed_weight(shared[j], 2)
            if not torch.equal(got, expected_shared[j]):
                return f"shared weight {j} wrong at step {i}"
            if i % 10 == 0:
                own.add_(1)  # private weight updated in place: must be repacked
                tmp = torch.randn(5, 2, 1, 1, generator=g)  # short-lived weights churn the cache
                if not torch.equal(pack_cache.packed_weight(tmp, 1), _expected_pack(tmp, 1)):
                    return f"temporary weight wrong at step {i}"
            if not torch.equal(pack_cache.packed_weight(own, 3), _expected_pack(own, 3)):
                return f"own weight stale at step {i}"
            if pack_cache.cache_info()["entries"] > 16:
                return "cache grew past its bound"
        return None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        errors = [e for e in pool.map(work, range(8)) if e]
    assert not errors, errors
    assert pack_cache.cache_info()["hits"] > 0


# ----------------------------------------------------------------------------- conv tuning candidates
# fused_resnet.triton._tuning is pure Python (no triton import).

H100 = dict(smem=227 * 1024, n_sm=132)
A100 = dict(smem=163 * 1024, n_sm=108)


def _resnet50_gemms(batch):
    import torchvision

    from fused_resnet.bench.shapes import conv_shapes

    for s in conv_shapes(torchvision.models.resnet50(), batch, 224):
        p, q = s.out_hw
        yield s.name, batch * p * q, s.k, s.c, s.s


@pytest.mark.parametrize("batch", [32, 256])
def test_tuning_candidates_for_resnet50(batch):
    from fused_resnet.triton import _tuning

    menu = _tuning.menu()
    for name, m, k, c, s in _resnet50_gemms(batch):
        packed = _tuning.packs_taps(c, s, 1, 1)
        assert packed == (name == "conv1"), name  # only the stem (C = 3) packs its taps
        run = _tuning.reduction_run(c, s, packed)
        for elem, dev in ((2, H100), (2, A100), (4, A100)):
            kept = _tuning.select(menu, m, k, run, 1, elem, **dev, packed=packed)
            assert 1 <= len(kept) <= _tuning.MAX_CANDIDATES, (name, kept)
            want_bk = 16 if packed else (64 if elem == 2 else 32)  # packed runs: 16 (spills at 32)
            for bm, bn, bk, _warps, stages in kept:
                assert bk == want_bk, (name, kept)
                assert min(64, k) <= bn <= k, (name, kept)  # K is a power of two in ResNet-50
                assert stages * (bm + bn) * bk * elem + 18 * 1024 <= dev["smem"], (name, kept)


def test_tuning_candidates_by_hand():
    from fused_resnet.triton import _tuning

    menu = _tuning.menu()
    # layer4 3x3 at batch 32: M = 32 * 7 * 7 = 1568, N = 512. Tile counts: 64x64 -> 25 * 8 = 200
    # (one H100 wave of 132 or more), 128x64 -> 13 * 8 = 104, 64x128 -> 25 * 4 = 100; every larger
    # tile makes fewer. So: the only one-wave tile, then the two with the most tiles.
    kept = _tuning.select(menu, 1568, 512, 512, 1, 2, **H100)
    assert sorted(kept) == sorted([(64, 64, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)])
    # layer4 3x3 at batch 256 (M = 12544): 128x128 makes 98 * 4 = 392 tiles: the largest tiles win.
    kept = _tuning.select(menu, 12544, 512, 512, 1, 2, **H100)
    assert (128, 128, 64, 8, 4) in kept and all(bm * bn == 128 * 128 for bm, bn, *_ in kept)
    # ResNeXt-50 32x4d layer1 grouped 3x3: 4 channels per group -> the narrowest tile only.
    assert _tuning.select(menu, 8 * 56 * 56, 4, 4, 32, 2, **H100) == [(64, 16, 16, 4, 3)]
    # float32 at 4 bytes: BLOCK_K 32 keeps a stage's bytes; nothing over the A100's shared memory.
    kept = _tuning.select(menu, 200704, 128, 128, 1, 4, **A100)
    assert kept and all(bk == 32 for _, _, bk, _, _ in kept)
    # Split-K multiplies every tile count: layer4's 3x3 at batch 1 (M = 49) split 8 ways keeps
    # the tiles that fill the most programs, not the one-wave rule's big tiles.
    kept = _tuning.select(menu, 49, 512, 512, 1, 2, **H100, split=8)
    assert all(bk == 64 for _, _, bk, _, _ in kept) and 1 <= len(kept) <= 3
    # Never empty, even when nothing fits the shared memory.
    assert len(_tuning.select(menu, 1000, 64, 64, 1, 2, smem=1024, n_sm=132)) == 1


# ----------------------------------------------------------------------------- GPU compile without a GPU
# The interpreter cannot tell whether a kernel compiles for a GPU. triton.compile for an explicit
# target needs no device (ptxas ships with triton): every kernel family is compiled for sm_90
# here, as the JIT would specialise it for ResNet-50's channel counts (multiples of 16).


def _gpu_compile(fn, consts, types, num_warps, num_stages=3, arch=90, div16=()):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps,
                                                                             "num_stages": num_stages})


def _stack_bytes(kernel):
    import re
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"STACK:(\d+)", out)
    return int(m.group(1)) if m else None


def _needs_compiler():
    if fr_triton.triton_import_error() is not None:
        pytest.skip("triton does not import")
    if ALREADY_INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: the kernels are interpreter functions here")
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton has no bundled ptxas")


_F32_PTRS = ("scale_ptr", "shift_ptr", "in_scale_ptr", "in_shift_ptr", "pmean_ptr", "plo_ptr", "pm2_ptr", "ws_ptr")


@pytest.mark.parametrize("variant", ["3x3-stats-prologue-bf16", "1x1-gemm-res-bf16", "3x3-res-fp32-tf32",
                                     "7x7-stem-c3-bf16", "3x3-res-bf16-split4"])
def test_conv_kernel_compiles_for_sm90(variant):
    _needs_compiler()
    from fused_resnet.triton import conv

    fn = conv.conv_kernel.fn
    dt = "fp32" if "fp32" in variant else "bf16"
    r = 7 if "7x7" in variant else (1 if "1x1" in variant else 3)
    stats = "stats" in variant
    tiles = {"3x3-stats-prologue-bf16": (128, 128, 64, 8, 4), "1x1-gemm-res-bf16": (64, 256, 64, 8, 3),
             "3x3-res-fp32-tf32": (128, 128, 32, 8, 4), "7x7-stem-c3-bf16": (128, 64, 16, 4, 4),
             "3x3-res-bf16-split4": (64, 128, 64, 4, 4)}
    bm, bn, bk, warps, stages = tiles[variant]
    consts = dict(R=r, S=r, PROLOGUE=stats, HAS_IN_SCALE=stats, HAS_IN_SHIFT=stats, IN_RELU=stats, STATS=stats,
                  HAS_RES=not stats, RELU=True, IS_GEMM=r == 1, PACK_S=r == 7,  # the stem packs its taps
                  INPUT_PRECISION="tf32", SPLIT_K=4 if "split" in variant else 1, STAT_ROWS=conv.STAT_ROWS,
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    types = {n: ("*fp32" if n in _F32_PTRS else f"*{dt}") for n in fn.arg_names if n.endswith("_ptr")}
    div16 = [n for n in types] + ["K", "Kg", "M"] + ([] if r == 7 else ["C", "Cg"])  # the stem has C = 3
    k = _gpu_compile(fn, consts, types, warps, stages, div16=div16)
    ptx = k.asm["ptx"]
    assert "wgmma.mma_async" in ptx  # Hopper tensor cores
    if r != 7:
        assert "cp.async" in ptx  # the reduction loop is software-pipelined
        assert k.metadata.shared >= stages * (bm + bn) * bk * (4 if dt == "fp32" else 2) * 2 // 3
    if bm * bn == 128 * 128 or r == 7:
        assert _stack_bytes(k) in (0, None), "the workhorse tile / the packed stem spills registers"


def test_bn_kernels_compile_for_sm90():
    _needs_compiler()
    from fused_resnet.triton import bn, conv

    f32 = "*fp32"
    act = "*bf16"
    for stats in (False, True):
        flags = dict(SPLIT_K=4, STATS=stats, HAS_RES=not stats, RELU=not stats, STAT_ROWS=16, BLOCK_M=64, BLOCK_N=64)
        _gpu_compile(conv.splitk_epilogue_kernel, flags,
                     {n: (act if n in ("out_ptr", "res_ptr") else f32)
                      for n in conv.splitk_epilogue_kernel.arg_names if n.endswith("_ptr")}, 4)
    _gpu_compile(conv.stats_reduce_kernel, dict(STAT_ROWS=16, BLOCK_S=64, BLOCK_K=64), dict.fromkeys(
        ("pmean_ptr", "plo_ptr", "pm2_ptr", "stats_ptr"), f32), 4)
    _gpu_compile(bn.bn_finalize_kernel, dict(HAS_GAMMA=True, HAS_BETA=True, BLOCK=256),
                 {**{n: f32 for n in bn.bn_finalize_kernel.arg_names if n.endswith("_ptr")}, "eps": "fp32"}, 4)
    _gpu_compile(bn.bn_update_running_stats_kernel, dict(HAS_NBT=True, CUMULATIVE=False, BLOCK=256),
                 {"stats_ptr": f32, "rmean_ptr": f32, "rvar_ptr": f32, "nbt_ptr": "*i64", "momentum": "fp32"}, 4)
    flags = dict(HAS_RES=True, HAS_RSCALE=True, HAS_RSHIFT=True, RELU=True, BLOCK_M=64, BLOCK_K=64)
    vecs = ("scale_ptr", "shift_ptr", "rscale_ptr", "rshift_ptr")
    _gpu_compile(bn.bn_add_act_kernel, flags,
                 {n: (f32 if n in vecs else act) for n in bn.bn_add_act_kernel.arg_names if n.endswith("_ptr")}, 4)
    _gpu_compile(bn.bn_add_act_backward_kernel, flags,
                 {n: (f32 if n in vecs or n.startswith("psum") else act)
                  for n in bn.bn_add_act_backward_kernel.arg_names if n.endswith("_ptr")}, 4)
    _gpu_compile(bn.sum_rows_kernel, dict(BLOCK_T=32, BLOCK_K=64), {"part_ptr": f32, "out_ptr": f32}, 4)
    _gpu_compile(bn.stats_backward_kernel, dict(BLOCK_M=64, BLOCK_K=64),
                 {"gz_ptr": act, "gstats_ptr": f32, "z_ptr": act, "stats_ptr": f32, "out_ptr": act,
                  "inv_count": "fp32"}, 4)


def test_split_k_choice():
    """Split-K only where 64x64 tiles leave SMs idle; bounded by MAX_SPLIT_K and the loop length."""
    from fused_resnet.triton import _tuning

    n_sm = 132
    # ResNet-50 at batch >= 32: every layer's 64x64 tiles fill a wave -> no split.
    for batch in (32, 256):
        for _name, m, k, c, s in _resnet50_gemms(batch):
            packed = _tuning.packs_taps(c, s, 1, 1)
            steps = _tuning.reduction_steps(s, s, c, 2, packed)
            assert _tuning.split_k(m, k, 1, steps, n_sm) == 1, (batch, _name)
    # Batch 1, layer4 3x3 512->512 at 7x7: 8 tiles, 72 steps of 64 -> the cap, 8 ways.
    assert _tuning.reduction_steps(3, 3, 512, 2, False) == 72
    assert _tuning.split_k(49, 512, 1, 72, n_sm) == _tuning.MAX_SPLIT_K
    # Enough tiles for half the SMs: 2 ways; a short loop limits the split (4 steps per share).
    assert _tuning.split_k(64 * 11, 64 * 6, 1, 100, n_sm) == 2
    assert _tuning.split_k(49, 512, 1, 9, n_sm) == 2
    assert _tuning.split_k(49, 512, 1, 3, n_sm) == 1
    # The packed stem counts kernel rows x 16-wide blocks of its 21-element runs.
    assert _tuning.reduction_steps(7, 7, 3, 2, True) == 14
    assert _tuning.split_k(0, 64, 1, 14, n_sm) == 1


def test_forced_split_k_env(monkeypatch):
    from fused_resnet.triton import _tuning

    monkeypatch.delenv(_tuning.SPLIT_K_ENV, raising=False)
    assert _tuning.forced_split_k() is None
    monkeypatch.setenv(_tuning.SPLIT_K_ENV, " Auto ")
    assert _tuning.forced_split_k() is None
    monkeypatch.setenv(_tuning.SPLIT_K_ENV, "3")
    assert _tuning.forced_split_k() == 3
    for bad in ("0", "x", "1.5"):
        monkeypatch.setenv(_tuning.SPLIT_K_ENV, bad)
        with pytest.raises(ValueError, match=_tuning.SPLIT_K_ENV):
            _tuning.forced_split_k()
