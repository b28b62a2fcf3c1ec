"""Content-addressed object stores, keyed by repository and SHA-256 object id.

A store knows nothing about HTTP. It takes a readable binary *source* (anything
with ``read()`` returning every remaining byte and ``readinto(buffer)``
returning how many bytes it wrote, 0 at the end), names what it reads by the
lowercase hex SHA-256 of its bytes (the *oid*), and keeps one copy per
repository. Problems are raised as ``StoreError`` subclasses; the caller
decides what they mean to its own clients.

Every store offers the same three calls:

``put(repository, source, expected_oid=None) -> (oid, size)``
``open(repository, oid) -> StoredObject``
``delete(repository, oid)``
"""

import hashlib
import io
import re
import threading

OID_PATTERN = re.compile(r"[0-9a-fA-F]{64}")
REPOSITORY_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,100}")


class StoreError(Exception):
    """A request the store cannot carry out; the message says why."""


class InvalidRepository(StoreError):
    """The repository name is not 1-100 of ``A-Z a-z 0-9 . _ -`` (nor ``.``/``..``)."""


class InvalidObjectId(StoreError):
    """An expected oid given to ``put`` is not 64 hex digits."""


class ObjectNotFound(StoreError):
    """The repository holds no object with that oid."""


class DigestMismatch(StoreError):
    """The uploaded bytes do not hash to the oid the client announced."""


def check_repository(name):
    """Return ``name`` if it is a valid repository name, else raise InvalidRepository.

    Names are validated before any lookup or path is built from them, so a
    name can never address anything outside its own repository.
    """
    if not REPOSITORY_PATTERN.fullmatch(name) or name in (".", ".."):
        raise InvalidRepository(
            "invalid repository name %r: use 1-100 characters of A-Z a-z 0-9 . _ -" % name[:120])
    return name


def canonical_oid(oid):
    """Return ``oid`` in lowercase if it is 64 hex digits, else None."""
    return oid.lower() if OID_PATTERN.fullmatch(oid) else None


def check_expected_oid(oid):
    """Return the canonical form of an oid a client announced, or raise InvalidObjectId."""
    canonical = canonical_oid(oid)
    if canonical is None:
        raise InvalidObjectId("invalid object id %r: expected 64 hex digits" % oid[:80])
    return canonical


def check_digest(oid, expected_oid):
    """Raise DigestMismatch unless ``expected_oid`` is None or equals ``oid``."""
    if expected_oid is not None and oid != expected_oid:
        raise DigestMismatch(
            "content hashes to %s, not to the object id %s in the request" % (oid, expected_oid))


class StoredObject:
    """An open stored object: ``file`` is a binary file positioned at 0 that
    holds exactly ``size`` bytes. Close it (or use ``with``) when done."""

    def __init__(self, file, size):
        self.file = file
        self.size = size

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class MemoryStore:
    """Objects held in a dict in this process; gone when it exits.

    Guarantees:
    - ``put`` hashes outside the lock and holds the lock only to change the
      dict, so uploads proceed in parallel; an object becomes visible whole,
      in one dict assignment, or not at all.
    - Storing bytes a repository already holds keeps the first copy.
    - Objects are immutable ``bytes``: a reader that opened an object keeps
      reading the same bytes even if the object is deleted meanwhile.
    """

    def __init__(self):
        self._objects = {}  # (repository, oid) -> bytes
        self._lock = threading.Lock()

    def put(self, repository, source, expected_oid=None):
        """Read ``source`` to its end and store it in ``repository``.

        Returns ``(oid, size)``. If ``expected_oid`` is given, it is checked
        before anything is read, and bytes that hash to anything else raise
        DigestMismatch with nothing stored. An exception raised by ``source``
        propagates and stores nothing.
        """
        check_repository(repository)
        if expected_oid is not None:
            expected_oid = check_expected_oid(expected_oid)
        data = source.read()
        oid = hashlib.sha256(data).hexdigest()
        check_digest(oid, expected_oid)
        with self._lock:
            self._objects.setdefault((repository, oid), data)
        return oid, len(data)

    def open(self, repository, oid):
        """Return the object as a StoredObject, or raise ObjectNotFound."""
        check_repository(repository)
        with self._lock:
            data = self._objects.get((repository, canonical_oid(oid)))
        if data is None:
            raise ObjectNotFound("object %s not found in repository %s" % (oid[:80], repository))
        return StoredObject(io.BytesIO(data), len(data))  # BytesIO shares bytes: no copy

    def delete(self, repository, oid):
        """Remove the object, or raise ObjectNotFound if the repository lacks it."""
        check_repository(repository)
        with self._lock:
            data = self._objects.pop((repository, canonical_oid(oid)), None)
        if data is None:
            raise ObjectNotFound("object %s not found in repository %s" % (oid[:80], repository))
