"""The checksum of snapshot files: CRC-32C (Castagnoli), as iSCSI, ext4 and cloud object stores use.

It catches every burst error up to 32 bits and, through the `crc32c` package, runs on the CPU's
CRC instruction at about 10 GB/s here, five times zlib's CRC-32: fast enough that checking every
byte on restore costs a tenth of reading it. Every caller goes through `extend`, in blocks, so a
file is checksummed on the way in or out without a second pass over it.
"""

from __future__ import annotations

import functools

import crc32c

BLOCK = 8 << 20
"""Bytes per call: large enough to amortize the call, small enough to stay in cache while written."""


def extend(crc: int, data: memoryview) -> int:
    """The CRC-32C of the bytes checksummed so far (`crc`) followed by `data`.

    Example:
        crc = extend(extend(0, memoryview(b"1234")), memoryview(b"56789"))  # == 0xE3069283
    """
    for start in range(0, len(data), BLOCK):
        crc = crc32c.crc32c(data[start:start + BLOCK], crc)
    return crc


_POLY = 0x82F63B78  # the Castagnoli polynomial, bit-reflected


def combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """The CRC-32C of A followed by B, from A's and B's own and B's length, without their bytes.

    A file's checksum is thereby the combination of its pieces', each computed once: a reader that
    needs one piece checks that piece alone, and one that reads the whole file checks the file.
    (CRCs are linear over GF(2): appending B multiplies A's CRC by x^(8*len(B)) modulo the polynomial.)
    """
    return _multiply(_shift(length_b), crc_a) ^ crc_b


def _multiply(a: int, b: int) -> int:
    """a(x) * b(x) modulo the polynomial, both bit-reflected (x^0 is the top bit)."""
    product, bit = 0, 1 << 31
    while bit and a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


def _powers() -> list[int]:
    """x^(2^k) modulo the polynomial for k = 0..63."""
    power, out = 1 << 30, []  # x^1
    for _ in range(64):
        out.append(power)
        power = _multiply(power, power)
    return out


_X_2K = _powers()


@functools.lru_cache(maxsize=4096)  # pieces come in few distinct sizes
def _shift(nbytes: int) -> int:
    """x^(8 * nbytes) modulo the polynomial."""
    result, k, n = 1 << 31, 3, nbytes
    while n:
        if n & 1:
            result = _multiply(_X_2K[k], result)
        n >>= 1
        k += 1
    return result
