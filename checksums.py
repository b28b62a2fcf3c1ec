"""Block checksums: a CRC-32 of each block of an object, recorded when the
object is written and checked when it is read.

The oid (SHA-256) names an object and is checked when it is written, and by
``python storage.py verify``. Checking it again on every read costs one core
at about 1.6 GB/s here, below what sendfile does on loopback, and the last
block must wait for the whole. Storage systems that check every read use a
fast checksum recorded at write time instead (HDFS: CRC32C per 512 bytes;
Ceph BlueStore: crc32c per block; ZFS: fletcher4 per block): it catches what
damages data at rest (bit rot, torn or misdirected writes, truncation, a
stray write into the file) at about 4 GB/s, block by block, so each block
goes out as soon as it has been checked, and a range checks only its blocks.
It is no defence against someone who can write to the data directory: they
could rewrite the checksums as well as the object.

On disk the checksums travel with the object's file as an extended
attribute, so the rename that publishes the object publishes them, and
removing the file removes them. In an S3 bucket they are a small object of
their own beside the object's key (see s3.py). Their bytes check themselves:
damaged ones are ignored, and the object is then checked against its oid
instead, as one without any is.
"""

import struct
import zlib

ATTRIBUTE = "user.data_storage.blocks"
MIN_BLOCK_BYTES = 1 << 20
MAX_BLOCKS = 512   # 2 KiB of CRCs: within the 4 KiB that ext4 gives all of a file's attributes

_MAGIC = b"DSB1"
_HEAD = struct.Struct(">4sBQ")   # magic, log2 of the block size, object size
_CRC = struct.Struct(">I")


def block_size_for(length):
    """The block size for an object of ``length`` bytes: the smallest power
    of two from 1 MiB that needs at most MAX_BLOCKS blocks."""
    size = MIN_BLOCK_BYTES
    while size * MAX_BLOCKS < length:
        size *= 2
    return size


# CRC-32 of a concatenation from the CRCs of its parts (zlib's crc32_combine,
# which Python does not expose): crc(A + B) = crc(A) * x^(8 len(B)) + crc(B),
# in GF(2) polynomials modulo the CRC's, bit-reflected.
_POLYNOMIAL = 0xEDB88320


def _multiply(a, b):
    """``a * b`` modulo the polynomial (both reflected)."""
    product = 0
    bit = 1 << 31
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _POLYNOMIAL if b & 1 else b >> 1
    return product


def _shift_for(length):
    """x^(8 length) modulo the polynomial: what moves a CRC past ``length`` bytes."""
    power, square = 1 << 31, 1 << 23   # x^0, and x^8 (one byte): x^k is bit 31 - k
    while length:
        if length & 1:
            power = _multiply(square, power)
        square = _multiply(square, square)
        length >>= 1
    return power


def combine(crc1, crc2, length2):
    """The CRC-32 of A + B, from ``crc1`` of A, ``crc2`` of B and B's length."""
    return _multiply(_shift_for(length2), crc1) ^ crc2


class BlockChecksums:
    """The CRC-32s of an object of ``size`` bytes, one per ``block_size``
    bytes from its start (the last block may be shorter)."""

    def __init__(self, block_size, size, crcs):
        self.block_size = block_size
        self.size = size
        self.crcs = crcs

    def blocks(self, first=0, end=None):
        """``(offset, count, crc)`` of each block that holds a byte of ``first:end``."""
        end = self.size if end is None else end
        for index in range(first // self.block_size, -(-end // self.block_size)):
            offset = index * self.block_size
            yield offset, min(self.block_size, self.size - offset), self.crcs[index]

    def match(self, data):
        """True if ``data`` is the whole object these checksums describe."""
        return len(data) == self.size and all(
            zlib.crc32(memoryview(data)[offset:offset + count]) == crc
            for offset, count, crc in self.blocks())

    def to_bytes(self):
        data = _HEAD.pack(_MAGIC, self.block_size.bit_length() - 1, self.size) + struct.pack(
            ">%dI" % len(self.crcs), *self.crcs)
        return data + _CRC.pack(zlib.crc32(data))

    @classmethod
    def from_bytes(cls, data):
        """The checksums in ``data`` (from ``to_bytes``), or None unless they are intact."""
        if len(data) < _HEAD.size + _CRC.size or (
                _CRC.unpack_from(data, len(data) - _CRC.size)[0] != zlib.crc32(data[:-_CRC.size])):
            return None
        magic, shift, size = _HEAD.unpack_from(data)
        count = (len(data) - _HEAD.size - _CRC.size) // _CRC.size
        if magic != _MAGIC or shift >= 64 or count != -(-size // (1 << shift)):
            return None
        return cls(1 << shift, size, list(struct.unpack_from(">%dI" % count, data, _HEAD.size)))


class Recorder:
    """Computes the BlockChecksums of bytes given to ``update`` in order, in
    blocks of ``block_size`` (by default, ``block_size_for(length)``). Without
    a length it starts with 1 MiB blocks and, when they outnumber
    ``max_blocks``, makes them twice as large (combining each pair's CRCs);
    ``max_blocks=None`` keeps the block size, however many blocks it takes."""

    def __init__(self, length=None, block_size=None, max_blocks=MAX_BLOCKS):
        self._block_size = block_size or block_size_for(length or 0)
        self._max_blocks = max_blocks
        self._crcs = []
        self._crc = 0
        self._filled = 0   # bytes of the current block seen so far
        self._size = 0

    def update(self, data):
        view = memoryview(data)
        while view:
            take = min(len(view), self._block_size - self._filled)
            self._crc = zlib.crc32(view[:take], self._crc)
            self._filled += take
            self._size += take
            view = view[take:]
            if self._filled == self._block_size:
                self._crcs.append(self._crc)
                self._crc, self._filled = 0, 0
                if len(self._crcs) == self._max_blocks:
                    self._double_blocks()

    def _double_blocks(self):
        shift = _shift_for(self._block_size)   # the same for every pair: computed once
        self._crcs = [_multiply(shift, first) ^ second
                      for first, second in zip(self._crcs[::2], self._crcs[1::2])]
        self._block_size *= 2

    def finish(self):
        """The checksums of everything given so far."""
        return BlockChecksums(self._block_size, self._size,
                              self._crcs + ([self._crc] if self._filled else []))
