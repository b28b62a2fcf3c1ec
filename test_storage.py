"""The store contract, proven against every store backend.

``StoreContract`` is a mixin: a backend's test case supplies ``make_store()``
and inherits every test, so each backend proves the same guarantees.
"""

import hashlib
import io
import threading
import unittest

import storage


def sha256(data):
    return hashlib.sha256(data).hexdigest()


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

        threads = [threading.Thread(target=f) for f in (writer, writer, reader, reader)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])


class MemoryStoreTest(StoreContract, unittest.TestCase):
    def make_store(self):
        return storage.MemoryStore()


if __name__ == "__main__":
    unittest.main()
