"""Block checksums (checksums.py): sizes, the recorder, and bytes that check themselves."""

import os
import unittest
import zlib

import checksums

MIB = 1 << 20


class BlockSizeTest(unittest.TestCase):
    def test_at_least_a_mebibyte_and_at_most_max_blocks(self):
        for length, expected in ((0, MIB), (1, MIB), (512 * MIB, MIB), (512 * MIB + 1, 2 * MIB),
                                 (1 << 30, 2 * MIB), (100 << 30, 256 * MIB)):
            self.assertEqual(checksums.block_size_for(length), expected, length)


class CombineTest(unittest.TestCase):
    def test_the_crc_of_a_concatenation_from_its_parts(self):
        for first, second in ((b"", b""), (b"abc", b""), (b"", b"abc"), (b"abc", b"defg"),
                              (os.urandom(1000), os.urandom(MIB + 7))):
            self.assertEqual(checksums.combine(zlib.crc32(first), zlib.crc32(second), len(second)),
                             zlib.crc32(first + second))


class RecorderTest(unittest.TestCase):
    def expected(self, data, block_size):
        return [zlib.crc32(data[offset:offset + block_size])
                for offset in range(0, len(data), block_size)]

    def test_one_crc_per_block_however_the_bytes_arrive(self):
        data = os.urandom(3 * MIB + 17)
        for pieces in ((len(data),), (MIB,), (1000, 3 * MIB), (MIB - 1, 5, MIB + 3)):
            with self.subTest(pieces=pieces):
                recorder = checksums.Recorder(len(data))
                offset = 0
                while offset < len(data):
                    for piece in pieces:
                        recorder.update(memoryview(data)[offset:offset + piece])
                        offset += piece
                recorded = recorder.finish()
                self.assertEqual((recorded.block_size, recorded.size), (MIB, len(data)))
                self.assertEqual(recorded.crcs, self.expected(data, MIB))
                self.assertTrue(recorded.match(data))

    def test_nothing_at_all(self):
        recorded = checksums.Recorder(0).finish()
        self.assertEqual((recorded.size, recorded.crcs), (0, []))
        self.assertTrue(recorded.match(b""))
        self.assertFalse(recorded.match(b"x"))

    def test_a_body_of_unknown_length_starts_small_and_doubles_its_blocks(self):
        data = os.urandom(9 * MIB + 3)
        recorder = checksums.Recorder(None, max_blocks=4)   # 512: 1 GiB would take a while
        recorder.update(data[:3 * MIB])
        self.assertEqual(recorder.finish().block_size, MIB)
        recorder.update(data[3 * MIB:])   # 4 blocks of 1 MiB, then of 2, then of 4
        recorded = recorder.finish()
        self.assertEqual((recorded.block_size, recorded.crcs), (4 * MIB, self.expected(data, 4 * MIB)))
        self.assertTrue(recorded.match(data))

    def test_without_a_block_limit_blocks_keep_their_size(self):
        data = os.urandom(9 * MIB + 3)
        recorder = checksums.Recorder(block_size=MIB, max_blocks=None)
        recorder.update(data)
        recorded = recorder.finish()
        self.assertEqual((recorded.block_size, recorded.crcs), (MIB, self.expected(data, MIB)))


class BlockChecksumsTest(unittest.TestCase):
    def recorded(self, data):
        recorder = checksums.Recorder(len(data))
        recorder.update(data)
        return recorder.finish()

    def test_match_finds_any_changed_byte_and_any_other_length(self):
        data = bytearray(os.urandom(2 * MIB + 3))
        recorded = self.recorded(data)
        self.assertTrue(recorded.match(data))
        for position in (0, MIB, len(data) - 1):
            changed = bytearray(data)
            changed[position] ^= 1
            self.assertFalse(recorded.match(changed), position)
        self.assertFalse(recorded.match(data[:-1]))
        self.assertFalse(recorded.match(data + b"\0"))

    def test_blocks_of_a_range(self):
        recorded = self.recorded(os.urandom(3 * MIB + 5))
        offsets = [(offset, count) for offset, count, _ in recorded.blocks(MIB - 1, MIB + 1)]
        self.assertEqual(offsets, [(0, MIB), (MIB, MIB)])
        self.assertEqual([count for _, count, _ in recorded.blocks(3 * MIB)], [5])
        self.assertEqual(len(list(recorded.blocks())), 4)

    def test_round_trip_through_bytes(self):
        recorded = self.recorded(os.urandom(MIB + 1))
        again = checksums.BlockChecksums.from_bytes(recorded.to_bytes())
        self.assertEqual((again.block_size, again.size, again.crcs),
                         (recorded.block_size, recorded.size, recorded.crcs))

    def test_damaged_bytes_are_refused(self):
        data = self.recorded(os.urandom(MIB + 1)).to_bytes()
        for damaged in (b"", data[:-1], data + b"\0", data[:10] + b"\xff" + data[11:],
                        b"\0" * len(data)):
            self.assertIsNone(checksums.BlockChecksums.from_bytes(damaged), damaged[:12])

    def test_the_most_blocks_fit_a_file_systems_attribute_space(self):
        recorded = self.recorded(b"")
        recorded.crcs = [0] * checksums.MAX_BLOCKS
        recorded.size = checksums.MAX_BLOCKS * recorded.block_size
        self.assertLessEqual(len(recorded.to_bytes()), 2100)   # ext4 gives them 4 KiB in all


if __name__ == "__main__":
    unittest.main()
