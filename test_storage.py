"""The store contract, proven against every store backend.

``StoreContract`` is a mixin: a backend's test case supplies ``make_store()``
and inherits every test, so each backend proves the same guarantees.
"""

import array
import errno
import functools
import gc
import inspect
import io
import os
import platform
import signal
import socket
import stat
import subprocess
import sys
import threading
import traceback
import unittest
import urllib.parse

import checksums
import s3
import storage
from fixtures import (HERE, descriptors_under, files_under, new_bucket, open_disk_store, run_concurrently, s3_engine,
                      in_forked_child, sha256, small_filesystem, temporary_directory,
                      wait_until)


class FailingSource(io.RawIOBase):
    """A source that yields some bytes and then fails, as a dropped upload does."""

    def __init__(self, data):
        self._data = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, buffer):
        count = self._data.readinto(buffer)
        if not count:
            raise ConnectionResetError("client went away")
        return count

    def read(self, size=-1):
        self._data.read()
        raise ConnectionResetError("client went away")


class CountingSource(io.BytesIO):
    """Counts the bytes it gives (it has no read(): stores must read in blocks)."""

    given = 0

    def readinto(self, buffer):
        count = super().readinto(buffer)
        self.given += count
        return count

    def read(self, size=-1):
        data = super().read(size)
        self.given += len(data)
        return data


class StoreContract:
    """Tests every store must pass. Subclasses define ``make_store()``."""

    def setUp(self):
        super().setUp()
        self.store = self.make_store()

    def put(self, repository, data, expected_oid=None):
        return self.store.put(repository, io.BytesIO(data), expected_oid=expected_oid)

    def read(self, repository, oid):
        with self.store.open(repository, oid) as stored:
            data = stored.file.read()
            self.assertEqual(stored.size, len(data))
            return data

    def test_put_names_the_object_by_its_sha256(self):
        self.assertEqual(self.put("repo", b"something"), (sha256(b"something"), 9))
        self.assertEqual(self.read("repo", sha256(b"something")), b"something")

    def test_empty_object_is_valid(self):
        oid, size = self.put("repo", b"")
        self.assertEqual((oid, size), (sha256(b""), 0))
        self.assertEqual(self.read("repo", oid), b"")

    def test_large_object_round_trips(self):
        data = bytes(range(256)) * 8192 + b"tail"   # 2 MiB and a bit: several buffers
        oid, size = self.put("repo", data)
        self.assertEqual(size, len(data))
        self.assertEqual(self.read("repo", oid), data)

    def test_same_content_twice_is_one_object(self):
        first = self.put("repo", b"same")
        self.assertEqual(self.put("repo", b"same"), first)
        self.store.delete("repo", first[0])
        with self.assertRaises(storage.ObjectNotFound):
            self.store.open("repo", first[0])

    def test_repositories_are_separate(self):
        oid, _ = self.put("one", b"shared")
        with self.assertRaises(storage.ObjectNotFound):
            self.store.open("two", oid)
        self.put("two", b"shared")
        self.store.delete("one", oid)
        self.assertEqual(self.read("two", oid), b"shared")
        with self.assertRaises(storage.ObjectNotFound):
            self.store.open("one", oid)

    def test_delete_missing_object_raises(self):
        with self.assertRaises(storage.ObjectNotFound):
            self.store.delete("repo", sha256(b"never stored"))
        oid, _ = self.put("repo", b"once")
        self.store.delete("repo", oid)
        with self.assertRaises(storage.ObjectNotFound):
            self.store.delete("repo", oid)

    def test_malformed_oid_is_simply_not_found(self):
        for oid in ("missing", "", "0" * 63, "g" * 64, "../" + "0" * 61):
            with self.assertRaises(storage.ObjectNotFound):
                self.store.open("repo", oid)
            with self.assertRaises(storage.ObjectNotFound):
                self.store.delete("repo", oid)

    def test_uppercase_oid_finds_the_object(self):
        oid, _ = self.put("repo", b"case")
        self.assertEqual(self.read("repo", oid.upper()), b"case")

    def test_expected_oid_accepts_matching_content(self):
        oid = sha256(b"verified")
        self.assertEqual(self.put("repo", b"verified", expected_oid=oid.upper()), (oid, 8))

    def test_expected_oid_mismatch_stores_nothing(self):
        wrong = sha256(b"something else")
        with self.assertRaises(storage.DigestMismatch):
            self.put("repo", b"content", expected_oid=wrong)
        for oid in (wrong, sha256(b"content")):
            with self.assertRaises(storage.ObjectNotFound):
                self.store.open("repo", oid)

    def test_malformed_expected_oid_is_refused_before_reading(self):
        source = io.BytesIO(b"unread")
        with self.assertRaises(storage.InvalidObjectId):
            self.store.put("repo", source, expected_oid="missing")
        self.assertEqual(source.tell(), 0)

    def test_failing_source_stores_nothing(self):
        with self.assertRaises(ConnectionResetError):
            self.store.put("repo", FailingSource(b"partial" * 1000))
        self.assertEqual(self.put("repo", b"after"), (sha256(b"after"), 5))

    def test_repository_names(self):
        for name in ("a", "A-z_0.9", "x" * 100, "..."):
            self.assertEqual(self.put(name, b"ok")[1], 2)
        for name in ("", ".", "..", "x" * 101, "a/b", "a\\b", "a b", "caf\u00e9", "a\0"):
            for call in (lambda: self.put(name, b"no"),
                         lambda: self.store.open(name, sha256(b"no")),
                         lambda: self.store.delete(name, sha256(b"no"))):
                with self.subTest(name=name), self.assertRaises(storage.InvalidRepository):
                    call()

    def test_listing_after_deletes_and_after_an_absent_oid(self):
        oids = sorted(self.put("repo", b"item %d" % n)[0] for n in range(6))
        for oid in oids[1::2]:
            self.store.delete("repo", oid)
        kept = oids[::2]
        self.assertEqual([oid for oid, _ in self.store.list_objects("repo")], kept)
        self.assertEqual([oid for oid, _ in self.store.list_objects("repo", after=oids[1])],
                         kept[1:])   # a deleted oid still marks a place
        for oid in kept:
            self.store.delete("repo", oid)
        self.assertEqual(self.store.list_objects("repo"), [])
        self.assertEqual(self.put("repo", b"again")[1], 5)
        self.assertEqual(len(self.store.list_objects("repo")), 1)

    def test_listing_is_sorted_and_paged(self):
        expected = sorted((self.put("repo", b"object %d" % n)[0], len(b"object %d" % n))
                          for n in range(25))
        self.put("other", b"not listed")
        pages, after = [], None
        while True:
            page = self.store.list_objects("repo", after=after, limit=10)
            if not page:
                break
            pages.append(page)
            after = page[-1][0]
        self.assertEqual([len(page) for page in pages], [10, 10, 5])
        self.assertEqual([entry for page in pages for entry in page], expected)
        between = expected[3][0][:-1] + ("0" if expected[3][0][-1] != "0" else "1")
        self.assertEqual(self.store.list_objects("repo", after=between, limit=1000),
                         [entry for entry in expected if entry[0] > between])
        self.assertEqual(self.store.list_objects("never-used"), [])
        self.store.delete("repo", expected[0][0])
        self.assertEqual(self.store.list_objects("repo", limit=1), [expected[1]])

    def test_an_object_opened_to_be_read_whole_reads_the_same(self):
        for data in (b"", b"small", bytes(range(256)) * 8192 + b"tail"):
            oid, _ = self.put("repo", data)
            with self.store.open("repo", oid, whole=True) as stored:
                self.assertEqual((stored.size, stored.file.read()), (len(data), data))
        for repository, missing in (("repo", sha256(b"never stored")), ("other", oid),
                                    ("repo", "not-an-oid")):
            with self.assertRaises(storage.ObjectNotFound):
                self.store.open(repository, missing, whole=True)

    def test_open_object_survives_delete(self):
        data = b"still readable" * 10000
        oid, _ = self.put("repo", data)
        with self.store.open("repo", oid) as stored:
            self.store.delete("repo", oid)
            self.assertEqual(stored.file.read(), data)

    def test_concurrent_puts_and_deletes_never_expose_partial_objects(self):
        data = bytes(range(256)) * 4096
        oid = sha256(data)
        errors = []

        def writer():
            for _ in range(20):
                self.put("race", data)
                try:
                    self.store.delete("race", oid)
                except storage.ObjectNotFound:
                    pass

        def reader():
            for _ in range(40):
                try:
                    got = self.read("race", oid)
                except storage.ObjectNotFound:
                    continue
                if got != data:
                    errors.append(len(got))

        run_concurrently([writer, writer, reader, reader])
        self.assertEqual(errors, [])


