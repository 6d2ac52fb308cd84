"""Tests of the fused compression kernels (ringreduce.compression.kernels) against the numpy reference."""
import itertools

import ml_dtypes
import numpy as np
import pytest

import quantize_reference as ref
from ringreduce.compression import kernels
from ringreduce.core.errors import RingReduceError

pytestmark = pytest.mark.skipif(not kernels.available(), reason="ringreduce._C not built")

BF16 = ml_dtypes.bfloat16
FORMATS = kernels.FORMATS
IN_DTYPES = (np.float32, np.float16, BF16)
BLOCKS = (32, 256)


ISAS = kernels._C.supported_isas() if kernels.available() else ["baseline"]


@pytest.fixture(params=ISAS)
def isa(request):
    """Run under each CPU build (baseline, avx2, avx512): all must give the same bytes."""
    prev = kernels._C.isa()
    kernels._C.set_isa(request.param)
    yield request.param
    kernels._C.set_isa(prev)


def lengths(B):
    return (0, 1, B - 1, B, B + 1, 100003)


def data(n, dtype, seed=0, tail=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, n) if tail else rng.standard_normal(n)
    # blocks of varied magnitude, so scales differ between blocks
    x = x * np.exp2(rng.integers(-6, 6, n // 64 + 1)).repeat(64)[:n]
    return x.astype(np.float32).astype(dtype)


def run(fmt, x, residual=None, B=256, **kw):
    B = kw.pop("block_size", B)     # the GPU tests pass the kernels' own keyword
    out = np.empty(kernels.packed_nbytes(fmt, x.size, B), np.uint8)
    res = None if residual is None else residual.copy()
    bad = kernels.compress(fmt, x, out, residual=res, block_size=B, **kw)
    return out, res, bad


def assert_bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    av, bv = a.view(np.uint8), b.view(np.uint8)
    if not np.array_equal(av, bv):
        i = int(np.flatnonzero(av != bv)[0])
        pytest.fail(f"first difference at byte {i}: {av[i]} != {bv[i]}")


# ---- bit-exact against the reference ------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", IN_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("B", BLOCKS)
def test_compress_matches_reference(fmt, dtype, B, isa):
    for n, use_res, clip, stoch in itertools.product(
            lengths(B), (False, True), (None, 1.5), (False, True)):
        x = data(n, dtype, seed=n)
        residual = data(n, np.float32, seed=n + 1) * np.float32(0.1) if use_res else None
        kw = dict(clip=clip, stochastic=stoch, seed=7, counter=3, offset=11)
        out, res, bad = run(fmt, x, residual, B, **kw)
        rout, rres, rbad = ref.compress(fmt, x, residual, B, **kw)
        case = f"n={n} res={use_res} clip={clip} stochastic={stoch}"
        assert bad == rbad == 0, case
        assert_bits_equal(out, rout)
        if use_res:
            assert_bits_equal(res, rres)
        y = np.empty(n, np.float32)
        kernels.decompress(fmt, out, n, y, block_size=B)
        assert_bits_equal(y, ref.decompress(fmt, out, n, B))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("odtype", (np.float16, BF16), ids=("float16", "bfloat16"))
def test_decompress_half_outputs(fmt, odtype, isa):
    x = data(1000, np.float32)
    out, _, _ = run(fmt, x)
    y = np.empty(1000, odtype)
    kernels.decompress(fmt, out, 1000, y)
    assert_bits_equal(y, ref.decompress(fmt, out, 1000).astype(odtype))


@pytest.mark.parametrize("fmt", FORMATS)
def test_decompress_accumulate(fmt, isa):
    n, B = 5000, 256
    out, _, _ = run(fmt, data(n, np.float32), B=B)
    d = ref.decompress(fmt, out, n, B)
    for alpha in (1.0, 0.25, -1.0 / 3):
        acc = data(n, np.float32, seed=5)
        expect = acc + np.float32(alpha) * d
        kernels.decompress_accumulate(fmt, out, n, acc, alpha=alpha, block_size=B)
        assert_bits_equal(acc, expect)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", IN_DTYPES, ids=lambda d: np.dtype(d).name)
def test_compress_divisor_is_dividing_first(fmt, dtype, isa):
    # divisor=k: the bytes and residual of compressing x / float32(k) (an Average's division,
    # fused into the pass), non-finite values included; k = 1 divides nothing.
    n, B = 3000, 256
    x = data(n, dtype, seed=3)
    x[700] = np.nan
    for k, use_res, clip in itertools.product((1, 2, 3, 7), (False, True), (None, 0.75)):
        residual = data(n, np.float32, seed=4) * np.float32(0.1) if use_res else None
        kw = {"clip": clip, "stochastic": fmt == "int4", "seed": 1, "counter": 2, "offset": 5}
        out, res, bad = run(fmt, x, residual, B, divisor=k, **kw)
        first = (x.astype(np.float32) / np.float32(k)).astype(np.float32)
        rout, rres, rbad = ref.compress(fmt, first, residual, B, **kw)
        assert bad == rbad
        assert_bits_equal(out, rout)
        if use_res:
            assert_bits_equal(res, rres)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("odtype", IN_DTYPES, ids=lambda d: np.dtype(d).name)
def test_decompress_divisor(fmt, odtype, isa):
    # out = dequant / float32(k) in fp32, then rounded to out's dtype: one pass.
    n = 2000
    x = data(n, np.float32, seed=6)
    x[1500] = np.inf
    out, _, _ = run(fmt, x)
    d = ref.decompress(fmt, out, n)
    for k in (1, 2, 3, 7):
        y = np.empty(n, odtype)
        kernels.decompress(fmt, out, n, y, divisor=k)
        with np.errstate(invalid="ignore"):
            assert_bits_equal(y, (d / np.float32(k)).astype(np.float32).astype(odtype))
    with pytest.raises(RingReduceError, match="divisor"):
        kernels.decompress(fmt, out, n, np.empty(n, np.float32), divisor=0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("vdtype", IN_DTYPES, ids=lambda d: np.dtype(d).name)
def test_compress_values_are_what_decompress_writes(fmt, vdtype, isa):
    # values=: the decoded result written in the compress pass, the bits of a separate
    # decompress, for every block kind (zero-scale, non-finite, short last) and rounding.
    n, B = 3000, 256
    x = data(n, np.float32, seed=9)
    x[:B] = -1e-35
    x[B + 3] = np.nan
    x[2 * B + 1] = -np.inf
    for use_res, stoch, k in itertools.product((False, True), (False, True), (1, 3)):
        residual = data(n, np.float32, seed=10) * np.float32(0.1) if use_res else None
        vals = np.full(n, 7, vdtype)
        out, res, bad = run(fmt, x, residual, B, stochastic=stoch, seed=4, divisor=k,
                            values=vals)
        rout, rres, rbad = run(fmt, x, residual, B, stochastic=stoch, seed=4, divisor=k)
        assert bad == rbad == 2
        assert_bits_equal(out, rout)
        if use_res:
            assert_bits_equal(res, rres)
        y = np.empty(n, vdtype)
        kernels.decompress(fmt, out, n, y, block_size=B)
        assert_bits_equal(vals, y)
    with pytest.raises(RingReduceError, match="values"):
        run(fmt, x, None, B, values=np.empty(n - 1, np.float32))


@pytest.mark.parametrize("fmt", ("int8", "int4"))
def test_scaled_formats_never_decode_negative_zero(fmt, isa):
    # The compressed allreduce decodes rank 0's piece straight into its accumulator instead
    # of adding it to 0.0, which is the same bits only because no decoded value is -0.0:
    # zero levels, zero-scale blocks (tiny, negative or -0.0 inputs) and rounding included.
    n, B = 4096, 64
    x = data(n, np.float32, seed=8)
    x[:B] = -1e-35                     # below kTiny: a zero-scale block of negative values
    x[B:2 * B] = -0.0
    x[2 * B:3 * B:2] = -1e-3           # mostly zero levels next to one large value
    x[2 * B + 1] = 50.0
    for stoch in (False, True):
        out, _, _ = run(fmt, x, np.zeros(n, np.float32), B, stochastic=stoch, seed=2)
        y = np.empty(n, np.float32)
        kernels.decompress(fmt, out, n, y, block_size=B)
        assert not np.any((y == 0) & np.signbit(y)), "a -0.0 was decoded"


# ---- fp16 / bf16 conversions: every path, every kind of value ------------------------------
# The avx2/avx512 builds convert with F16C / AVX-512F (vcvtps2ph, vcvtph2ps), the baseline
# with branch-free integer code; all must give the reference's bytes, specials included.

def _bit_patterns():
    """float32 bit patterns: a sweep of all 2^32 (a prime stride), every fp16/bf16 rounding
    boundary region, both signs, denormals, Inf and NaNs (quiet, signalling, payloads)."""
    sweep = np.arange(0, 2**32, 65521, dtype=np.uint64).astype(np.uint32)
    # around each fp16 exponent boundary and tie: the fp32 patterns whose low 13 bits are near
    # 0x1000 (half way), for every fp16 exponent, both signs
    halves = np.arange(0, 2**16, dtype=np.uint32)
    ties = (np.float16(1).view(np.uint16) * 0 + halves).astype(np.uint32)
    f16_as_f32 = np.frombuffer(ties.astype(np.uint16).view(np.float16).astype(np.float32)
                               .tobytes(), np.uint32)
    near = (f16_as_f32[:, None] + np.array([0, 1, 0xfff, 0x1000, 0x1001, 0x1fff],
                                           np.uint32)[None, :]).reshape(-1)
    bf = (halves[:, None] << 16) + np.array([0x7fff, 0x8000, 0x8001, 0x18000], np.uint32)
    special = np.array([0, 0x80000000, 0x7f800000, 0xff800000, 0x7fc00000, 0xffc00000,
                        0x7f800001, 0x7fbfffff, 0x7fc02000, 0xff802001, 0x1, 0x807fffff,
                        0x477fefff, 0x477ff000, 0x477fe000, 0x47800000, 0x33000000, 0x33000001,
                        0x387fc000, 0x38800000], np.uint32)
    return np.concatenate([sweep, near, bf.reshape(-1), special]).view(np.float32)


@pytest.mark.parametrize("fmt", ("fp16", "bf16"))
def test_half_conversion_bit_patterns(fmt, isa):
    x = _bit_patterns()
    for n in (x.size, 37, 16, 15, 1):     # vector groups and scalar tails
        for res in (None, np.zeros(n, np.float32)):
            out, r, bad = run(fmt, x[:n], res, B=256)
            rout, rres, rbad = ref.compress(fmt, x[:n], res, 256)
            assert_bits_equal(out, rout)
            assert bad == rbad
            if res is not None:
                assert_bits_equal(r, rres)


@pytest.mark.parametrize("fmt", ("fp16", "bf16"))
@pytest.mark.parametrize("odtype", (np.float32, np.float16, BF16), ids=lambda d: np.dtype(d).name)
def test_half_decompress_all_values(fmt, odtype, isa):
    # Every 16-bit pattern (signalling NaNs included: vcvtph2ps would quiet them) decoded at
    # every position of a vector group.
    packed = np.arange(2**16, dtype=np.uint16)
    for shift in (0, 1, 7, 15):
        p = np.roll(packed, shift).view(np.uint8)
        y = np.empty(2**16, odtype)
        kernels.decompress(fmt, p, 2**16, y)
        expect = ref.decompress(fmt, p, 2**16)
        if np.dtype(odtype) == np.float32:
            assert_bits_equal(y, expect)
        else:   # finite values and Inf are exact; NaN stays NaN
            ok = np.isnan(expect)
            assert np.array_equal(np.isnan(y.astype(np.float32)), ok)
            with np.errstate(over="ignore"):
                assert_bits_equal(y[~ok], expect[~ok].astype(odtype))
        acc = np.zeros(2**16, np.float32)
        kernels.decompress_accumulate(fmt, p, 2**16, acc)
        with np.errstate(invalid="ignore"):
            assert_bits_equal(acc, np.float32(0) + expect)


@pytest.mark.parametrize("dtype", (np.float16, BF16), ids=lambda d: np.dtype(d).name)
def test_half_reduce_bit_patterns(dtype, isa):
    # Random 16-bit patterns on both sides (NaN meets a number, never another NaN, whose
    # payload choice is unspecified), every position of a vector group.
    rng = np.random.default_rng(3)
    for n in (2**16 + 5, 31):
        d = rng.integers(0, 2**16, n, dtype=np.uint16).view(dtype)
        s = rng.integers(0, 2**16, n, dtype=np.uint16).view(dtype)
        both = np.isnan(d.astype(np.float32)) & np.isnan(s.astype(np.float32))
        s[both] = dtype(1.0)
        for op, uf in (("sum", np.add), ("min", np.minimum), ("max", np.maximum)):
            expect = d.copy()
            with np.errstate(all="ignore"):
                uf(expect, s, out=expect)
            got = d.copy()
            kernels.reduce_(op, got, s)
            if op != "sum":
                # min/max of +0 and -0: either operand (as in numpy); a NaN operand comes back
                # as a quiet NaN (fp16: its payload kept, bf16: 0x7fc0), numpy returns it as is
                z = (d.astype(np.float32) == 0) & (s.astype(np.float32) == 0)
                nan = np.isnan(expect.astype(np.float32))
                assert np.array_equal(np.isnan(got.astype(np.float32)), nan)
                got[z | nan] = expect[z | nan]
            assert_bits_equal(got, expect)


def test_stochastic_rng_depends_on_key_and_splits_by_offset():
    x = data(4096, np.float32)
    a, _, _ = run("int4", x, stochastic=True, seed=1, counter=0)
    b, _, _ = run("int4", x, stochastic=True, seed=1, counter=1)
    c, _, _ = run("int4", x, stochastic=True, seed=2, counter=0)
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    # two halves at matching offsets give the payload of one call (block-aligned split)
    h0, _, _ = run("int4", x[:2048], stochastic=True, seed=1, counter=0, offset=0)
    h1, _, _ = run("int4", x[2048:], stochastic=True, seed=1, counter=0, offset=2048)
    nb = 4096 // 256
    assert np.array_equal(a[: 4 * nb], np.concatenate([h0[: 4 * 8], h1[: 4 * 8]]))
    assert np.array_equal(a[4 * nb:], np.concatenate([h0[4 * 8:], h1[4 * 8:]]))


def test_stochastic_rounding_is_unbiased():
    x = np.full(256, 0.3, np.float32)
    x[0] = 7.0  # scale 1: every other value should round to 0 or 1 with mean 0.3
    total = np.zeros(256, np.float64)
    for counter in range(200):
        out, _, _ = run("int4", x, stochastic=True, counter=counter)
        y = np.empty(256, np.float32)
        kernels.decompress("int4", out, 256, y)
        total += y
    assert abs(total[1:].mean() / 200 - 0.3) < 0.01


# ---- error bounds and the residual identity -------------------------------------------

# max |error| relative to the block's max |v| (int8/int4: half a level)
BOUND = {"fp16": 2.0**-11, "bf16": 2.0**-8, "int8": 0.5 / 127 * 1.0001, "int4": 0.5 / 7 * 1.0001}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tail", (False, True), ids=("gaussian", "student-t"))
def test_round_trip_error(fmt, tail):
    n, B = 65536, 256
    x = data(n, np.float32, seed=3, tail=tail)
    out, res, bad = run(fmt, x, np.zeros(n, np.float32), B)
    y = np.empty(n, np.float32)
    kernels.decompress(fmt, out, n, y, block_size=B)
    assert bad == 0
    err = np.abs(y - x).reshape(-1, B)
    if fmt in ("fp16", "bf16"):
        # half an ulp, or half the fp16 subnormal spacing 2^-24
        floor = 2.0**-25 if fmt == "fp16" else 0.0
        assert np.all(err <= np.maximum(np.abs(x).reshape(-1, B) * BOUND[fmt], floor))
    elif fmt == "onebit":
        # decoded magnitude is the block's mean |x|; the sign is kept
        mean = np.abs(x).reshape(-1, B).mean(axis=1, keepdims=True)
        assert np.allclose(np.abs(y).reshape(-1, B), mean, rtol=1e-5)
        assert np.all(np.sign(y) == np.where(x >= 0, 1, -1))
    else:
        amax = np.abs(x).reshape(-1, B).max(axis=1, keepdims=True)
        assert np.all(err <= amax * BOUND[fmt])
    # residual identity: v == dequant + residual to fp32 rounding
    assert np.allclose(y + res, x, rtol=0, atol=np.abs(x).max() * 2.0**-23 * 2)
    rel = np.linalg.norm(y - x) / np.linalg.norm(x)
    assert rel < {"fp16": 1e-3, "bf16": 5e-3, "int8": 0.02, "int4": 0.3, "onebit": 1.0}[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
def test_error_feedback_accumulates_to_the_sum(fmt):
    # with error feedback the sum of decoded steps tracks the sum of inputs
    n, steps = 4096, 20
    res = np.zeros(n, np.float32)
    sent = np.zeros(n, np.float64)
    total = np.zeros(n, np.float64)
    for s in range(steps):
        x = data(n, np.float32, seed=100 + s)
        out = np.empty(kernels.packed_nbytes(fmt, n), np.uint8)
        kernels.compress(fmt, x, out, residual=res)
        y = np.empty(n, np.float32)
        kernels.decompress(fmt, out, n, y)
        sent += y
        total += x
    assert np.allclose(sent + res, total, atol=1e-3)


@pytest.mark.parametrize("fmt", ("int8", "int4", "onebit"))
def test_zero_block_has_zero_scale(fmt):
    n = 800
    x = np.zeros(n, np.float32)
    x[10:20] = 1e-27  # block 0: tiny but above 2^-100, so a real (tiny) scale
    x[256 + 7] = 1e-40  # block 1: zeros and one subnormal, below 2^-100 -> scale 0
    x[512:] = 1.0
    out, res, bad = run(fmt, x, np.zeros(n, np.float32))
    scales = out[:16].view("<f4")
    assert bad == 0 and np.all(np.isfinite(scales))
    y = np.empty(n, np.float32)
    kernels.decompress(fmt, out, n, y)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(res))
    assert scales[0] > 0 and scales[1] == 0 and res[256 + 7] == np.float32(1e-40)
    z = np.zeros(256, np.float32)
    out, res, _ = run(fmt, z, np.zeros(256, np.float32))
    assert out[:4].view("<f4")[0] == 0 and np.all(res == 0)
    if fmt != "onebit":  # onebit keeps sign bits (+ for zeros) and decodes them to +-0
        assert not np.any(out[4:])
    kernels.decompress(fmt, out, 256, y[:256])
    assert np.all(y[:256] == 0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad_value", (np.nan, np.inf, -np.inf))
def test_nonfinite_block(fmt, bad_value, isa):
    n, B = 1000, 256
    x = data(n, np.float32)
    x[300] = bad_value  # block 1
    res = np.full(n, 0.01, np.float32)
    out, res2, bad = run(fmt, x, res, B, clip=0.5)
    rout, rres, rbad = ref.compress(fmt, x, res, B, clip=0.5)
    assert bad == rbad == 1
    assert_bits_equal(out, rout)
    assert_bits_equal(res2, rres)
    assert np.all(res2[256:512] == 0) and np.all(np.isfinite(res2))
    y = np.empty(n, np.float32)
    kernels.decompress(fmt, out, n, y, block_size=B)
    if fmt in ("fp16", "bf16"):
        assert not np.isfinite(y[300]) and np.isfinite(np.delete(y, 300)).all()
    else:
        assert np.all(np.isnan(y[256:512]))  # the whole block decodes to NaN
        assert np.isfinite(np.delete(y, np.s_[256:512])).all()
    acc = np.zeros(n, np.float32)
    kernels.decompress_accumulate(fmt, out, n, acc, block_size=B)
    assert not np.isfinite(acc[300])


def test_fp16_overflow_counts_as_nonfinite():
    x = np.full(64, 70000.0, np.float32)
    out, res, bad = run("fp16", x, np.zeros(64, np.float32), B=32)
    assert bad == 2 and np.all(res == 0)
    assert np.all(out.view(np.float16) == np.inf)


# ---- reduce_ ---------------------------------------------------------------------------

RED_DTYPES = (np.float16, BF16, np.float32, np.float64, np.int8, np.uint8, np.int32, np.int64)


def red_data(dtype, n, seed):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, n, endpoint=True, dtype=dtype)
    x = (rng.standard_normal(n) * 1000).astype(np.float32)
    x[::97] = np.nan
    x[5::101] = np.inf
    x[7::103] = -np.inf
    x[11::89] = 65000  # fp16 sums overflow here
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", RED_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", ("sum", "min", "max"))
def test_reduce_matches_numpy(dtype, op, isa):
    n = 10007
    d, s = red_data(dtype, n, 1), red_data(dtype, n, 2)
    s[::97] = d[::97]  # same NaN on both sides at some places
    expect = d.copy()
    with np.errstate(all="ignore"):
        {"sum": np.add, "min": np.minimum, "max": np.maximum}[op](expect, s, out=expect)
    got = d.copy()
    kernels.reduce_(op, got, s)
    assert_bits_equal(got, expect)


def test_reduce_rejects_mismatch():
    with pytest.raises(RingReduceError, match="float32"):
        kernels.reduce_("sum", np.zeros(4, np.float32), np.zeros(4, np.float64))
    with pytest.raises(RingReduceError, match="elements"):
        kernels.reduce_("sum", np.zeros(4, np.float32), np.zeros(5, np.float32))
    with pytest.raises(RingReduceError, match="op"):
        kernels.reduce_("prod", np.zeros(4, np.float32), np.zeros(4, np.float32))


# ---- validation ---------------------------------------------------------------------------

def test_validation_errors():
    x = np.zeros(100, np.float32)
    out = np.empty(kernels.packed_nbytes("int8", 100), np.uint8)
    with pytest.raises(RingReduceError, match="format"):
        kernels.compress("int3", x, out)
    with pytest.raises(RingReduceError, match="block_size"):
        kernels.compress("int8", x, out, block_size=12)
    with pytest.raises(RingReduceError, match="packed output of tensor 'g'"):
        kernels.compress("int8", x, out[:-1], name="g")
    with pytest.raises(RingReduceError, match="residual"):
        kernels.compress("int8", x, out, residual=np.zeros(100, np.float64))
    with pytest.raises(RingReduceError, match="dtype"):
        kernels.compress("int8", x.astype(np.float64), out)
    with pytest.raises(RingReduceError, match="clip"):
        kernels.compress("int8", x, out, clip=-1.0)
    with pytest.raises(RingReduceError, match="contiguous"):
        kernels.compress("int8", np.zeros(200, np.float32)[::2], out)
    with pytest.raises(RingReduceError, match="accumulator"):
        kernels.decompress_accumulate("int8", out, 100, np.zeros(100, np.float16))


def test_torch_cpu_tensors():
    torch = pytest.importorskip("torch")
    x = torch.randn(1000, dtype=torch.bfloat16)
    out = torch.empty(kernels.packed_nbytes("int8", 1000), dtype=torch.uint8)
    res = torch.zeros(1000)
    kernels.compress("int8", x, out, residual=res)
    rout, rres, _ = ref.compress("int8", x.view(torch.int16).numpy().view(BF16),
                                 np.zeros(1000, np.float32))
    assert_bits_equal(out.numpy(), rout)
    assert_bits_equal(res.numpy(), rres)


# ---- GPU: CUDA bytes == CPU bytes ------------------------------------------------------------

def _cupy():
    cp = pytest.importorskip("cupy")
    if not kernels.cuda_available():
        pytest.skip("no CUDA GPU or ringreduce._C_cuda not built")
    return cp


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_matches_cpu(fmt):
    cp = _cupy()
    for dtype, B, n, use_res, clip, stoch in itertools.product(
            (np.float32, np.float16), BLOCKS, (1, 33, 100003), (False, True), (None, 1.5),
            (False, True)):
        x = data(n, dtype, seed=n)
        x[n // 2] = np.nan if n > 1000 else x[n // 2]
        residual = data(n, np.float32, seed=n + 1) * np.float32(0.1) if use_res else None
        kw = dict(block_size=B, clip=clip, stochastic=stoch, seed=7, counter=3, offset=11)
        out, res, bad = run(fmt, x, residual, **kw)
        dout = cp.empty(out.size, cp.uint8)
        dres = cp.asarray(residual) if use_res else None
        dbad = kernels.compress(fmt, cp.asarray(x), dout, residual=dres, **kw)
        assert dbad == bad
        assert_bits_equal(cp.asnumpy(dout), out)
        if use_res:
            assert_bits_equal(cp.asnumpy(dres), res)
        for odt in (np.float32, np.float16):
            y = np.empty(n, odt)
            kernels.decompress(fmt, out, n, y, block_size=B)
            dy = cp.empty(n, odt)
            kernels.decompress(fmt, dout, n, dy, block_size=B)
            assert_bits_equal(cp.asnumpy(dy), y)
        for k in (2, 3):     # an Average's divisor, fused into compress and decompress
            kout, kres, _ = run(fmt, x, residual, divisor=k, **kw)
            dkout = cp.empty(out.size, cp.uint8)
            dkres = cp.asarray(residual) if use_res else None
            kernels.compress(fmt, cp.asarray(x), dkout, residual=dkres, divisor=k, **kw)
            assert_bits_equal(cp.asnumpy(dkout), kout)
            if use_res:
                assert_bits_equal(cp.asnumpy(dkres), kres)
            y = np.empty(n, np.float32)
            kernels.decompress(fmt, out, n, y, block_size=B, divisor=k)
            dy = cp.empty(n, np.float32)
            kernels.decompress(fmt, dout, n, dy, block_size=B, divisor=k)
            assert_bits_equal(cp.asnumpy(dy), y)
            for vdt in (np.float32, np.float16):    # the decoded result written in the pass
                dv = cp.empty(n, vdt)
                kernels.compress(fmt, cp.asarray(x), cp.empty(out.size, cp.uint8), divisor=k,
                                 values=dv, **kw)
                v = np.empty(n, vdt)
                run(fmt, x, None, divisor=k, values=v, **kw)
                assert_bits_equal(cp.asnumpy(dv), v)
        acc = data(n, np.float32, seed=9)
        dacc = cp.asarray(acc)
        kernels.decompress_accumulate(fmt, out, n, acc, alpha=0.5, block_size=B)
        kernels.decompress_accumulate(fmt, dout, n, dacc, alpha=0.5, block_size=B)
        assert_bits_equal(cp.asnumpy(dacc), acc)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (np.float16, np.float32, np.float64, np.int8, np.uint8,
                                   np.int32, np.int64), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", ("sum", "min", "max"))
def test_cuda_reduce_matches_cpu(dtype, op):
    cp = _cupy()
    d, s = red_data(dtype, 10007, 1), red_data(dtype, 10007, 2)
    s[::97] = d[::97]
    dd = cp.asarray(d)
    kernels.reduce_(op, d, s)
    kernels.reduce_(op, dd, cp.asarray(s))
    assert_bits_equal(cp.asnumpy(dd), d)
