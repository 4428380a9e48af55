"""The Triton weight-only linear kernels (``codegen.triton_linear``, ``triton_gemv``) against ``quantized_linear_ref``:
int4 and int8, groups and per channel, with and without zero points and bias, decode-sized and
prefill-sized M, N and K off the tile sizes, forced split-K. On the interpreter without a GPU."""
import pytest
import torch

from qcompiler.codegen.ops import quantized_linear_ref
from qcompiler.codegen.quant import dequantize_weight_ref, quantize_weight
from qcompiler.codegen import triton_linear_tiles
from qcompiler.codegen.triton_linear import dequantize_triton, wq_linear_triton, words_ok
from qcompiler.codegen.triton_linear_tiles import (DEQUANT_MIN_M, FORMS, GEMV_MAX_M, LinearConfig, pick_config,
                                                   tuned_config)


def _weight(N, K, bits, group, symmetric, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    return quantize_weight(w, bits, group, symmetric)


def _case(M, N, K, bits, group, symmetric, bias, dtype, device, seed=0):
    qw = _weight(N, K, bits, group, symmetric, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    scales = qw.scales.to(dtype)
    # the reference in fp32 from the same operands the kernel gets (x, scales and bias rounded to
    # ``dtype``); the kernel accumulates in fp32 too
    ref = quantized_linear_ref(x.float(), qw.qweight, scales.float(), qw.zeros, None if b is None else b.float(), bits)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    args = (x.to(device), to(qw.qweight), to(scales), to(qw.zeros), to(b))
    return args, ref


TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-2)}


@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, 64, False), (8, 32, False), (8, None, True)])
def test_matches_reference(kernel_device, M, bits, group, symmetric):
    K = 192 if group else 72  # per channel: K off every block size
    args, ref = _case(M, 40, K, bits, group or K, symmetric, bias=M != 3, dtype=torch.float32, device=kernel_device)
    out = wq_linear_triton(*args, bits=bits)
    assert out.shape == (M, 40) and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])


@pytest.mark.parametrize("M", [2, 5])  # the GEMV form and the tensor-core form
@pytest.mark.parametrize("bits,group,symmetric", [(4, 64, False), (8, 32, True)])
def test_half_activations(kernel_device, M, bits, group, symmetric):
    args, ref = _case(M, 24, 128, bits, group, symmetric, bias=True, dtype=torch.float16, device=kernel_device)
    out = wq_linear_triton(*args, bits=bits)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.cpu().float(), ref, **TOL[torch.float16])


@pytest.mark.parametrize("block_m", [2, 16])  # the GEMV form and the tensor-core form
@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("bits,group", [(4, 32), (8, 32), (8, None)])
def test_split_k(kernel_device, block_m, split_k, bits, group):
    """Split-K partial sums (fp32 atomics) add up to the whole product; bias is added once."""
    K = 192 if group else 200
    args, ref = _case(2, 24, K, bits, group or K, True, bias=True, dtype=torch.float32, device=kernel_device)
    cfg = LinearConfig(block_m=block_m, block_n=16, block_k=32, split_k=split_k, num_warps=4, num_stages=2)
    out = wq_linear_triton(*args, bits=bits, config=cfg)
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])


@pytest.mark.parametrize("M,block_m,split_k", [(1, 1, 3), (3, 2, 1), (5, 4, 2)])
@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, 64, False), (4, None, False), (8, 32, False),
                                                  (8, None, True)])
def test_stream_gemv(kernel_device, M, block_m, split_k, bits, group, symmetric):
    """The weight-stream GEMV: tiles of rows over M (the last one partial), a split-K whose last
    split is short, zero points per group and per channel (no whole-row split needed), codes made
    floats by their bits."""
    K = 192 if group else 200
    args, ref = _case(M, 40, K, bits, group or K, symmetric, bias=M != 3, dtype=torch.float32, device=kernel_device)
    cfg = LinearConfig(block_m=block_m, block_n=16, block_k=32, split_k=split_k, num_warps=4, num_stages=1, form="stream")
    out = wq_linear_triton(*args, bits=bits, config=cfg)
    assert out.shape == (M, 40) and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])


@pytest.mark.parametrize("bits,group,dtype", [(4, 64, torch.float16), (8, 64, torch.float16), (4, 32, torch.bfloat16),
                                              (8, 32, torch.bfloat16)])
