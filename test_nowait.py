"""nowait: system calls made with the GIL held, each in a form that cannot wait.

What matters is that each gives what the ordinary call would, never blocks,
and hands back (None) whatever it cannot do at once. Real sockets on loopback
and real files; pages are put out of the page cache with posix_fadvise
(where a filesystem keeps them, as tmpfs does, the reads are whole, and the
checks still hold).
"""

import os
import socket
import stat
import struct
import time
import unittest

import nowait
from fixtures import not_cached, temporary_directory


@unittest.skipUnless(nowait.AVAILABLE, "nowait's calls are Linux's (preadv2, statx), through ctypes")
class NoWaitTest(unittest.TestCase):
    def setUp(self):
        self.path = os.path.join(temporary_directory(self), "object")
        self.data = os.urandom(1 << 20)
        with open(self.path, "wb") as file:
            file.write(self.data)

    def open(self):
        fd = os.open(self.path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        return fd

    def connected_pair(self):
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        self.addCleanup(client.close)
        self.addCleanup(server.close)
        return client, server

    def test_a_send_that_fits_goes_whole(self):
        client, server = self.connected_pair()
        self.assertEqual(nowait.send(client.fileno(), b"a response"), 10)
        self.assertEqual(server.recv(100), b"a response")

    def test_a_send_takes_what_fits_then_nothing_and_never_waits(self):
        client, server = self.connected_pair()
        # A send that waited would give up after 3 s (the socket still blocks).
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 3, 0))
        data = os.urandom(64 << 20)   # more than any socket buffer holds
        started = time.monotonic()
        sent = nowait.send(client.fileno(), data)
        self.assertGreater(sent, 0)
        self.assertLess(sent, len(data))
        self.assertIsNone(nowait.send(client.fileno(), data[sent:]))   # full: the caller waits
        self.assertLess(time.monotonic() - started, 2)
        server.settimeout(10)
        received = bytearray()
        while len(received) < sent:
            received += server.recv(1 << 20)
        self.assertEqual(bytes(received), data[:sent])

    def test_a_send_to_a_closed_connection_raises_as_socket_send_does(self):
        client, server = self.connected_pair()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # a reset
        server.close()
        client.settimeout(10)
        with self.assertRaises(ConnectionResetError):
            client.recv(1)   # once the reset has come
        with self.assertRaises(BrokenPipeError):
            nowait.send(client.fileno(), b"x")
        with self.assertRaises(BrokenPipeError):
            client.send(b"x")   # the same

    def test_only_bytes_are_sent_here(self):
        client, _ = self.connected_pair()
        self.assertIsNone(nowait.send(client.fileno(), bytearray(b"left to socket.send")))
        self.assertIsNone(nowait.send(client.fileno(), memoryview(b"left to socket.send")))

    def test_a_cached_file_is_read_whole_and_its_position_moves(self):
        fd = self.open()
        os.read(fd, 1)   # from the file position, as read(2) does
        buffer = bytearray(len(self.data))
        self.assertEqual(nowait.read(fd, buffer), len(self.data) - 1)
        self.assertEqual(bytes(buffer[:-1]), self.data[1:])
        self.assertEqual(nowait.read(fd, buffer), 0)   # the end of the file

    def test_bytes_not_in_the_page_cache_are_left_to_the_ordinary_read(self):
        for offset in (0, len(self.data) // 2):
            with self.subTest(not_cached_from=offset):
                not_cached(self.path, offset)
                fd = self.open()
                buffer = bytearray(len(self.data))
                count = nowait.read(fd, buffer)
                if count is None:   # none of it cached
                    count = 0
                self.assertLessEqual(count, len(self.data))
                self.assertEqual(bytes(buffer[:count]), self.data[:count])
                self.assertEqual(os.lseek(fd, 0, os.SEEK_CUR), count)
                self.assertEqual(os.read(fd, len(self.data)), self.data[count:])

    def test_status_is_fstat_s_type_and_size(self):
        directory = os.open(os.path.dirname(self.path), os.O_RDONLY)
        self.addCleanup(os.close, directory)
        for fd in (self.open(), directory):
            status = os.fstat(fd)
            self.assertEqual(nowait.status(fd), (status.st_mode, status.st_size))
        self.assertTrue(stat.S_ISDIR(nowait.status(directory)[0]))

    def test_close_closes(self):
        fd = os.open(self.path, os.O_RDONLY)
        self.assertTrue(nowait.close(fd))
        with self.assertRaises(OSError):
            os.fstat(fd)
        with self.assertRaises(OSError):
            nowait.close(fd)


if __name__ == "__main__":
    unittest.main()