class AccountingContract:
    """Tests of the stores that keep an account of what they hold (memory,
    disk): usage and the quota. ``make_store(max_total_size=...)``."""

    def test_usage_counts_objects_and_bytes(self):
        self.assertEqual(self.store.usage(), (0, 0))
        oid, _ = self.put("one", b"12345")
        self.put("one", b"12345")
        self.put("two", b"12345")
        self.put("two", b"123")
        self.assertEqual(self.store.usage(), (3, 13))
        self.store.delete("one", oid)
        self.assertEqual(self.store.usage(), (2, 8))

    def test_quota(self):
        self.store = self.make_store(max_total_size=10)
        first, _ = self.put("repo", b"123456")
        with self.assertRaises(storage.InsufficientStorage):
            self.put("repo", b"abcdef")
        # Already stored: no new bytes, when the oid says so before the body is read.
        self.assertEqual(self.put("repo", b"123456", expected_oid=first)[0], first)
        with self.assertRaises(storage.InsufficientStorage):   # a plain upload needs its room
            self.put("repo", b"123456")
        self.assertEqual(self.put("repo", b"abcd")[1], 4)          # exactly at the quota
        self.store.delete("repo", first)
        self.assertEqual(self.put("repo", b"abcdef")[1], 6)
        self.assertEqual(self.store.usage(), (2, 10))

    def test_a_declared_length_beyond_the_room_is_refused_before_reading(self):
        self.store = self.make_store(max_total_size=100)
        self.put("repo", b"x" * 60)
        unread = CountingSource(b"y" * 50)
        with self.assertRaises(storage.InsufficientStorage):
            self.store.put("repo", unread, length=50)
        self.assertEqual(unread.given, 0)
        self.assertEqual(self.store.put("repo", io.BytesIO(b"z" * 40), length=40)[1], 40)

    def test_room_is_held_for_uploads_in_flight(self):
        self.store = self.make_store(max_total_size=100)
        release = threading.Event()
        first = BlockingSource(b"a" * 60, release)
        upload = threading.Thread(target=self.store.put, args=("repo", first), kwargs={"length": 60})
        upload.start()
        self.addCleanup(upload.join)
        self.addCleanup(release.set)
        self.assertTrue(first.started.wait(10))   # 60 bytes promised, not yet stored
        with self.assertRaises(storage.InsufficientStorage):
            self.store.put("repo", io.BytesIO(b"b" * 50), length=50)
        release.set()
        upload.join()
        self.assertEqual(self.store.usage(), (1, 60))

    def test_an_upload_of_unknown_length_stops_at_the_line(self):
        self.store = self.make_store(max_total_size=1000)
        endless = CountingSource(b"c" * (8 * 1024 * 1024))
        with self.assertRaises(storage.InsufficientStorage):
            self.store.put("repo", endless)
        self.assertLessEqual(endless.given, 1001 + 256 * 1024)   # at most one block past it
        self.assertEqual(self.store.usage(), (0, 0))

    def test_concurrent_uploads_cannot_overshoot_the_quota(self):
        self.store = self.make_store(max_total_size=100)
        refused = []

        def upload(number):
            try:
                self.put("repo", b"%02d" % number * 5)   # 10 bytes each
            except storage.InsufficientStorage:
                refused.append(number)

        run_concurrently([functools.partial(upload, n) for n in range(30)])
        self.assertEqual((len(refused), self.store.usage()), (20, (10, 100)))


class MemoryStoreTest(StoreContract, AccountingContract, unittest.TestCase):
    def make_store(self, **options):
        return storage.MemoryStore(**options)


class S3StoreContract(StoreContract):
    """The store contract and the S3 store's own guarantees, against a real
    engine (``engine``: a key of fixtures.S3_ENGINES), each test in a new bucket."""

    engine = None

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.engine_settings = s3_engine(cls.engine)

    def make_store(self):
        client, self.bucket = new_bucket(self, self.engine_settings)
        return s3.S3Store(self.bucket, "prefix/", client)

    def test_open_object_survives_delete(self):
        # On S3 a download survives a DELETE once its GET has started (the
        # application starts it before it answers).
        data = os.urandom(3 * 1024 * 1024)
        oid, _ = self.put("repo", data)
        with self.store.open("repo", oid) as stored:
            stored.file.start()
            self.store.delete("repo", oid)
            self.assertEqual(stored.file.read(), data)
        with self.assertRaises(storage.ObjectNotFound):
            self.store.open("repo", oid)

    def recorded_calls(self):
        """The operations of the store's calls to the engine from now on, as they are made."""
        calls = []
        self.store.client.on_call = lambda operation, failed, seconds: calls.append(operation)
        return calls

    def test_an_object_read_whole_is_one_call_and_its_connection_is_reused(self):
        calls = self.recorded_calls()
        for data in (b"", b"small", os.urandom(3 * 1024 * 1024)):
            oid, _ = self.put("repo", data)
            del calls[:]
            with self.store.open("repo", oid, whole=True) as stored:
                self.assertEqual(stored.file.read(), data)
            self.assertEqual(calls, ["GetObject"])
            self.assertEqual(len(self.store.client._idle), 1)   # its connection back in the pool
            del calls[:]
            with self.store.open("repo", oid) as stored:   # a HEAD's or a range's open
                self.assertEqual(calls, ["HeadObject"])
                self.assertEqual(stored.file.read(), data)
            self.assertEqual(calls, ["HeadObject", "GetObject"] if data else ["HeadObject"])
        del calls[:]
        with self.assertRaises(storage.ObjectNotFound):
            self.store.open("repo", sha256(b"never stored"), whole=True)
        self.assertEqual(calls, ["GetObject"])
        self.assertEqual(len(self.store.client._idle), 1)   # a 404's connection serves again

    def test_a_small_body_of_known_length_is_uploaded_from_memory_not_spooled(self):
        unspoolable = s3.S3Store(self.bucket, "prefix/", self.store.client,
                                 spool_dir=os.path.join(temporary_directory(self), "gone"))
        for data in (b"", b"small", os.urandom(storage.HANDED_OVER_BYTES)):
            self.assertEqual(unspoolable.put("repo", io.BytesIO(data), length=len(data)),
                             (sha256(data), len(data)))
            self.assertEqual(self.read("repo", sha256(data)), data)
        more_than_said = os.urandom(300 * 1024)
        for data, length in ((b"no length", None), (os.urandom(storage.HANDED_OVER_BYTES + 1),
                                                    storage.HANDED_OVER_BYTES + 1),
                             (more_than_said, 0)):
            with self.assertRaises(FileNotFoundError):   # spooled: into a directory not there
                unspoolable.put("repo", io.BytesIO(data), length=length)
        # A source that holds more than its length says is stored whole, through the spool.
        self.assertEqual(self.store.put("repo", io.BytesIO(more_than_said), length=10),
                         (sha256(more_than_said), len(more_than_said)))
        self.assertEqual(self.read("repo", sha256(more_than_said)), more_than_said)

    def test_a_reader_lets_go_of_its_get_while_its_object_is_judged_then_reads_on(self):
        data = os.urandom(3 * 1024 * 1024)
        oid, _ = self.put("repo", data)
        calls = self.recorded_calls()
        with self.store.open("repo", oid, whole=True) as stored:
            first = stored.file.read(1000)
            self.assertIsNone(self.store.quarantine("repo", oid, stored.file))   # sound after all
            self.assertEqual(first + stored.file.read(), data)
        self.assertEqual(calls, ["GetObject"] * 3)   # the first GET, the reread, the rest

    def test_a_zero_length_upload_only_stores_the_empty_object(self):
        empty = sha256(b"")
        with self.assertRaises(storage.DigestMismatch):
            self.store.put("repo", io.BytesIO(b""), expected_oid=sha256(b"x"), length=0)
        self.assertEqual(self.store.list_objects("repo"), [])
        self.assertEqual(self.store.put("repo", io.BytesIO(b""), expected_oid=empty, length=0),
                         (empty, 0))
        oid = sha256(b"real bytes")
        self.assertEqual(self.store.put("repo", io.BytesIO(b"real bytes"), expected_oid=oid,
                                        length=10), (oid, 10))
        with self.assertRaises(storage.DigestMismatch):   # stored already: still checked
            self.store.put("repo", io.BytesIO(b"fake bytes"), expected_oid=oid, length=10)
        self.assertEqual(self.read("repo", oid), b"real bytes")

    def test_pooled_connections_are_not_shared_with_a_forked_child(self):
        self.put("repo", b"pooled")   # leaves a connection in the pool
        pooled, _ = self.store.client._idle[-1]   # noqa: SLF001 (the pool is what is tested)
        # The child's own connection, or the parent's answers get mixed up.
        self.assertEqual(in_forked_child(lambda: b"shared" if self.store.client._take() is pooled
                                         else b"own"), b"own")   # noqa: SLF001
        self.assertEqual(len(self.store.list_objects("repo")), 1)

    def test_layout_is_prefix_repository_oid(self):
        oid, _ = self.put("repo", b"where is it")
        status, _, body = self.store.client.request(
            "ListObjectsV2", "GET", "/" + self.bucket, [("list-type", "2")])
        self.assertEqual(status, 200)
        self.assertIn(("<Key>prefix/repo/%s</Key>" % oid).encode(), body)

    def test_large_objects_have_block_checksums_beside_them_until_deleted(self):
        data = os.urandom(s3.CHECKSUMS_FROM_BYTES)
        oid = sha256(data)
        key = "/%s/prefix/@checksums/repo/%s" % (self.bucket, oid)

        def recorded():
            status, _, body = self.store.client.request("GetObject", "GET", key)
            return checksums.BlockChecksums.from_bytes(body) if status == 200 else None

        for how in ("spooled", "streamed", "stored already"):
            with self.subTest(how=how):
                if how == "stored already":   # and its checksums lost: they are recorded anew
                    self.assertEqual(self.store.client.request("DeleteObject", "DELETE", key)[0],
                                     204)
                self.store.put("repo", io.BytesIO(data), expected_oid=None if how == "spooled"
                               else oid, length=None if how == "spooled" else len(data))
                found = recorded()
                self.assertTrue(found.match(data))
                self.assertEqual(found.block_size, 1 << 20)
                with self.store.open("repo", oid) as stored:
                    self.assertEqual(stored.checksums.crcs, found.crcs)
                if how == "spooled":
                    self.store.delete("repo", oid)
                    self.assertIsNone(recorded())
        small, _ = self.put("repo", data[:-1])   # below the size that gets them
        with self.store.open("repo", small) as stored:
            self.assertIsNone(stored.checksums)
        status, _, _ = self.store.client.request(
            "HeadObject", "HEAD", "/%s/prefix/@checksums/repo/%s" % (self.bucket, small))
        self.assertEqual(status, 404)
        self.assertEqual(sorted(oid for oid, _ in self.store.list_objects("repo")),
                         sorted([oid, small]))   # the checksums are not objects of the repository

    def calls_of(self, store, before=None):
        """Record the store's engine calls as ``(method, path, headers)``;
        ``before(call)``, if given, runs before each is made."""
        calls, real_request = [], store.client.request

        def request(operation, method, path, query=(), headers=None, **options):
            calls.append((method, path, headers or {}))
            if before:
                before(calls[-1])
            return real_request(operation, method, path, query, headers, **options)

        store.client.request = request   # this store's client only: an instance attribute
        return calls

    def test_a_put_racing_a_delete_leaves_no_object_without_its_checksums(self):
        data = os.urandom(s3.CHECKSUMS_FROM_BYTES)
        oid, _ = self.put("repo", data)
        other_client, _ = new_bucket(self, self.engine_settings)   # another instance's client
        other = s3.S3Store(self.bucket, "prefix/", other_client)
        deletes = []

        def between_the_deletes(call):
            if call[0] == "DELETE":
                deletes.append(call)
                if len(deletes) == 2:   # the other instance's whole PUT lands here
                    other.put("repo", io.BytesIO(data), expected_oid=oid, length=len(data))

        self.calls_of(self.store, between_the_deletes)
        self.store.delete("repo", oid)
        present = [self.store.client.request("HeadObject", "HEAD", "/%s/prefix/%s/%s" % (
            self.bucket, kind, oid))[0] == 200 for kind in ("repo", "@checksums/repo")]
        self.assertNotEqual(present, [True, False])   # an object whose ranges go unchecked

    def test_quarantine_moves_only_the_bytes_it_read_again(self):
        data = os.urandom(3 << 20)
        oid, _ = self.put("repo", data)
        damaged = os.urandom(len(data))   # changed behind the store's back
        self.store.client.request("PutObject", "PUT", "/%s/prefix/repo/%s" % (self.bucket, oid),
                                  body=damaged, payload_hash=sha256(damaged))
        calls = self.calls_of(self.store)
        self.assertTrue(self.store.quarantine("repo", oid, None))   # no file: nothing started
        copies = [headers for method, path, headers in calls if "x-amz-copy-source" in headers]
        self.assertEqual(len(copies), 1)
        status, headers, _ = self.store.client.request(
            "HeadObject", "HEAD", "/%s/%s" % (self.bucket, urllib.parse.unquote(
                copies[0]["x-amz-copy-source"]).split("/", 2)[2]))
        self.assertEqual(status, 404)   # moved
        self.assertTrue(copies[0].get("x-amz-copy-source-if-match"))   # only if still those bytes

    def test_a_streamed_upload_that_does_not_hash_to_its_oid_is_never_stored(self):
        data = os.urandom(3 * 1024 * 1024)
        claimed = sha256(b"something else")
        with self.assertRaises(storage.DigestMismatch):
            self.store.put("repo", io.BytesIO(data), expected_oid=claimed, length=len(data))
        with self.assertRaises(storage.ObjectNotFound):
            self.store.open("repo", claimed)
        self.assertEqual(self.store.list_objects("repo"), [])
        oid = sha256(data)
        self.assertEqual(self.store.put("repo", io.BytesIO(data), expected_oid=oid,
                                        length=len(data)), (oid, len(data)))
        self.assertEqual(self.read("repo", oid), data)

    def test_a_range_is_a_ranged_get(self):
        data = os.urandom(100000)
        oid, _ = self.put("repo", data)
        with self.store.open("repo", oid) as stored:
            stored.file.seek(99990)
            self.assertEqual(stored.file.read(), data[99990:])
            stored.file.seek(5)
            self.assertEqual(stored.file.read(10), data[5:15])

    def test_listing_pages_across_engine_pages(self):
        stored = sorted(self.put("repo", b"%d" % n)[0] for n in range(30))
        self.assertEqual([oid for oid, _ in self.store.list_objects("repo", limit=1000)], stored)
        self.assertEqual([oid for oid, _ in self.store.list_objects("repo", after=stored[9],
                                                                     limit=5)], stored[10:15])


