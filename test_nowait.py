"""nowait: system calls made with the GIL held, each in a form that cannot wait.

What matters is that each gives what the ordinary call would, never blocks,
and hands back (None) whatever it cannot do at once. Real files; pages are
put out of the page cache with posix_fadvise (the reads are skipped where the
filesystem refuses RWF_NOWAIT, as tmpfs does).
"""

import os
import stat
import tempfile
import unittest

import nowait
import storage
from fixtures import cached_page_by_page, not_cached, temporary_directory


@unittest.skipUnless(nowait.AVAILABLE, "nowait's calls are Linux's (preadv2, statx, cachestat), through ctypes")
class NoWaitTest(unittest.TestCase):
    def setUp(self):
        self.path = os.path.join(temporary_directory(self), "object")
        self.data = os.urandom(1 << 20)
        with open(self.path, "wb") as file:
            file.write(self.data)
        cached_page_by_page(self.path)   # so that any page can leave the cache alone

    def open(self):
        fd = os.open(self.path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        return fd

    def readable_without_waiting(self, fd):
        if not nowait.reads_cached(fd):
            self.skipTest("the temporary directory's filesystem refuses RWF_NOWAIT (tmpfs)")

    def test_a_file_just_written_is_cached_and_read_whole_and_its_position_moves(self):
        fd = self.open()
        self.readable_without_waiting(fd)
        self.assertTrue(nowait.cached(fd, len(self.data)))
        os.read(fd, 1)   # from the file position, as read(2) does
        buffer = bytearray(len(self.data))
        self.assertEqual(nowait.read(fd, buffer), len(self.data) - 1)
        self.assertEqual(bytes(buffer[:-1]), self.data[1:])
        self.assertEqual(nowait.read(fd, buffer), 0)   # the end of the file

    def test_a_file_with_any_page_out_of_the_cache_is_not_cached(self):
        fd = self.open()
        self.readable_without_waiting(fd)
        for offset in (len(self.data) - os.sysconf("SC_PAGE_SIZE"), 0):
            with self.subTest(not_cached_from=offset):
                not_cached(self.path, offset)
                self.assertFalse(nowait.cached(fd, len(self.data)))
                if offset:
                    self.assertTrue(nowait.cached(fd, offset))

    def test_a_file_whose_last_page_is_partly_used_is_cached_only_with_it(self):
        with open(self.path, "wb") as file:
            file.write(self.data[:5000])   # a page and a bit
        cached_page_by_page(self.path)
        fd = self.open()
        self.readable_without_waiting(fd)
        self.assertTrue(nowait.cached(fd, 5000))
        not_cached(self.path, os.sysconf("SC_PAGE_SIZE"))
        self.assertFalse(nowait.cached(fd, 5000))

    def test_bytes_that_left_the_cache_are_left_to_the_ordinary_read(self):
        # ``cached`` said yes, then the pages went: whatever is read is right.
        fd = self.open()
        self.readable_without_waiting(fd)
        not_cached(self.path, len(self.data) // 2)
        buffer = bytearray(len(self.data))
        count = nowait.read(fd, buffer) or 0
        self.assertLessEqual(count, len(self.data))
        self.assertEqual(bytes(buffer[:count]), self.data[:count])
        self.assertEqual(os.lseek(fd, 0, os.SEEK_CUR), count)
        self.assertEqual(os.read(fd, len(self.data)), self.data[count:])

    def test_reads_without_waiting_are_not_tried_where_refused(self):
        if storage.filesystem_type("/dev/shm") != "tmpfs":
            self.skipTest("no tmpfs at /dev/shm")
        with tempfile.TemporaryFile(dir="/dev/shm") as file:
            self.assertFalse(nowait.reads_cached(file.fileno()))

    def test_status_is_fstat_s_type_size_and_links(self):
        directory = os.open(os.path.dirname(self.path), os.O_RDONLY)
        self.addCleanup(os.close, directory)
        fd = self.open()
        for opened in (fd, directory):
            status = os.fstat(opened)
            self.assertEqual(nowait.status(opened),
                             (status.st_mode, status.st_size, status.st_nlink))
        self.assertTrue(stat.S_ISDIR(nowait.status(directory).st_mode))
        os.unlink(self.path)
        self.assertEqual(nowait.status(fd).st_nlink, 0)

    def test_close_closes_a_file_that_has_a_name(self):
        fd = os.open(self.path, os.O_RDONLY)
        self.assertTrue(nowait.close(fd))
        with self.assertRaises(OSError):
            os.fstat(fd)
        self.assertFalse(nowait.close(fd))   # the ordinary close reports what is wrong

    def test_the_last_close_of_a_deleted_file_is_left_to_the_ordinary_call(self):
        fd = self.open()
        os.unlink(self.path)   # its last close frees its blocks: that may wait
        self.assertFalse(nowait.close(fd))
        os.fstat(fd)   # still open

if __name__ == "__main__":
    unittest.main()