def test_stream_gemv_16bit_activations(kernel_device, bits, group, dtype):
    """fp16, and bf16: int4 with bf16 activations reads them as 32-bit column pairs (integer work
    only, which the interpreter does exactly; the output's bf16 rounding sets the tolerance)."""
    args, ref = _case(3, 24, 128, bits, group, False, bias=True, dtype=dtype, device=kernel_device)
    cfg = LinearConfig(block_m=2, block_n=8, block_k=32, split_k=2, num_warps=2, num_stages=1, form="stream")
    out = wq_linear_triton(*args, bits=bits, config=cfg)
    assert out.dtype == dtype
    tol = TOL[torch.float16] if dtype == torch.float16 else dict(rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    torch.testing.assert_close(out.cpu().float(), ref, **tol)


@pytest.mark.parametrize("M,block_m,split_k", [(1, 1, 3), (3, 2, 1), (5, 4, 2)])
@pytest.mark.parametrize("group,symmetric", [(32, True), (64, False), (None, False)])
def test_words_gemv(kernel_device, M, block_m, split_k, group, symmetric):
    """The int4 word stream with bf16 activations (integer work and fp32 math only, which the
    interpreter does exactly; the output's bf16 rounding sets the tolerance): partial M tiles,
    short last splits, zero points per group and per channel, K a multiple of 8 but not of the
    tile."""
    K = 192 if group else 200
    args, ref = _case(M, 40, K, 4, group or K, symmetric, bias=M != 3, dtype=torch.bfloat16, device=kernel_device)
    cfg = LinearConfig(block_m=block_m, block_n=16, block_k=32, split_k=split_k, num_warps=4, num_stages=1, form="words")
    out = wq_linear_triton(*args, bits=4, config=cfg)
    assert out.shape == (M, 40) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.cpu().float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_words_form_falls_back_to_the_byte_stream(kernel_device):
    """Operands the word form cannot read (fp32 activations; K not a multiple of 8) take the byte
    stream with the same tiles."""
    cfg = LinearConfig(block_m=2, block_n=16, block_k=32, split_k=2, num_warps=4, num_stages=1, form="words")
    for dtype, K, group in ((torch.float32, 64, 32), (torch.bfloat16, 68, 68)):  # 68: one group per row
        (x, qw, s, z, b), ref = _case(2, 24, K, 4, group, False, bias=True, dtype=dtype, device=kernel_device)
        assert not words_ok(x, qw, 4)
        out = wq_linear_triton(x, qw, s, z, b, bits=4, config=cfg)
        torch.testing.assert_close(out.cpu().float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,split_k", [(17, 3), (40, 1)])
@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, None, False), (8, 32, False), (8, None, True)])
def test_swapped_tensor_core_form(kernel_device, dtype, M, split_k, bits, group, symmetric):
    """The tensor-core form with the weights as the dot's left operand: M tiles with a partial last
    one, interleaved nibble planes, weights dequantized before the dot (per group and per
    channel, split or not), int4 codes by their bits in fp16; whole K tiles (unmasked loads,
    rows past M and N wrapping around: grouped) and a partial last tile (masked: per channel,
    K = 80)."""
    K = 192 if group else 80
    args, ref = _case(M, 40, K, bits, group or K, symmetric, bias=M == 17, dtype=dtype, device=kernel_device)
    cfg = LinearConfig(block_m=16, block_n=16, block_k=32, split_k=split_k, num_warps=4, num_stages=1, form="swap")
    out = wq_linear_triton(*args, bits=bits, config=cfg)
    assert out.shape == (M, 40) and out.dtype == dtype
    torch.testing.assert_close(out.cpu().float(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, None, False), (8, 64, False), (8, None, True)])
def test_dequantized_form(kernel_device, dtype, bits, group, symmetric):
    """The prefill form: the weight dequantized on the device equals ``dequantize_weight_ref`` bit
    for bit (the same fp32 arithmetic, one rounding to ``dtype``; N and K off the tiles), and the
    linear on it equals the reference."""
    K = 192 if group else 96
    qw = _weight(40, K, bits, group or K, symmetric)
    to = lambda t: None if t is None else t.to(kernel_device)  # noqa: E731
    w = dequantize_triton(to(qw.qweight), to(qw.scales), to(qw.zeros), bits, dtype, block_n=16, block_k=64)
    assert w.dtype == dtype and torch.equal(w.cpu(), dequantize_weight_ref(qw.qweight, qw.scales, qw.zeros, bits).to(dtype))
    args, ref = _case(33, 40, K, bits, group or K, symmetric, bias=True, dtype=dtype, device=kernel_device)
    out = wq_linear_triton(*args, bits=bits, config=LinearConfig(128, 16, 32, 1, 4, 1, "dequant"))
    assert out.shape == (33, 40) and out.dtype == dtype
    torch.testing.assert_close(out.cpu().float(), ref, **TOL[dtype])


