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

The checksums travel with the object's file as an extended attribute, so the
rename that publishes the object publishes them, and removing the file
removes them. Their bytes check themselves: damaged ones are ignored, and the
object is then checked against its oid instead, as one without any is.
"""

import struct
import zlib

ATTRIBUTE = "user.data_storage.blocks"
MIN_BLOCK_BYTES = 1 << 20
MAX_BLOCKS = 512   # 2 KiB of CRCs: within the 4 KiB that ext4 gives all of a file's attributes
UNKNOWN_LENGTH_BOUND = 64 << 30   # sizes the blocks of a body sent without its length

_MAGIC = b"DSB1"
_HEAD = struct.Struct(">4sBQ")   # magic, log2 of the block size, object size
_CRC = struct.Struct(">I")


def block_size_for(length):
    """The block size for an object of ``length`` bytes (None: not known yet):
    the smallest power of two from 1 MiB that needs at most MAX_BLOCKS blocks."""
    bound = UNKNOWN_LENGTH_BOUND if length is None else length
    size = MIN_BLOCK_BYTES
    while size * MAX_BLOCKS < bound:
        size *= 2
    return size


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
    blocks of ``block_size`` (by default, ``block_size_for(length)``)."""

    def __init__(self, length=None, block_size=None):
        self._block_size = block_size or block_size_for(length)
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

    def finish(self):
        """The checksums, or None if the object outgrew MAX_BLOCKS (a body sent
        without its length, larger than UNKNOWN_LENGTH_BOUND)."""
        crcs = self._crcs + ([self._crc] if self._filled else [])
        if len(crcs) > MAX_BLOCKS:
            return None
        return BlockChecksums(self._block_size, self._size, crcs)