class SeaweedFSStoreTest(S3StoreContract, unittest.TestCase):
    engine = "seaweedfs"


class CephRGWStoreTest(S3StoreContract, unittest.TestCase):
    engine = "ceph-rgw"


class BlockingSource(io.BytesIO):
    """Yields its first block, then waits for ``release`` before the rest."""

    def __init__(self, data, release):
        super().__init__(data)
        self.started = threading.Event()
        self._release = release

    def readinto(self, buffer):
        if self.started.is_set():
            self._release.wait(10)
        count = super().readinto(memoryview(buffer)[:4096])
        self.started.set()
        return count

    def read(self, size=-1):   # the in-memory store reads a body of known length at once
        self.started.set()
        self._release.wait(10)
        return super().read(size)


def make_socket_file(path):
    """Leave a Unix socket's file at ``path``, as a crashed program would."""
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)


SPECIAL_FILE_MAKERS = {"FIFO": os.mkfifo, "socket": make_socket_file}


def openat2_refusal():
    """The error (its errno's name) with which this kernel or a sandbox's
    filter refuses a plain openat2 of "/", or None if the call opens it:
    asked without the store's own probe, which this file tests."""
    import ctypes
    how = (ctypes.c_uint64 * 3)(os.O_RDONLY | os.O_DIRECTORY, 0, 0)   # struct open_how
    fd = ctypes.CDLL(None, use_errno=True).syscall(
        ctypes.c_long(storage._SYS_OPENAT2), ctypes.c_int(storage._AT_FDCWD), b"/",
        ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        return errno.errorcode.get(ctypes.get_errno(), "errno %d" % ctypes.get_errno())
    os.close(fd)
    return None


class DiskStoreTest(StoreContract, AccountingContract, unittest.TestCase):
    temporary_files_before_the_first_block = 1   # per upload: made before its body is read

    def make_store(self, **options):
        self.root = temporary_directory(self)
        return open_disk_store(self, self.root, **options)

    def temporary_files(self):
        return [path for path in files_under(self.root) if path.startswith("@tmp")]

    def object_path(self, repository, data):
        """``(oid, path)`` of the object holding ``data``, its directories made."""
        oid = sha256(data)
        path = storage.object_path(self.root, repository, oid)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return oid, path

    def quarantined(self, repository, oid, suffix=""):
        """The ``lstat`` of what the quarantine holds for that object."""
        return os.lstat(os.path.join(self.root, "quarantine", "%s@%s%s" % (repository, oid, suffix)))

    def assertNotAnObject(self, repository, oid):
        """Not opened, not deleted, not listed, not counted (usage is counted at start)."""
        with self.assertRaises(storage.ObjectNotFound):
            self.store.open(repository, oid)
        with self.assertRaises(storage.ObjectNotFound):
            self.store.delete(repository, oid)
        self.assertEqual(self.store.list_objects(repository), [])
        self.assertEqual(open_disk_store(self, self.root).usage(), (0, 0))

    def assertReturnsWithoutBlocking(self, call, fifo):
        """Run ``call`` on a thread. If it is still waiting after 10 s (for a
        writer to open ``fifo``), open the FIFO for writing to release it, and fail."""
        outcome = {}
        finished = threading.Event()

        def run():
            try:
                call()
            except BaseException as error:
                outcome["error"] = error
            finally:
                finished.set()

        threading.Thread(target=run, daemon=True).start()
        if not finished.wait(10):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass   # it has just finished after all
            finished.wait(10)
            self.fail("blocked waiting for a writer on a FIFO")
        if "error" in outcome:
            raise outcome["error"]

    def test_symlink_at_an_object_path_is_not_followed(self):
        secret = os.path.join(temporary_directory(self), "secret")
        with open(secret, "wb") as file:
            file.write(b"outside the data directory")
        oid, path = self.object_path("repo", b"outside the data directory")
        os.symlink(secret, path)   # named by its target's hash: even a digest check would pass
        self.assertNotAnObject("repo", oid)
        self.assertEqual(self.put("repo", b"outside the data directory")[0], oid)
        self.assertEqual(self.read("repo", oid), b"outside the data directory")
        self.assertTrue(stat.S_ISREG(os.lstat(path).st_mode))
        self.assertTrue(stat.S_ISLNK(self.quarantined("repo", oid).st_mode))
        with open(secret, "rb") as file:
            self.assertEqual(file.read(), b"outside the data directory")

    def test_a_read_into_a_buffer_of_wide_items_fills_its_bytes(self):
        data = os.urandom(1024)
        oid = self.put("repo", data)[0]
        with self.store.open("repo", oid) as stored:
            buffer = array.array("I", bytes(1024))   # 256 items of 4 bytes
            self.assertEqual(stored.file.readinto(buffer), 1024)
            self.assertEqual(buffer.tobytes(), data)

    def test_closing_an_object_deleted_while_open_closes_it(self):
        # Its last close frees its blocks: a descriptor left open would hold them.
        oid = self.put("repo", b"deleted while open")[0]
        stored = self.store.open("repo", oid)
        fd = stored.file.fileno()
        self.store.delete("repo", oid)
        stored.close()
        with self.assertRaises(OSError):
            os.fstat(fd)

    def test_a_root_reached_through_a_symlink_serves_its_objects(self):
        # Only the links below the root are refused: the root is the operator's choice.
        oid = self.put("repo", b"through a linked root")[0]
        self.store.close()
        link = os.path.join(temporary_directory(self), "data")
        os.symlink(self.root, link)
        store = open_disk_store(self, link, openat2=self.store._openat2)
        with store.open("repo", oid) as stored:
            self.assertEqual(stored.file.read(), b"through a linked root")

    @unittest.skipUnless(sys.platform == "linux"
                         and platform.machine() in storage.SHARED_SYSCALL_TABLE_MACHINES
                         and tuple(map(int, platform.release().split(".")[:2])) >= (5, 6),
                         "openat2 is Linux 5.6 and later")
    def test_objects_are_opened_with_one_openat2_where_linux_has_it(self):
        refused = openat2_refusal()
        if refused:   # the store walks the directories instead, as DiskStoreWalkingTest checks
            self.skipTest("this kernel or sandbox refuses openat2 (%s)" % refused)
        openat2 = storage.openat2_function()
        self.assertIsNotNone(openat2)
        fd = openat2(storage._AT_FDCWD, self.root, os.O_RDONLY | os.O_DIRECTORY)
        os.close(fd)
        with self.assertRaises(OSError) as raised:   # no symlink anywhere on the path
            openat2(storage._AT_FDCWD, os.path.join(self.root, "link", "x"), os.O_RDONLY)
        self.assertEqual(raised.exception.errno, errno.ENOENT)
        os.symlink(self.root, os.path.join(self.root, "link"))
        through_link = os.path.join(self.root, "link", "@ledger")
        with self.assertRaises(OSError) as raised:
            openat2(storage._AT_FDCWD, through_link, os.O_RDONLY)
        self.assertEqual(raised.exception.errno, errno.ELOOP)

    def test_objects_open_after_the_store_is_closed_and_closed_files_stay_closed(self):
        # A request still in flight when a server gives up draining and closes its store.
        oid = self.put("repo", b"still served")[0]
        self.store.close()
        stored = self.store.open("repo", oid)
        with stored:
            self.assertEqual(stored.file.read(), b"still served")
        for use in (lambda: stored.file.read(1), lambda: stored.file.seek(0), stored.file.tell,
                    stored.file.fileno):
            with self.assertRaises(ValueError):   # never another file that took its number
                use()

    @unittest.skipUnless(os.path.isdir("/proc/self/fd"), "needs /proc/self/fd")
    def test_a_store_that_fails_to_start_leaves_no_descriptor_open(self):
        os.mkdir(os.path.join(self.root, "@ledger-to-be"))
        self.store.close()
        os.remove(os.path.join(self.root, "@ledger"))
        os.rename(os.path.join(self.root, "@ledger-to-be"), os.path.join(self.root, "@ledger"))
        gc.collect()
        before = descriptors_under(self.root)   # the closed store's root, for reads still in flight
        for _ in range(5):
            with self.assertRaises(IsADirectoryError):
                storage.DiskStore(self.root, openat2=self.store._openat2)
        gc.collect()
        self.assertEqual(descriptors_under(self.root), before)

    @unittest.skipUnless(hasattr(os, "removexattr"), "no extended attributes here")
    def test_checksums_are_read_when_first_asked_for_and_never_after_close(self):
        data = os.urandom(2 * checksums.MIN_BLOCK_BYTES)
        oid = self.put("repo", data)[0]
        path = storage.object_path(self.root, "repo", oid)
        with self.store.open("repo", oid) as stored:
            os.removexattr(path, checksums.ATTRIBUTE)   # after the open, before they are asked for
            self.assertIsNone(stored.checksums)
        stored = self.store.open("repo", oid)
        stored.close()   # its descriptor's number may be another file's by now
        with self.assertRaises(ValueError):
            stored.checksums

    def test_symlinked_directories_are_neither_followed_nor_written_through(self):
        data = b"an object in a tree outside the data directory"
        oid = sha256(data)
        outside = temporary_directory(self)
        os.makedirs(os.path.join(outside, oid[:2]))
        with open(os.path.join(outside, oid[:2], oid), "wb") as file:
            file.write(data)
        os.symlink(outside, os.path.join(self.root, "linked-repository"))
        os.makedirs(os.path.join(self.root, "linked-shard"))
        os.symlink(os.path.join(outside, oid[:2]), os.path.join(self.root, "linked-shard", oid[:2]))
        for repository in ("linked-repository", "linked-shard"):
            with self.subTest(repository=repository):
                self.assertNotAnObject(repository, oid)
                with self.assertRaises(storage.ForeignEntry):
                    self.put(repository, data)
                self.assertEqual(files_under(outside), ["%s/%s" % (oid[:2], oid)])   # nothing unlinked

    def test_special_files_at_an_object_path_are_not_objects(self):
        for kind, make in SPECIAL_FILE_MAKERS.items():
            with self.subTest(kind=kind):
                data = b"an object where a %s was" % kind.encode()
                oid, path = self.object_path(kind, data)
                make(path)
                self.assertReturnsWithoutBlocking(lambda: self.assertNotAnObject(kind, oid), path)
                self.assertEqual(self.put(kind, data)[0], oid)
                self.assertEqual(self.read(kind, oid), data)
                self.assertFalse(stat.S_ISREG(self.quarantined(kind, oid).st_mode))
                self.store.delete(kind, oid)

    def test_directory_at_an_object_path_is_not_an_object(self):
        oid, path = self.object_path("repo", b"where a directory was")
        os.mkdir(path)
        self.assertNotAnObject("repo", oid)
        self.assertTrue(os.path.isdir(path))   # a DELETE that finds no object removes nothing
        self.assertEqual(self.put("repo", b"where a directory was")[0], oid)
        self.assertEqual(self.read("repo", oid), b"where a directory was")
        self.assertEqual(self.store.usage(), (1, 21))
        self.assertTrue(stat.S_ISDIR(self.quarantined("repo", oid).st_mode))
        self.store.delete("repo", oid)
        os.mkdir(path)   # again: the first one keeps its place in the quarantine
        self.assertEqual(self.put("repo", b"where a directory was")[0], oid)
        self.assertTrue(stat.S_ISDIR(self.quarantined("repo", oid, "@2").st_mode))

    def test_layout(self):
        oid, _ = self.put("repo", b"laid out")
        with open(os.path.join(self.root, "repo", oid[:2], oid), "rb") as file:
            self.assertEqual(file.read(), b"laid out")
        self.assertEqual(self.temporary_files(), [])

    def test_objects_and_deletions_survive_restart(self):
        kept, _ = self.put("repo", b"kept")
        gone, _ = self.put("repo", b"gone")
        self.store.delete("repo", gone)
        self.store.close()
        reopened = open_disk_store(self, self.root)
        self.assertEqual(reopened.usage(), (1, 4))
        with reopened.open("repo", kept) as stored:
            self.assertEqual(stored.file.read(), b"kept")
        with self.assertRaises(storage.ObjectNotFound):
            reopened.open("repo", gone)

    def test_failed_uploads_leave_no_files(self):
        with self.assertRaises(ConnectionResetError):
            self.store.put("repo", FailingSource(b"cut off" * 500000))   # through the pipeline
        with self.assertRaises(storage.DigestMismatch):
            self.put("repo", b"mismatch", expected_oid=sha256(b"other"))
        self.assertEqual(files_under(self.root), ["@ledger"])   # the account alone

    def test_concurrent_uploads_of_one_object_both_succeed(self):
        data = b"twice at once" * 1000
        release = threading.Event()
        self.addCleanup(release.set)
        sources = [BlockingSource(data, release) for _ in range(2)]
        results = []
        threads = [threading.Thread(target=lambda s=s: results.append(self.store.put("repo", s)))
                   for s in sources]
        for thread in threads:
            thread.start()
        for source in sources:
            self.assertTrue(source.started.wait(10))
        self.assertEqual(len(self.temporary_files()),   # both mid-upload, in distinct files
                         2 * self.temporary_files_before_the_first_block)
        release.set()
        for thread in threads:
            thread.join()
        self.assertEqual(results, [(sha256(data), len(data))] * 2)
        self.assertEqual(self.temporary_files(), [])

    def test_start_up_removes_only_abandoned_temporary_files(self):
        release = threading.Event()
        self.addCleanup(release.set)
        source = BlockingSource(b"in progress" * 1000, release)
        upload = threading.Thread(target=self.store.put, args=("repo", source))
        upload.start()
        self.assertTrue(source.started.wait(10))
        in_progress = self.temporary_files()
        self.assertEqual(len(in_progress), self.temporary_files_before_the_first_block)
        abandoned = os.path.join(self.root, "@tmp", "12345-dead")
        os.makedirs(abandoned)
        with open(os.path.join(abandoned, "partial"), "wb") as file:
            file.write(b"left by a crashed process")
        open_disk_store(self, self.root)          # a second process starting on the same root
        self.assertFalse(os.path.exists(abandoned))
        self.assertEqual(self.temporary_files(), in_progress)
        release.set()
        upload.join()
        self.assertEqual(self.read("repo", sha256(b"in progress" * 1000)), b"in progress" * 1000)

    def test_full_disk_is_insufficient_storage_and_loses_nothing(self):
        with small_filesystem(self) as mount_point:
            store = storage.DiskStore(mount_point)
            try:
                oid, _ = store.put("repo", io.BytesIO(b"small"))
                with self.assertRaises(storage.InsufficientStorage):
                    store.put("repo", io.BytesIO(os.urandom(2 * 1024 * 1024)))
                self.assertEqual([p for p in files_under(mount_point) if p.startswith("@tmp")], [])
                with store.open("repo", oid) as stored:
                    self.assertEqual(stored.file.read(), b"small")
                self.assertEqual(store.put("repo", io.BytesIO(b"room again"))[1], 10)
            finally:
                store.close()

    def test_no_empty_repository_is_left_when_its_directory_cannot_be_made(self):
        with small_filesystem(self, inodes=64) as mount_point:
            store = storage.DiskStore(mount_point)
            self.addCleanup(store.close)
            filler = os.path.join(mount_point, "filler")
            os.mkdir(filler)
            count = 0
            try:
                while True:   # take every inode left
                    open(os.path.join(filler, str(count)), "w").close()
                    count += 1
            except OSError:
                pass
            for name in ("0", "1"):   # room for the temporary file and one directory
                os.unlink(os.path.join(filler, name))
            with self.assertRaises(storage.InsufficientStorage):
                store.put("new-repo", io.BytesIO(b"no room for its shard directory"))
            self.assertFalse(os.path.exists(os.path.join(mount_point, "new-repo")))

    def test_tiny_reads_are_written_in_whole_blocks(self):
        if not os.path.exists("/proc/self/io"):
            self.skipTest("no /proc/self/io to count write system calls")

        class Trickle(io.BytesIO):   # as a body of tiny chunks arrives
            def readinto(self, buffer):
                return super().readinto(memoryview(buffer)[:64])

        def writes():
            with open("/proc/self/io") as counters:
                return int(dict(line.split(": ") for line in counters.read().splitlines())["syscw"])

        data = os.urandom(3 * storage.DiskStore.BLOCK_BYTES + 5)
        before = writes()
        self.assertEqual(self.store.put("repo", Trickle(data))[1], len(data))
        self.assertLess(writes() - before, 100)   # not one per 64-byte read (49,000)

    def test_block_checksums_are_recorded_with_each_object(self):
        data = os.urandom(2 * storage.DiskStore.BLOCK_BYTES + 3)
        for length in (len(data), None):   # sized for the length, or from 1 MiB up
            with self.subTest(length=length):
                oid, _ = self.store.put("repo", io.BytesIO(data), length=length)
                with self.store.open("repo", oid) as stored:
                    recorded = stored.checksums
                self.assertEqual(recorded.block_size, checksums.block_size_for(length or 0))
                self.assertTrue(recorded.match(data))
                self.store.delete("repo", oid)
        for size in (0, 64 * 1024, storage.CHECKSUMS_FROM_BYTES):   # none up to 64 KiB:
            data = os.urandom(size)                                    # such are checked whole
            with self.store.open("repo", self.put("repo", data)[0]) as stored:
                if size < storage.CHECKSUMS_FROM_BYTES:
                    self.assertIsNone(stored.checksums)
                else:
                    self.assertTrue(stored.checksums.match(data))

    def test_damaged_or_missing_checksums_are_none(self):
        data = b"d" * storage.CHECKSUMS_FROM_BYTES
        oid, _ = self.put("repo", data)
        path = storage.object_path(self.root, "repo", oid)
        recorded = os.getxattr(path, checksums.ATTRIBUTE)
        for value in (recorded[:-1], b"\0" + recorded[1:]):
            os.setxattr(path, checksums.ATTRIBUTE, value)
            with self.store.open("repo", oid) as stored:
                self.assertIsNone(stored.checksums)
        os.removexattr(path, checksums.ATTRIBUTE)
        with self.store.open("repo", oid) as stored:
            self.assertIsNone(stored.checksums)
            self.assertEqual(stored.file.read(), data)

    def test_verify_quarantines_corrupt_objects(self):
        good, _ = self.put("repo", b"good")
        bad, _ = self.put("repo", b"bad")
        with open(os.path.join(self.root, "repo", bad[:2], bad), "r+b") as file:
            file.write(b"B")
        self.assertEqual(self.store.verify(report=lambda line: None), (2, 1))
        self.assertTrue(os.path.exists(os.path.join(self.root, "quarantine", "repo@" + bad)))
        with self.assertRaises(storage.ObjectNotFound):
            self.store.open("repo", bad)
        self.assertEqual(self.read("repo", good), b"good")
        self.assertEqual(self.store.verify(report=lambda line: None), (1, 0))
        self.assertEqual(self.store.usage(), (1, 4))   # the account follows what verify moved out

    def test_verify_records_missing_or_wrong_block_checksums(self):
        data = os.urandom(2 * checksums.MIN_BLOCK_BYTES + 1)
        oid, _ = self.put("repo", data)
        path = storage.object_path(self.root, "repo", oid)
        recorded = os.getxattr(path, checksums.ATTRIBUTE)
        wrong = checksums.BlockChecksums.from_bytes(recorded)
        wrong.crcs[0] ^= 1   # intact as bytes, wrong for the object
        stale = checksums.BlockChecksums(4096, 10, [0]).to_bytes()   # of another size
        for damage in (lambda: os.removexattr(path, checksums.ATTRIBUTE),
                       lambda: os.setxattr(path, checksums.ATTRIBUTE, wrong.to_bytes()),
                       lambda: os.setxattr(path, checksums.ATTRIBUTE, stale)):
            damage()
            self.assertEqual(self.store.verify(report=lambda line: None), (1, 0))
            self.assertTrue(checksums.BlockChecksums.from_bytes(
                os.getxattr(path, checksums.ATTRIBUTE)).match(data))

    def test_processes_on_one_root_share_one_account_and_quota(self):
        first = self.make_store(max_total_size=100)
        second = open_disk_store(self, self.root, max_total_size=100)   # as another process would
        oid, _ = first.put("repo", io.BytesIO(b"x" * 60))
        self.assertEqual(second.usage(), (1, 60))
        with self.assertRaises(storage.InsufficientStorage):
            second.put("repo", io.BytesIO(b"y" * 50), length=50)
        second.delete("repo", oid)
        self.assertEqual(first.usage(), (0, 0))
        self.assertEqual(first.put("repo", io.BytesIO(b"y" * 50), length=50)[1], 50)

    def test_the_account_stays_exact_under_concurrent_changes_and_readers(self):
        stores = [self.store, open_disk_store(self, self.root)]   # two open ledgers, as two processes
        bodies = [b"body %d" % n * (n + 1) for n in range(8)]
        done = threading.Event()

        def churn(store, number):
            for round_ in range(60):
                body = bodies[(number + round_) % len(bodies)]
                store.put("repo", io.BytesIO(body))
                try:
                    store.delete("repo", sha256(body))
                except storage.ObjectNotFound:
                    pass

        def read_usage(store):   # as /metrics does, from another thread
            while not done.is_set():
                store.usage()

        readers = [threading.Thread(target=read_usage, args=(store,)) for store in stores]
        for reader in readers:
            reader.start()
        run_concurrently([functools.partial(churn, store, number)
                          for number, store in enumerate(stores * 3)])
        done.set()
        for reader in readers:
            reader.join()
        truth = [os.path.getsize(os.path.join(self.root, path)) for path in files_under(self.root)
                 if path.startswith("repo/")]
        self.assertEqual(self.store.usage(), (len(truth), sum(truth)))

    def test_a_damaged_account_is_recounted_at_start(self):
        self.put("repo", b"counted")
        ledger = os.path.join(self.root, storage.DiskStore.LEDGER_FILE)
        for damage in (b"garbage", b"-5 -100", b"1", b""):
            with self.subTest(damage=damage):
                with open(ledger, "wb") as file:
                    file.write(damage)
                self.assertEqual(open_disk_store(self, self.root).usage(), (1, 7))

    def read_and_check(self, repository, oid, data=None):
        """Read the object as a reader that checks it whole does, and say it
        is sound (``data``: say these bytes are, whatever was read)."""
        with self.store.open(repository, oid) as stored:
            read = stored.file.read()
            stored.checked(read if data is None else data)
        return read

    def test_a_small_object_is_served_from_memory_once_checked(self):
        data = b"kept once checked"
        oid, _ = self.put("repo", data)
        with self.store.open("repo", oid) as stored:   # read, not yet said sound: not kept
            self.assertEqual(stored.file.read(), data)
        with self.store.open("repo", oid) as stored:
            self.assertTrue(stored.may_change_at_rest)
        self.assertEqual(self.read_and_check("repo", oid), data)
        with open(storage.object_path(self.root, "repo", oid), "r+b") as file:
            file.write(b"K")   # damaged at rest after that
        descriptors = len(os.listdir("/proc/self/fd"))
        with self.store.open("repo", oid) as stored:
            self.assertFalse(stored.may_change_at_rest)   # bytes in memory: no check again
            self.assertEqual(stored.file.read(), data)
            self.assertEqual(len(os.listdir("/proc/self/fd")), descriptors)   # no file open
        self.assertEqual(self.store.verify(report=lambda line: None), (1, 1))   # the disk's copy
        with self.assertRaises(storage.ObjectNotFound):   # out of service, for this process too
            self.store.open("repo", oid)

    def test_an_object_kept_in_memory_is_gone_once_another_process_takes_it_away(self):
        data = b"kept, then taken away by another process"
        oid, _ = self.put("repo", data)
        path = storage.object_path(self.root, "repo", oid)
        elsewhere = os.path.join(temporary_directory(self), "a copy")
        with open(elsewhere, "wb") as file:
            file.write(data)
        for take_away in (lambda: None,   # deleted, nothing more
                          lambda: os.mkdir(path),   # a directory holds its name
                          lambda: os.symlink(elsewhere, path)):   # a symlink to its very bytes
            with self.subTest():
                self.put("repo", data)
                self.assertEqual(self.read_and_check("repo", oid), data)
                open_disk_store(self, self.root).delete("repo", oid)   # as another worker would
                take_away()
                with self.assertRaises(storage.ObjectNotFound):
                    self.store.open("repo", oid)
                self.assertIsNone(self.store._checked.get(("repo", oid)))   # and not kept
                if os.path.isdir(path) and not os.path.islink(path):
                    os.rmdir(path)
                elif os.path.lexists(path):
                    os.unlink(path)

    def test_only_sound_small_objects_are_kept(self):
        oid, _ = self.put("repo", b"damaged before its first read")
        with open(storage.object_path(self.root, "repo", oid), "r+b") as file:
            file.write(b"D")
        self.read_and_check("repo", oid)   # a reader that says damaged bytes are sound
        self.read_and_check("repo", oid, b"other bytes")   # or says other bytes are
        with self.store.open("repo", oid) as stored:   # its file still, for the reader to check
            self.assertTrue(stored.may_change_at_rest)
        large = os.urandom(storage.HANDED_OVER_BYTES + 1)
        large_oid, _ = self.put("repo", large)
        self.read_and_check("repo", large_oid)
        with self.store.open("repo", large_oid) as stored:   # not small: never kept
            self.assertTrue(stored.may_change_at_rest)

    def test_quarantine_moves_only_the_file_that_was_read(self):
        oid, _ = self.put("repo", b"read, then uploaded again")
        with self.store.open("repo", oid) as read:
            with open("/proc/self/fd/%d" % read.file.fileno(), "r+b") as damaged:
                damaged.write(b"R")   # the file that was read, damaged
            self.put("repo", b"read, then uploaded again")   # a new file under the same name
            with self.assertRaises(storage.ObjectNotFound):
                self.store.quarantine("repo", oid, read.file)
        self.assertEqual(self.read("repo", oid), b"read, then uploaded again")
        self.assertEqual(self.store.usage(), (1, 25))

    def test_verify_moves_only_the_file_it_found_damaged(self):
        data = b"found damaged, then uploaded again"
        oid, _ = self.put("repo", data)
        with open(storage.object_path(self.root, "repo", oid), "r+b") as file:
            file.write(b"F")
        second = open_disk_store(self, self.root)   # as another process on the root would
        source, first_line = inspect.getsourcelines(storage.DiskStore._verify_entry)
        moving = first_line + next(number for number, line in enumerate(source)
                                   if "with self._lock" in line)
        found = []
        verifier = threading.Thread(target=lambda: found.append(self.store.verify(report=print)))
        with self.store._lock:   # verify hashes the damaged file, then waits here to move it
            verifier.start()
            wait_until(lambda: getattr(sys._current_frames().get(verifier.ident), "f_lineno",
                                       None) == moving)
            second.put("repo", io.BytesIO(data))   # a sound file under the same name meanwhile
        verifier.join()
        self.assertEqual(found, [(1, 0)])   # what it found damaged is gone: nothing to move
        self.assertEqual(self.read("repo", oid), data)
        self.assertEqual(self.store.usage(), (1, len(data)))

    def test_an_object_grown_at_rest_leaves_the_account_at_zero_not_below(self):
        oid, _ = self.put("repo", b"x" * 1000)
        with open(storage.object_path(self.root, "repo", oid), "ab") as file:
            file.write(b"y" * 5000)   # a hand on the file: taken out at 6000 bytes
        self.store.delete("repo", oid)
        self.assertEqual(self.store.usage(), (0, 0))   # below zero, every call would fail
        self.assertEqual(self.put("repo", b"fine")[1], 4)

    def test_quarantine_keeps_a_sound_object_and_mends_its_checksums(self):
        data = os.urandom(3 * checksums.MIN_BLOCK_BYTES)
        oid, _ = self.put("repo", data)
        path = storage.object_path(self.root, "repo", oid)
        wrong = checksums.BlockChecksums.from_bytes(os.getxattr(path, checksums.ATTRIBUTE))
        wrong.crcs[0] ^= 1
        os.setxattr(path, checksums.ATTRIBUTE, wrong.to_bytes())
        with self.store.open("repo", oid) as read:
            self.assertIsNone(self.store.quarantine("repo", oid, read.file))
        with self.store.open("repo", oid) as stored:
            self.assertTrue(stored.checksums.match(data))
        self.assertEqual(self.store.usage(), (1, len(data)))

    def test_start_up_reads_the_account_instead_of_walking_the_tree(self):
        self.put("repo", b"counted")
        stray = os.path.join(self.root, "repo", sha256(b"stray")[:2])
        os.makedirs(stray, exist_ok=True)
        with open(os.path.join(stray, sha256(b"stray")), "wb") as file:
            file.write(b"stray")   # written behind the store's back: not in the account
        self.assertEqual(open_disk_store(self, self.root).usage(), (1, 7))   # no walk
        os.unlink(os.path.join(self.root, storage.DiskStore.LEDGER_FILE))
        self.assertEqual(open_disk_store(self, self.root).usage(), (2, 12))  # recounted once

    def test_a_temporary_name_left_by_a_killed_worker_is_passed_over(self):
        # A worker killed mid-upload leaves "<pid>-<count>"; a later one may get its pid.
        temporary_dir, = [os.path.join(self.root, "@tmp", name)
                          for name in os.listdir(os.path.join(self.root, "@tmp"))]
        for count in range(2):
            open(os.path.join(temporary_dir, "%d-%d" % (os.getpid(), count)), "w").close()
        oid, _ = self.put("repo", b"stored all the same")
        self.assertEqual(self.read("repo", oid), b"stored all the same")

    def test_quarantine_is_also_a_valid_repository_name(self):
        oid, _ = self.put("quarantine", b"a repository like any other")
        self.assertEqual(self.store.verify(report=lambda line: None), (1, 0))
        self.assertEqual(self.read("quarantine", oid), b"a repository like any other")

    def test_verify_command(self):
        self.put("repo", b"fine")
        bad, _ = self.put("repo", b"to be corrupted")
        with open(os.path.join(self.root, "repo", bad[:2], bad), "ab") as file:
            file.write(b"!")
        command = [sys.executable, os.path.join(HERE, "storage.py"), "verify", self.root]
        first = subprocess.run(command, capture_output=True, text=True)
        self.assertEqual(first.returncode, 1, first.stderr)
        self.assertIn("verified 2 objects", first.stdout)
        self.assertIn("1 corrupt", first.stdout)
        second = subprocess.run(command, capture_output=True, text=True)
        self.assertEqual((second.returncode, second.stdout.splitlines()[-1].split(":")[-1]),
                         (0, " 0 corrupt"))
        usage = subprocess.run(command[:2], capture_output=True, text=True)
        self.assertEqual(usage.returncode, 2)

    def test_verify_command_checks_every_entry_and_never_blocks(self):
        sound = [self.put("r", b"sound %d" % number)[0] for number in range(5)]
        _, corrupted = self.object_path("r", b"to be corrupted")
        with open(corrupted, "wb") as file:
            file.write(b"not what it is named after")
        target = os.path.join(temporary_directory(self), "target")
        with open(target, "wb") as file:
            file.write(b"symlink target")
        makers = dict(SPECIAL_FILE_MAKERS, directory=os.mkdir,
                      symlink=lambda path: os.symlink(target, path))
        special = {kind: self.object_path("r", b"symlink target" if kind == "symlink" else
                                          kind.encode())[0] for kind in makers}
        for kind, oid in special.items():
            makers[kind](storage.object_path(self.root, "r", oid))
        command = [sys.executable, os.path.join(HERE, "storage.py"), "verify", self.root]
        first = subprocess.run(command, capture_output=True, text=True, timeout=60)
        self.assertIn("verified 10 objects", first.stdout, first.stderr)
        self.assertEqual((first.returncode, first.stdout.splitlines()[-1].split(":")[-1]),
                         (1, " 5 corrupt (listed above)"))
        self.assertIn("r/%s does not hash to its name" % sha256(b"to be corrupted"), first.stdout)
        for kind, oid in special.items():
            self.assertIn("r/%s is a %s; moved to" % (oid, kind), first.stdout)
            self.assertFalse(stat.S_ISREG(self.quarantined("r", oid).st_mode))
        for oid in sound:
            self.assertEqual(len(self.read("r", oid)), 7)
        with open(target, "rb") as file:
            self.assertEqual(file.read(), b"symlink target")
        second = subprocess.run(command, capture_output=True, text=True, timeout=60)
        self.assertEqual((second.returncode, second.stdout.splitlines()[-1].split(":")[-1]),
                         (0, " 0 corrupt"))


class DiskStoreWalkingTest(DiskStoreTest):
    """The disk store where there is no openat2: it walks the directories to an object."""

    def make_store(self, **options):
        return super().make_store(openat2=None, **options)


class DiskStoreGroupCommitTest(DiskStoreTest):
    """The disk store whose uploads are made durable in batches (a GroupCommit,
    here with an fsync of the temporary directory for its sync: the contract
    is what is checked, the durability order in GroupCommitTest)."""

    def make_store(self, **options):
        return super().make_store(sync_filesystem=os.fsync, **options)

    # An upload makes its temporary file only once its first block is read
    # (a body within that block is written by the committer).
    temporary_files_before_the_first_block = 0


class CheckedObjectsTest(unittest.TestCase):
    def test_what_is_kept_is_bounded_and_the_least_recently_read_goes_first(self):
        entry = storage._CheckedObjects.ENTRY_BYTES
        kept = storage._CheckedObjects(limit=2 * entry + 8)   # two objects of 4 bytes
        kept.keep("a", b"aaaa")
        kept.keep("b", b"bbbb")
        self.assertEqual(kept.get("a"), b"aaaa")   # read again: "b" is the least recent now
        kept.keep("c", b"cccc")
        self.assertEqual([kept.get(key) for key in "abc"], [b"aaaa", None, b"cccc"])
        kept.keep("c", b"cc")   # kept again: counted once, the most recent
        kept.keep("d", b"dd")   # room for it: "a", the least recent, goes
        self.assertEqual([kept.get(key) for key in "acd"], [None, b"cc", b"dd"])
        kept.keep("e", b"e" * (2 * entry))   # larger than all of it: not kept, nothing dropped
        self.assertEqual([kept.get(key) for key in "cde"], [b"cc", b"dd", None])
        kept.drop("c")
        self.assertIsNone(kept.get("c"))

    def test_empty_objects_count_too(self):
        kept = storage._CheckedObjects(limit=10 * storage._CheckedObjects.ENTRY_BYTES)
        for number in range(100):
            kept.keep(number, b"")
        self.assertEqual(sum(kept.get(number) is not None for number in range(100)), 10)


class GroupCommitTest(unittest.TestCase):
    """The disk store's uploads are committed in batches that share syncs of
    the filesystem (group commit): a put returns only after a sync that began
    once its bytes were written and ended before its rename, and another that
    began after its rename; uploads that arrive during a batch share the next
    one; one upload's failure is its own; a failed sync fails the later ones."""

    def group_commit(self, sync_filesystem=lambda fd: None, write=lambda uploads: None):
        commit = storage.GroupCommit(temporary_directory(self), sync_filesystem, write,
                                     lambda uploads: None)
        self.addCleanup(commit.close)
        return commit

    @unittest.skipIf(storage.SYNCFS is None, "no syncfs here (Linux 5.8+)")
    def test_syncfs_reports_its_errors(self):
        with self.assertRaises(OSError) as failed:
            storage.SYNCFS(-1)
        self.assertEqual(failed.exception.errno, errno.EBADF)

    def test_a_child_forked_during_a_sync_commits_on_its_own(self):
        in_sync, may_end = threading.Event(), threading.Event()

        def sync_filesystem(fd):
            if os.getpid() == parent:
                in_sync.set()
                may_end.wait(10)

        parent = os.getpid()
        commit = self.group_commit(sync_filesystem)
        leader = threading.Thread(target=commit.commit, args=(storage._Upload("r", "o", 1, 0),))
        leader.start()
        self.addCleanup(leader.join, 10)
        self.addCleanup(may_end.set)
        in_sync.wait(10)

        def commit_in_child():   # the parent's committer thread is not in the child
            signal.alarm(5)
            commit.commit(storage._Upload("r", "o", 1, 0))
            return b"committed"

        self.assertEqual(in_forked_child(commit_in_child), b"committed")

    def test_no_put_returns_before_its_bytes_then_its_name_are_synced(self):
        root = temporary_directory(self)
        datas = [os.urandom(1000 + number) for number in range(8)]   # told apart by size
        datas.append(os.urandom(storage.HANDED_OVER_BYTES + 1))      # one written by its thread
        paths = {len(data): storage.object_path(root, "repo", sha256(data)) for data in datas}
        log, lock = [], threading.Lock()

        def size_of(path):   # None if renamed meanwhile
            try:
                return os.path.getsize(path)
            except FileNotFoundError:
                return None

        def snapshot(when):
            written = [size_of(os.path.join(directory, name)) for directory, _, names
                       in os.walk(os.path.join(root, "@tmp")) for name in names]
            renamed = [size for size, path in paths.items() if os.path.exists(path)]
            log.append((when, set(written), set(renamed)))

        def sync_filesystem(fd):   # one at a time: begin and end alternate in the log
            with lock:
                snapshot("begin")
            os.sync()
            with lock:
                snapshot("end")

        store = open_disk_store(self, root, sync_filesystem=sync_filesystem)

        def put(data):
            store.put("repo", io.BytesIO(data), length=len(data))
            with lock:
                log.append(("returned", len(data)))

        run_concurrently([functools.partial(put, data) for data in datas])
        syncs = [(begin, end, log.index(end)) for begin, end in zip(
            [entry for entry in log if entry[0] == "begin"],
            [entry for entry in log if entry[0] == "end"])]
        for size in paths:
            returned = log.index(("returned", size))
            self.assertTrue(any(size in begin[1] and size not in end[2] and at < returned
                                for begin, end, at in syncs), size)   # its bytes, before its name
            self.assertTrue(any(size in begin[2] and at < returned
                                for begin, end, at in syncs), size)   # its name
        self.assertEqual(store.usage(), (len(datas), sum(map(len, datas))))

    def test_uploads_that_arrive_during_a_round_share_the_next(self):
        first_may_end = threading.Event()
        batches = []

        def write(uploads):
            batches.append([upload.oid for upload in uploads])
            if len(batches) == 1:
                first_may_end.wait(10)

        commit = self.group_commit(write=write)
        first = threading.Thread(target=commit.commit, args=(storage._Upload("r", "first", 1, 0),))
        first.start()
        wait_until(lambda: batches)
        others = [threading.Thread(target=commit.commit, args=(storage._Upload("r", "other", 1, 0),))
                  for _ in range(5)]
        for thread in others:
            thread.start()
        wait_until(lambda: len(commit._queued) == 5)   # noqa: SLF001 (all five wait)
        self.assertTrue(all(thread.is_alive() for thread in others))   # the batch running began before
        first_may_end.set()
        for thread in [first] + others:
            thread.join(10)
        self.assertEqual(batches, [["first"], ["other"] * 5, []])   # the last round publishes only

    def test_a_directory_not_made_yet_is_judged_by_its_parent(self):
        parent = temporary_directory(self)
        self.assertEqual(storage.syncfs_durable(os.path.join(parent, "not made yet")),
                         storage.syncfs_durable(parent))
        self.assertEqual(storage.syncfs_durable(os.path.join(parent, "no", "such")),
                         (False, None))

    def test_a_failed_sync_fails_every_later_one(self):
        outcomes = iter([OSError(errno.EIO, "Input/output error"), None])

        def sync_filesystem(fd):
            outcome = next(outcomes)
            if outcome:
                raise outcome

        commit = self.group_commit(sync_filesystem)
        for _ in range(2):   # the second sync would succeed: the writes before it may be lost
            with self.assertRaises(OSError) as failed:
                commit.commit(storage._Upload("r", "o", 1, 0))
            self.assertEqual(failed.exception.errno, errno.EIO)
        self.assertIn("restart", str(failed.exception))

    def test_every_upload_of_a_failed_round_raises_an_exception_of_its_own(self):
        # One exception object raised in several threads at once would gather
        # the frames of all of them in its traceback.
        in_first_sync, may_fail = threading.Event(), threading.Event()

        def sync_filesystem(fd):
            in_first_sync.set()
            may_fail.wait(10)
            raise OSError(errno.EIO, "Input/output error")

        commit = self.group_commit(sync_filesystem)
        raised = {}

        def upload(name):
            try:
                commit.commit(storage._Upload("r", name, 1, 0))
            except OSError as error:
                raised[name] = error

        first = threading.Thread(target=upload, args=("first",))
        first.start()
        self.assertTrue(in_first_sync.wait(10))
        threads = [threading.Thread(target=upload, args=(name,)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(commit._queued) == 2)   # noqa: SLF001 (one round for both)
        may_fail.set()
        for thread in [first] + threads:
            thread.join(10)
        self.assertIsNot(raised["a"], raised["b"])
        self.assertIs(raised["a"].__cause__, raised["b"].__cause__)   # the round's error
        self.assertIsInstance(raised["a"].__cause__, OSError)
        self.assertEqual(raised["a"].__cause__.errno, errno.EIO)
        for error in raised.values():
            self.assertEqual(error.errno, errno.EIO)
            self.assertEqual(sum(frame.f_code.co_name == "upload"   # its own thread's frames only
                                 for frame, _ in traceback.walk_tb(error.__traceback__)), 1)

    def test_an_error_of_another_kind_is_raised_as_it_is(self):
        class Unusual(Exception):
            def __init__(self, code, reason):   # a copy made from its args would fail
                super().__init__(reason)

        failure = Unusual(7, "unusual")

        def sync_filesystem(fd):
            raise failure

        commit = self.group_commit(sync_filesystem)
        with self.assertRaises(Unusual) as raised:
            commit.commit(storage._Upload("r", "o", 1, 0))
        self.assertIs(raised.exception, failure)

    def uploads_in_one_batch(self, store, puts):
        """Run ``puts`` (functions) at once, the first sync held until all of
        them wait for the next batch: its uploads are committed together."""
        in_first_sync, batch_queued = threading.Event(), threading.Event()
        commit = store._group_commit   # noqa: SLF001
        real_sync = commit._sync_filesystem   # noqa: SLF001

        def sync_filesystem(fd):
            in_first_sync.set()
            batch_queued.wait(10)
            real_sync(fd)

        commit._sync_filesystem = sync_filesystem   # noqa: SLF001
        started = threading.Thread(target=store.put, args=("repo", io.BytesIO(b"first")))
        started.start()
        self.assertTrue(in_first_sync.wait(10))
        outcomes = [None] * len(puts)

        def run(number):
            try:
                outcomes[number] = puts[number]()
            except storage.StoreError as error:
                outcomes[number] = error

        threads = [threading.Thread(target=run, args=(number,)) for number in range(len(puts))]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(commit._queued) == len(puts))   # noqa: SLF001
        batch_queued.set()
        for thread in [started] + threads:
            thread.join(10)
        return outcomes

    def test_one_upload_that_cannot_be_stored_fails_alone(self):
        root = temporary_directory(self)
        store = open_disk_store(self, root, sync_filesystem=os.fsync)
        os.makedirs(os.path.join(root, "taken"))
        with open(os.path.join(root, "taken", sha256(b"c")[:2]), "w"):
            pass   # a file where the shard directory belongs: not the store's to move aside
        descriptors = descriptors_under(root) if os.path.isdir("/proc/self/fd") else None
        outcomes = self.uploads_in_one_batch(store, [
            lambda: store.put("repo", io.BytesIO(b"a")),
            lambda: store.put("taken", io.BytesIO(b"c")),
            lambda: store.put("repo", io.BytesIO(b"b" * 70000), length=70000),   # written by its thread
        ])
        self.assertEqual(outcomes[0], (sha256(b"a"), 1))
        self.assertIsInstance(outcomes[1], storage.ForeignEntry)
        self.assertEqual(outcomes[2], (sha256(b"b" * 70000), 70000))
        self.assertEqual(store.usage(), (3, 1 + 5 + 70000))
        if descriptors is not None:   # the shard directories' among them: all closed again
            self.assertEqual(descriptors_under(root), descriptors)
        self.assertEqual(os.listdir(os.path.join(root, "@tmp", os.listdir(os.path.join(root, "@tmp"))[0])),
                         [])   # no temporary file left behind

    def test_one_object_uploaded_twice_in_one_batch_is_counted_once(self):
        store = open_disk_store(self, temporary_directory(self), sync_filesystem=os.fsync)
        outcomes = self.uploads_in_one_batch(store, [
            functools.partial(store.put, "repo", io.BytesIO(b"twice")) for _ in range(2)])
        self.assertEqual(outcomes, [(sha256(b"twice"), 5)] * 2)
        self.assertEqual(store.usage(), (2, 5 + 5))   # "first", and this one once

    def test_uploads_of_known_length_in_one_batch_fill_the_quota(self):
        store = open_disk_store(self, temporary_directory(self), max_total_size=85,
                                sync_filesystem=os.fsync)
        datas = [b"%d" % number * 40 for number in range(2)]   # 5 + 40 + 40 fit; each held first
        outcomes = self.uploads_in_one_batch(store, [
            functools.partial(store.put, "repo", io.BytesIO(data), length=40) for data in datas])
        self.assertEqual(outcomes, [(sha256(data), 40) for data in datas])
        self.assertEqual(store.usage(), (3, 85))
        with self.assertRaises(storage.InsufficientStorage):   # and nothing is held any more
            store.put("repo", io.BytesIO(b"x"), length=1)
        self.assertEqual(store._quota._held, 0)   # noqa: SLF001

    def test_closing_commits_the_uploads_queued_and_in_the_pipeline(self):
        in_first_sync, may_end = threading.Event(), threading.Event()

        def sync_filesystem(fd):
            in_first_sync.set()
            may_end.wait(10)

        commit = storage.GroupCommit(temporary_directory(self), sync_filesystem,
                                     lambda uploads: None, lambda uploads: None)
        uploads = [storage._Upload("r", "o%d" % number, 1, storage._Hold()) for number in range(4)]
        committing = [threading.Thread(target=commit.commit, args=(upload,)) for upload in uploads]
        committing[0].start()   # in the pipeline: its round's sync is held
        self.assertTrue(in_first_sync.wait(10))
        for thread in committing[1:]:   # queued behind it
            thread.start()
        wait_until(lambda: len(commit._queued) == 3)   # noqa: SLF001
        closing = threading.Thread(target=commit.close)
        closing.start()
        may_end.set()
        for thread in committing + [closing]:
            thread.join(10)
            self.assertFalse(thread.is_alive())
        self.assertEqual([upload.error for upload in uploads], [None] * 4)
        with self.assertRaises(storage.StoreUnavailable):
            commit.commit(storage._Upload("r", "late", 1, storage._Hold()))

    def test_an_upload_whose_rename_fails_is_not_counted(self):
        root = temporary_directory(self)
        doomed = b"its file goes missing"

        def sync_filesystem(fd):   # after the write, before the rename: the file is taken away
            for directory, _, names in os.walk(os.path.join(root, "@tmp")):
                for name in names:
                    path = os.path.join(directory, name)
                    if os.path.getsize(path) == len(doomed):
                        os.remove(path)

        store = open_disk_store(self, root, sync_filesystem=sync_filesystem)
        with self.assertRaises(FileNotFoundError):
            store.put("repo", io.BytesIO(doomed))
        self.assertEqual(store.usage(), (0, 0))
        self.assertEqual(store.put("repo", io.BytesIO(b"kept")), (sha256(b"kept"), 4))
        self.assertEqual(store.usage(), (1, 4))
        self.assertEqual(open_disk_store(self, root).usage(), (1, 4))   # the ledger, read again

    def test_uploads_in_one_batch_never_overshoot_the_quota_together(self):
        store = open_disk_store(self, temporary_directory(self), max_total_size=30,
                                sync_filesystem=os.fsync)
        datas = [b"%d" % number * 10 for number in range(4)]   # 10 bytes each; room for 2 more
        outcomes = self.uploads_in_one_batch(store, [
            functools.partial(store.put, "repo", io.BytesIO(data)) for data in datas])
        stored = [outcome for outcome in outcomes if not isinstance(outcome, Exception)]
        self.assertEqual(len(stored), 2, outcomes)
        self.assertTrue(all(isinstance(outcome, storage.InsufficientStorage)
                            for outcome in outcomes if outcome not in stored), outcomes)
        self.assertEqual(store.usage(), (3, 5 + 20))
        self.assertEqual(sorted(oid for oid, _ in store.list_objects("repo")),
                         sorted([sha256(b"first")] + [oid for oid, _ in stored]))


if __name__ == "__main__":
    unittest.main()