def test_unknown_form_is_refused(kernel_device):
    args, _ = _case(1, 24, 64, 4, 32, True, bias=False, dtype=torch.float32, device=kernel_device)
    with pytest.raises(AssertionError, match="form"):
        wq_linear_triton(*args, bits=4, config=LinearConfig(1, 16, 32, 1, 4, 1, form="fast"))
    with pytest.raises(AssertionError, match="block_m and block_k >= 16"):
        wq_linear_triton(*args, bits=4, config=LinearConfig(1, 16, 32, 1, 4, 1, form="swap"))


def test_strided_scales_and_batched_input(kernel_device):
    """N-contiguous scales/zeros (the layout the runtime prepares) and a [B, T, K] input."""
    (x, qw, s, z, b), ref = _case(6, 40, 128, 4, 32, False, bias=False, dtype=torch.float32, device=kernel_device)
    s_t, z_t = s.t().contiguous().t(), z.t().contiguous().t()
    assert s_t.stride() == (1, 40)
    out = wq_linear_triton(x.view(2, 3, 128), qw, s_t, z_t, b, bits=4)
    assert out.shape == (2, 3, 40)
    torch.testing.assert_close(out.reshape(6, 40).cpu(), ref, **TOL[torch.float32])


RULE_MS = [1, 2, 3, 4, 5, 16, 17, 32, 33, 64, 65, 128, 256, 511, 512, 1024, 4096]
RULE_SHAPES = [(11008, 4096), (4096, 11008), (28672, 8192), (24, 192), (4096, 64)]  # (N, K)


