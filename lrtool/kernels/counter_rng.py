"""Counter-based random bits: one 32-bit word per (key, position), the same on every device and launch shape.

    bits(key, p) = mix(mix(lo(p) ^ k0 ^ mix(hi(p))) ^ k1)

key = (k0, k1), two 32-bit words; p >= 0 an entry's position (its row-major flat index); lo(p), hi(p) its low
and high 32-bit halves; mix Chris Wellons' `lowbias32` integer hash, a bijection of 32-bit words with good
avalanche (xorshift 16, multiply by 0x7feb352d, xorshift 15, multiply by 0x846ca68b, xorshift 16; arithmetic
modulo 2^32). A draw depends on the key and the position alone, not on chunks, launches or the device: the
Triton twin in _rng_triton.py gives the same bits, which is how DARE drops the same entries on the CPU and on
a GPU for one seed, and how the fused LoRA linear redraws its dropout mask in the backward pass instead of
storing it.

An entry is kept with probability D when bits < keep_threshold(D) = round(D * 2^32): an integer comparison,
free of float rounding.

Here the words are computed with torch's int32 arithmetic, which wraps modulo 2^32 (two's complement) on the
CPU and on CUDA; the tests pin the result to `mix` on Python integers.
"""

from __future__ import annotations

import torch

MASK = 0xFFFFFFFF
MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
CHUNK = 1 << 16  # entries per step on the CPU: the temporaries stay in cache (~4x faster than in one go)


def mix(x: int) -> int:
    """lowbias32 of one 32-bit word, on Python integers (the definition the tensor versions follow)."""
    x &= MASK
    x ^= x >> 16
    x = (x * MULTIPLIERS[0]) & MASK
    x ^= x >> 15
    x = (x * MULTIPLIERS[1]) & MASK
    return x ^ (x >> 16)


def word_bits(seed_bytes: bytes) -> tuple[int, int]:
    """A key (k0, k1) from 8 bytes (little-endian words), e.g. the start of a sha256 digest."""
    return int.from_bytes(seed_bytes[:4], "little"), int.from_bytes(seed_bytes[4:8], "little")


def keep_threshold(density: float) -> int:
    """The integer an entry's bits must fall below to be kept with probability `density` (2^32: always)."""
    return min(1 << 32, max(0, round(density * (1 << 32))))


def _signed(word: int) -> int:
    """A 32-bit word as the int32 with the same bits."""
    word &= MASK
    return word - (1 << 32) if word >= 1 << 31 else word


def _xorshift_(x: torch.Tensor, shift: int, scratch: torch.Tensor) -> None:
    # int32 `>>` is arithmetic: mask off the copied sign bits to get the logical shift
    torch.bitwise_right_shift(x, shift, out=scratch)
    scratch.bitwise_and_((1 << (32 - shift)) - 1)
    x.bitwise_xor_(scratch)


def _mix_(x: torch.Tensor, scratch: torch.Tensor) -> None:
    _xorshift_(x, 16, scratch)
    x.mul_(_signed(MULTIPLIERS[0]))
    _xorshift_(x, 15, scratch)
    x.mul_(_signed(MULTIPLIERS[1]))
    _xorshift_(x, 16, scratch)


def _fill_bits_(out: torch.Tensor, key: tuple[int, int], start: int) -> None:
    """out[i] = bits(key, start + i) as int32 bit patterns, for a range inside one 2^32-aligned block."""
    k0 = key[0] ^ mix(start >> 32)
    torch.arange(out.numel(), dtype=torch.int32, device=out.device, out=out)
    out.add_(_signed(start))  # wraps: the low word of each position
    scratch = torch.empty_like(out)
    out.bitwise_xor_(_signed(k0))
    _mix_(out, scratch)
    out.bitwise_xor_(_signed(key[1]))
    _mix_(out, scratch)


def bits(key: tuple[int, int], start: int, count: int, device="cpu") -> torch.Tensor:
    """bits(key, p) for p in [start, start + count), as int64 values in [0, 2^32)."""
    words = torch.empty(count, dtype=torch.int32, device=device)
    for begin, end in _pieces(start, count, device):
        _fill_bits_(words[begin - start : end - start], key, begin)
    return words.to(torch.int64) & MASK


def keep(key: tuple[int, int], start: int, count: int, density: float, device="cpu") -> torch.Tensor:
    """Whether each position in [start, start + count) is kept with probability `density` (bool [count])."""
    threshold = keep_threshold(density)
    if threshold >= 1 << 32:
        return torch.ones(count, dtype=torch.bool, device=device)
    kept = torch.empty(count, dtype=torch.bool, device=device)
    words = torch.empty(min(count, _chunk(device)), dtype=torch.int32, device=device)
    for begin, end in _pieces(start, count, device):
        piece = words[: end - begin]
        _fill_bits_(piece, key, begin)
        # unsigned comparison of int32 bit patterns: flip the sign bit of both sides
        piece.bitwise_xor_(_signed(1 << 31))
        torch.lt(piece, threshold - (1 << 31), out=kept[begin - start : end - start])
    return kept


def _chunk(device) -> int:
    return CHUNK if torch.device(device).type == "cpu" else 1 << 24


def _pieces(start: int, count: int, device):
    """[begin, end) ranges covering [start, start + count), at most a chunk long, none crossing a multiple
    of 2^32 (where hi(p) changes)."""
    chunk, position, stop = _chunk(device), start, start + count
    while position < stop:
        end = min(stop, position + chunk, ((position >> 32) + 1) << 32)
        yield position, end
        position = end
