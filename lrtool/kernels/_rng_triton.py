"""The Triton twin of counter_rng.py: the same 32-bit words for the same key and position, inside kernels.

Imported only by kernel modules (it imports Triton); counter_rng.py holds the definition and the torch
version, and the tests check that both give the same bits.
"""

import triton
import triton.language as tl


@triton.jit
def mix(x):
    """lowbias32 of uint32 words (arithmetic modulo 2^32, logical shifts)."""
    x ^= x >> 16
    x *= tl.full((), 0x7FEB352D, tl.uint32)
    x ^= x >> 15
    x *= tl.full((), 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def bits(k0, k1, position):
    """bits(key, p) for int64 positions; k0, k1 the key's words as int32 bit patterns. Returns uint32."""
    low = position.to(tl.uint32)
    high = (position >> 32).to(tl.uint32)
    x = mix(low ^ k0.to(tl.uint32, bitcast=True) ^ mix(high))
    return mix(x ^ k1.to(tl.uint32, bitcast=True))


@triton.jit
def kept(k0, k1, position, threshold):
    """Whether the entries at `position` are kept: bits < threshold (an int64 up to 2^32)."""
    return bits(k0, k1, position).to(tl.int64) < threshold