@pytest.mark.parametrize("bits,group", [(4, 16), (4, 32), (4, 96), (4, 128), (4, None), (8, 32), (8, 128), (8, None)])
def test_rule_configs_keep_their_bounds(bits, group):
    """Whatever tiles the rules pick, at any M and shape: BLOCK_K is a power of two dividing the
    group (one scale per K tile); a GEMV form takes all rows in one tile and only at decode sizes;
    the tensor-core form pads rows to 16; the weight is dequantized once only at prefill sizes;
    K is split only for few rows, into splits of at least four K tiles, never more programs than
    the SMs want; and along M the forms go GEMV -> tensor cores -> dequant, never back."""
    cpu = torch.device("cpu")
    sms = triton_linear_tiles.num_sms(cpu)
    for N, K in RULE_SHAPES:
        g = group or K
        if g > K or K % g:
            continue
        order = []
        for M in RULE_MS:
            cfg = pick_config(M, N, K, g, bits, cpu)
            assert cfg.form in FORMS and cfg.form != "planes", cfg
            assert cfg.block_k & (cfg.block_k - 1) == 0 and (group is None or g % cfg.block_k == 0), (M, N, K, cfg)
            if cfg.form in ("words", "stream"):
                assert M <= GEMV_MAX_M and cfg.block_m >= M, (M, cfg)
                assert cfg.form == "stream" or bits == 4, cfg  # a word of 8 codes is int4's
            if cfg.form == "swap":
                assert 16 <= cfg.block_m and cfg.block_m & (cfg.block_m - 1) == 0, (M, cfg)
            assert (cfg.form == "dequant") == (M >= DEQUANT_MIN_M), (M, cfg)
            tiles = -(-M // cfg.block_m) * -(-N // cfg.block_n)
            if cfg.split_k > 1:
                assert M <= 64 and -(-K // cfg.block_k) >= 4 * cfg.split_k, (M, N, K, cfg)
                assert tiles * cfg.split_k <= max(tiles, 4 * sms), (M, N, K, cfg)
            order.append({"words": 0, "stream": 0, "swap": 1, "dequant": 2}[cfg.form])
        assert order == sorted(order) and order[0] == 0, (N, K, order)


def test_rules_split_k_where_the_output_tiles_leave_sms_idle():
    """At decode sizes a long K is split until the SMs have work (a decode GEMV of 11008 outputs
    has fewer output tiles than SMs); prefill sizes and short K are never split."""
    cpu = torch.device("cpu")
    sms = triton_linear_tiles.num_sms(cpu)
    for bits in (4, 8):
        cfg = pick_config(1, 11008, 4096, 128, bits, cpu)
        tiles = -(-11008 // cfg.block_n)
        assert tiles < sms and tiles * cfg.split_k >= sms, cfg
        assert pick_config(1, 11008, 64, 32, bits, cpu).split_k == 1  # two K tiles: nothing to split
        assert pick_config(256, 11008, 4096, 128, bits, cpu).split_k == 1


def test_tuned_entries_by_nearest_m():
    """A measured table answers for its shapes at the nearest M of the same form, else nothing."""
    gemv = LinearConfig(1, 256, 128, 4, 8, 1)
    dot = LinearConfig(32, 64, 64, 2, 4, 3)
    table = {(4, 128, 11008, 4096): [(1, gemv), (32, dot)]}
    assert tuned_config(table, 1, 11008, 4096, 128, 4) == gemv
    assert tuned_config(table, 3, 11008, 4096, 128, 4) == gemv._replace(block_m=4)  # tile rows follow M
    assert tuned_config(table, 200, 11008, 4096, 128, 4) == dot
    assert tuned_config(table, 1, 4096, 4096, 128, 4) is None  # a shape it does not hold
    swap4 = LinearConfig(16, 64, 128, 2, 4, 3, "swap")  # a tensor-core tile measured at 4 rows keeps its 16
    assert tuned_config({(4, 128, 11008, 4096): [(4, swap4)]}, 3, 11008, 4096, 128, 4) == swap4
    assert tuned_config({(4, 128, 11008, 4096): [(32, dot)]}, 1, 11008, 4096, 128, 4) is None


def test_tuned_dequant_entries_only_near_prefill(monkeypatch):
    """A measured dequant entry (the nearest M of a table) is not taken at decode sizes, where it
    would dequantize every weight per step; the rules answer there instead."""
    entry = LinearConfig(128, 64, 128, 1, 4, 1, "dequant")
    monkeypatch.setattr(triton_linear_tiles, "_tuned", lambda *a: entry)
    pick_config.cache_clear()
    try:
        cpu = torch.device("cpu")
        assert pick_config(64, 11008, 4096, 128, 4, cpu).form == "swap"
        assert pick_config(400, 11008, 4096, 128, 4, cpu) == entry
    finally:
        pick_config.cache_clear()


def test_tuned_table_carries_the_form(tmp_path, monkeypatch):
    """A table written by ``bench/gpu_tune.py`` names each entry's form; entries from before forms
    existed read as ``planes``."""
    import json

    entry = lambda M, **cfg: {"bits": 4, "group": 128, "N": 4096, "K": 4096, "M": M, "us": 1.0,  # noqa: E731
                              "config": dict(block_m=M, block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=1,
                                             **cfg)}
    (tmp_path / "Some_GPU.json").write_text(json.dumps({"entries": [entry(1, form="stream"), entry(32)]}))
    monkeypatch.setattr(triton_linear_tiles, "TUNED_DIR", tmp_path)
    triton_linear_tiles.tuned_table.cache_clear()
    try:
        table = triton_linear_tiles.tuned_table("Some GPU")
    finally:
        triton_linear_tiles.tuned_table.cache_clear()
    assert tuned_config(table, 2, 4096, 4096, 128, 4).form == "stream"
    assert tuned_config(table, 2, 4096, 4096, 128, 4).block_m == 2
    assert tuned_config(table, 40, 4096, 4096, 128, 4).form == "planes"


@pytest.mark.parametrize("bits,group", [(4, 16), (8, 16), (4, 96), (8, 96)])
def test_rules_take_any_group_size(kernel_device, bits, group):
    """Groups the compiler can write (int4 in 16s) and ones another tool can (96: not a power of
    two) run through the rules' tiles at every form's sizes: BLOCK_K is a power of two dividing
    the group."""
    K = 192
    for M in (1, 2, 5, 520):  # words/stream, stream or swap, swap, dequant
        cfg = pick_config(M, 24, K, group, bits, torch.device(kernel_device))
        assert group % cfg.block_k == 0 and cfg.block_k & (cfg.block_k - 1) == 0, cfg
        args, ref = _case(M, 24, K, bits, group, False, bias=True, dtype=torch.float16, device=kernel_device)
        out = wq_linear_triton(*args, bits=bits)
        torch.testing.assert_close(out.cpu().float(), ref, **TOL[torch.float16])


def test_bad_operands_are_refused(kernel_device):
    (x, qw, s, z, b), _ = _case(1, 24, 64, 4, 32, True, bias=False, dtype=torch.float32, device=kernel_device)
    with pytest.raises(AssertionError, match="uint8"):
        wq_linear_triton(x, qw.view(torch.int8), s, z, b, bits=4)
    with pytest.raises(AssertionError, match="scales"):
        wq_linear_triton(x, qw, s[:, :1].expand(24, 3), z, b, bits=4)
    (x, qw, s, z, b), _ = _case(1, 24, 64, 4, 8, True, bias=False, dtype=torch.float32, device=kernel_device)
    with pytest.raises(AssertionError, match="multiple of 16"):
        wq_linear_triton(x, qw, s, z, b, bits=4)
    # tensor-core tiles need a dot of K >= 16 per nibble plane on the GPU (the interpreter takes any)
    (x, qw, s, z, b), _ = _case(16, 24, 64, 4, 16, True, bias=False, dtype=torch.float32, device=kernel_device)
    for form in ("planes", "swap"):
        cfg = LinearConfig(16, 16, 16 if form == "planes" else 8, 1, 4, 1, form)
        with pytest.raises(AssertionError, match="block_k"):
            wq_linear_triton(x, qw, s, z, b, bits=4, config=cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 100, 600])  # each rule's form: words/stream, swap, dequant
@pytest.mark.parametrize("bits,group,symmetric", [(4, 128, False), (4, 64, True), (8, None, True)])
def test_bf16_on_gpu(M, bits, group, symmetric):
    K, N = 512, 384
    args, ref = _case(M, N, K, bits, group or K, symmetric, bias=True, dtype=torch.bfloat16, device="cuda")
    out = torch.ops.qc.w4a16_linear(*args) if bits == 4 else torch.ops.qc.w8a16_linear(*args)
    assert out.is_cuda and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().cpu(), ref, rtol=2e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("form,M", [("planes", 1), ("planes", 3), ("stream", 1), ("stream", 3), ("words", 1),
                                    ("words", 3), ("planes", 40), ("swap", 16), ("swap", 40), ("dequant", 40)])
@pytest.mark.parametrize("bits,group,symmetric", [(4, 128, False), (8, None, True)])
def test_forms_bf16_on_gpu(form, M, bits, group, symmetric):
    """Every form the tile sweep may pick, compiled for the card, split over K and not."""
    K, N = 1024, 384
    args, ref = _case(M, N, K, bits, group or K, symmetric, bias=True, dtype=torch.bfloat16, device="cuda")
    block_m = 1 if M == 1 else 4 if M <= 4 else 16 if M <= 16 else 64
    for block_n, block_k, warps, split in [(64, 128, 4, 4), (128, 64, 8, 1)]:
        cfg = LinearConfig(block_m, block_n, block_k, split, warps, 1 if M <= 4 else 3, form)
        out = wq_linear_triton(*args, bits=bits, config=cfg)
        torch.testing.assert_close(out.float().cpu(), ref, rtol=2e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("form,M", [("words", 1), ("stream", 2), ("planes", 3), ("swap", 17), ("dequant", 17)])
@pytest.mark.parametrize("bits,group,K,dtype", [(4, None, 1000, torch.bfloat16), (8, None, 1000, torch.bfloat16),
                                                (4, 16, 1008, torch.bfloat16), (8, 16, 1008, torch.bfloat16),
                                                (4, 96, 1056, torch.bfloat16), (4, 16, 1008, torch.float16)])
def test_forms_off_tile_shapes_on_gpu(form, M, bits, group, K, dtype):
    """K and N off every tile (masked loads; the swapped form's rows past N masked, not
    wrapped), groups of 16 and of 96, fp16 as well as bf16; each form forced and split over K,
    then the rules' own choice."""
    N = 392
    args, ref = _case(M, N, K, bits, group or K, False, bias=True, dtype=dtype, device="cuda")
    block_k = 64 if group is None else min(64, group & -group)
    block_m = 16 if M > 4 else 1 << (M - 1).bit_length()
    cfg = LinearConfig(block_m, 64, block_k, 3, 4, 1 if M <= 4 else 3, form)
    out = wq_linear_triton(*args, bits=bits, config=cfg)
    torch.testing.assert_close(out.float().cpu(), ref, rtol=2e-2, atol=5e-2)
    out = wq_linear_triton(*args, bits=bits)
    torch.testing.assert_close(out.float().cpu(), ref, rtol=2e-2, atol=5e-2)


@pytest.mark.gpu
def test_opcheck_on_gpu():
    args, _ = _case(3, 64, 256, 4, 64, False, bias=True, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.qc.w4a16_linear.default, args)
    args, _ = _case(3, 64, 256, 8, 64, True, bias=False, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.qc.w8a16_linear.default, args)
