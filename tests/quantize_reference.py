"""Readable numpy reference of ringreduce's compression formats (docs/kernels.md).

Every function here follows csrc/quantize.h step by step, in float32, so the
compiled kernels must match it byte for byte.  It is deliberately written
with numpy's own conversions (astype float16, ml_dtypes bfloat16, np.rint)
rather than the kernels' bit tricks, so the two implementations check each
other.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

F32 = np.float32
TINY = F32(2.0**-100)  # blocks below this (max |v|, or mean |v| for onebit) encode as zeros
LANES = 32
GOLDEN = 0x9E3779B97F4A7C15
M64 = (1 << 64) - 1
QMAX = {"int8": F32(127), "int4": F32(7)}


# ---- RNG: splitmix64 finaliser, keyed by (seed, counter, offset + i) ----------

def mix64(z):
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = z ^ (z >> np.uint64(30))
        z = z * np.uint64(0xBF58476D1CE4E5B9)
        z = z ^ (z >> np.uint64(27))
        z = z * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z


def rng_key(seed: int, counter: int) -> int:
    """Per-call key: mix64(seed ^ mix64(counter + golden))."""
    return int(mix64(np.uint64(seed) ^ mix64(np.uint64((counter + GOLDEN) & M64))))


def uniform(key: int, seed_index):
    """Uniform float32 in [0, 1) with 24 bits for each uint64 element index."""
    with np.errstate(over="ignore"):
        idx = np.asarray(seed_index, dtype=np.uint64) + np.uint64(1)
        r = mix64(np.uint64(key) + np.uint64(GOLDEN) * idx)
    return (r >> np.uint64(40)).astype(F32) * F32(2.0**-24)


# ---- compress ------------------------------------------------------------------

def packed_nbytes(fmt, n, B):
    nb = -(-n // B)
    return {"fp16": 2 * n, "bf16": 2 * n, "int8": 4 * nb + n, "int4": 4 * nb + (n + 1) // 2,
            "onebit": 4 * nb + (n + 7) // 8}[fmt]


def stage(x, residual, clip):
    """v = x + residual in fp32, finite values clipped to [-clip, clip]."""
    v = x.astype(F32)
    if residual is not None:
        v = v + residual
    if clip is not None:
        c = F32(clip)
        v = np.where(np.isfinite(v) & (np.abs(v) > c), np.copysign(c, v), v).astype(F32)
    return v


def lane_sum(a, B):
    """Per-block sum of a (n,) float32 array in the kernels' 32-lane order."""
    nb = -(-a.size // B)
    bp = -(-B // LANES) * LANES
    w = np.zeros((nb, bp), F32)
    padded = np.zeros(nb * B, F32)
    padded[: a.size] = a
    w[:, :B] = padded.reshape(nb, B)
    w = w.reshape(nb, bp // LANES, LANES)
    part = np.zeros((nb, LANES), F32)
    for k in range(bp // LANES):  # lane j adds elements j, j+32, ... in order
        part = part + w[:, k, :]
    off = LANES // 2
    while off:
        part[:, :off] = part[:, :off] + part[:, off: 2 * off]
        off //= 2
    return part[:, 0]


def compress(fmt, x, residual=None, block_size=256, clip=None, stochastic=False, seed=0,
             counter=0, offset=0):
    """Reference compress: returns (packed uint8 array, new residual or None, bad blocks)."""
    B = block_size
    n = x.size
    nb = -(-n // B)
    v = stage(x, residual, clip)
    blk = np.arange(n) // B
    count = np.minimum(B, n - np.arange(nb) * B).astype(F32)
    bad = np.zeros(nb, bool)
    np.logical_or.at(bad, blk, ~np.isfinite(v))

    if fmt in ("fp16", "bf16"):
        with np.errstate(over="ignore"):    # fp16 overflow to Inf is the documented rule
            h = v.astype(np.float16 if fmt == "fp16" else ml_dtypes.bfloat16)
        if fmt == "fp16":
            # NaN: a quiet NaN keeping the sign and the top payload bits, as F16C does (numpy's
            # own conversion keeps a signalling NaN signalling instead)
            bits = v.view(np.uint32)
            nan = (bits & 0x7fffffff) > 0x7f800000
            h = h.view(np.uint16)
            h[nan] = (((bits[nan] >> 16) & 0x8000) | 0x7e00 | ((bits[nan] >> 13) & 0x3ff)
                      ).astype(np.uint16)
            h = h.view(np.float16)
        d = h.astype(F32)
        bad = np.zeros(nb, bool)
        np.logical_or.at(bad, blk, ~np.isfinite(d))
        res = None
        if residual is not None:
            with np.errstate(invalid="ignore"):  # inf - inf in blocks that are reset anyway
                res = np.where(bad[blk], F32(0), v - d).astype(F32)
        return h.view(np.uint8).copy(), res, int(bad.sum())

    absv = np.abs(v)
    if fmt == "onebit":
        s = lane_sum(np.where(np.isfinite(v), absv, F32(0)), B) / count
        scale = np.where(s < TINY, F32(0), s).astype(F32)
        inv = np.where(scale == 0, F32(0), F32(1) / np.where(scale == 0, F32(1), scale))
    else:
        amax = np.zeros(nb, F32)
        np.maximum.at(amax, blk, np.where(np.isfinite(v), absv, F32(0)))
        qmax = QMAX[fmt]
        scale = np.where(amax < TINY, F32(0), amax / qmax).astype(F32)
        inv = np.where(scale == 0, F32(0), qmax / np.where(scale == 0, F32(1), amax))
    inv = inv.astype(F32)
    ve = np.where(bad[blk], F32(0), v)  # values of bad blocks are not encoded
    t = ve * inv[blk]
    u = uniform(rng_key(seed, counter), np.uint64(offset) + np.arange(n, dtype=np.uint64)) \
        if stochastic else np.zeros(n, F32)

    if fmt == "onebit":
        if stochastic:
            q = (u < F32(0.5) + F32(0.5) * t).astype(np.int32)
        else:
            q = (ve >= 0).astype(np.int32)
        d = np.where(q == 1, scale[blk], -scale[blk]).astype(F32)
        q = np.where(bad[blk], 0, q)  # bad blocks carry an all-zero payload
        payload = np.packbits(q.astype(np.uint8), bitorder="little")
    else:
        qmax = QMAX[fmt]
        q = np.floor(t + u) if stochastic else np.rint(t)
        q = np.clip(q, -qmax, qmax).astype(F32)
        d = (q * scale[blk]).astype(F32)
        qi = np.where(bad[blk], 0, q.astype(np.int32))
        if fmt == "int8":
            payload = qi.astype(np.int8).view(np.uint8)
        else:
            nib = np.zeros(n + (n & 1), np.uint8)
            nib[:n] = (qi & 0xF).astype(np.uint8)
            payload = nib[0::2] | (nib[1::2] << 4)
    scale = np.where(bad, F32(np.nan), scale).astype("<f4")
    res = None
    if residual is not None:
        res = np.where(bad[blk], F32(0), v - d).astype(F32)
    packed = np.concatenate([scale.view(np.uint8), np.asarray(payload, np.uint8)])
    return packed, res, int(bad.sum())


# ---- decompress ------------------------------------------------------------------

def decompress(fmt, packed, n, block_size=256):
    """Reference dequantisation to float32."""
    if fmt == "fp16":
        return packed[: 2 * n].view(np.float16).astype(F32)
    if fmt == "bf16":
        return packed[: 2 * n].view(ml_dtypes.bfloat16).astype(F32)
    nb = -(-n // block_size)
    scale = packed[: 4 * nb].view("<f4").astype(F32)
    payload = packed[4 * nb:]
    s = scale[np.arange(n) // block_size]
    if fmt == "int8":
        return (payload[:n].view(np.int8).astype(F32) * s).astype(F32)
    if fmt == "int4":
        nib = np.stack([payload & 0xF, payload >> 4], axis=1).reshape(-1)[:n].astype(np.int32)
        return (((nib ^ 8) - 8).astype(F32) * s).astype(F32)
    bits = np.unpackbits(payload, bitorder="little")[:n]
    return np.where(bits == 1, s, -s).astype(F32)
