"""Git LFS: the Batch API, the verify callback and the File Locking API, as
JSON documents in and out; the application (server.py) does the HTTP.

What the git-lfs client expects is its project's own specification:
``docs/api/batch.md`` (operations, per-object errors, response errors),
``docs/api/basic-transfers.md`` (the upload, download and verify actions),
``docs/api/locking.md`` and ``docs/api/authentication.md``. The LFS objects of
repository R are the very objects of ``/data/R/...``: a batch answers with
actions on the plain API (the verified ``PUT /data/R/<oid>``, so a corrupted
upload is refused by the store), so there is one store and one namespace.

Locks are kept per repository, in memory (``MemoryLocks``) or, beside a disk
store, in ``DIR/@locks/<repository>.json``, replaced whole by an atomic and
durable rename, with every change made under an ``flock`` so that threads and
worker processes take turns (``DiskLocks``).
"""

import datetime
import json
import os
import secrets
import threading

import storage

try:
    import fcntl
except ImportError:   # no disk store there either
    fcntl = None

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
MEDIA_TYPE = "application/vnd.git-lfs+json"
MAX_BATCH_OBJECTS = 1000
MAX_DOCUMENT_BYTES = 1 << 20   # a batch of 1000 objects takes about 120 KB
DEFAULT_LOCK_LIMIT = 100
MAX_LOCK_LIMIT = 1000
MAX_LOCK_PATH = 1024
MAX_LOCKS = 10000   # per repository: each change rewrites the repository's locks


class LFSError(Exception):
    """An LFS error response: status, message, and other members of the body
    (the existing lock of a 409)."""

    def __init__(self, status, message, **members):
        super().__init__(message)
        self.status = status
        self.members = members

    def document(self):
        return {"message": str(self), **self.members}


class Links:
    """Where a batch's actions point: ``base`` is the service's URL as the
    client reaches it (no trailing slash); ``header`` the fields a transfer
    must carry (the client's own Authorization, when a token is required)."""

    def __init__(self, base, repository, header):
        self.base = base
        self.repository = repository
        self.header = header

    def action(self, path):
        action = {"href": self.base + path}
        if self.header:
            action["header"] = dict(self.header)
        return action

    def object(self, oid):
        return self.action("/data/%s/%s" % (self.repository, oid))

    def verify(self):
        return self.action("/lfs/%s/verify" % self.repository)


def batch(store, document, links, max_object_size):
    """The Batch API's answer to ``document``, for the repository of ``links``.

    For an upload, an object already stored gets no actions (the client then
    skips it), another an ``upload`` and a ``verify`` action; for a download,
    a stored object gets a ``download`` action, a missing one a per-object 404.
    A malformed object gets a per-object 422; a malformed request an LFSError."""
    if not isinstance(document, dict):
        raise LFSError(422, "a batch request is a JSON object")
    check_ref(document)
    operation = document.get("operation")
    if operation not in ("upload", "download"):
        raise LFSError(422, "operation must be \"upload\" or \"download\"")
    transfers = document.get("transfers")
    if transfers is not None and (not isinstance(transfers, list) or "basic" not in transfers):
        raise LFSError(422, "this server offers only the \"basic\" transfer adapter")
    if document.get("hash_algo") not in (None, "sha256"):
        raise LFSError(409, "this server names objects by \"sha256\" only")
    objects = document.get("objects")
    if not isinstance(objects, list):
        raise LFSError(422, "objects must be a list")
    if len(objects) > MAX_BATCH_OBJECTS:
        raise LFSError(413, "at most %d objects in one batch request" % MAX_BATCH_OBJECTS)
    answers = [_batch_object(store, operation, item, links, max_object_size) for item in objects]
    return {"transfer": "basic", "objects": answers, "hash_algo": "sha256"}


def _batch_object(store, operation, item, links, max_object_size):
    oid, size = (item.get("oid"), item.get("size")) if isinstance(item, dict) else (None, None)
    problem = _object_problem(oid, size)
    if problem:
        return _object_error(oid, size, 422, problem)
    size = whole_number(size)
    stored_size = _stored_size(store, links.repository, oid.lower())   # answered as asked
    if operation == "download":
        if stored_size is None:
            return _object_error(oid, size, 404, "object does not exist")
        return {"oid": oid, "size": stored_size, "authenticated": True,
                "actions": {"download": links.object(oid.lower())}}
    if stored_size is not None:
        if stored_size != size:
            return _object_error(oid, size, 422, "object is stored with size %d" % stored_size)
        return {"oid": oid, "size": size}
    if size > max_object_size:
        return _object_error(oid, size, 413, "object larger than the %d-byte limit"
                             % max_object_size)
    return {"oid": oid, "size": size, "authenticated": True,
            "actions": {"upload": links.object(oid.lower()), "verify": links.verify()}}


def verify(store, repository, document):
    """The verify callback after an upload: an empty answer if the object is
    stored with the size the client sent; else LFSError 404 or 422."""
    oid, size = (document.get("oid"), document.get("size")) if isinstance(document, dict) else (
        None, None)
    problem = _object_problem(oid, size)
    if problem:
        raise LFSError(422, problem)
    size = whole_number(size)
    stored_size = _stored_size(store, repository, oid.lower())
    if stored_size is None:
        raise LFSError(404, "object %s is not stored" % oid.lower())
    if stored_size != size:
        raise LFSError(422, "object %s is stored with size %d, not %d"
                       % (oid.lower(), stored_size, size))
    return {}


def _object_problem(oid, size):
    """What is wrong with an object's oid and size, or None."""
    if not isinstance(oid, str) or storage.canonical_oid(oid) is None:
        return "oid must be a SHA-256: 64 hex digits"
    if whole_number(size) is None or size < 0:
        return "size must be a whole number of bytes, at least 0"
    return None


def whole_number(value):
    """``value`` as an int if JSON gave a whole number (``5`` or ``5.0``, as
    JSON Schema's "integer" allows), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value)


def check_ref(document):
    """LFSError 422 unless the document's optional ``ref`` is null or an
    object whose optional ``name`` is a string."""
    ref = document.get("ref") if isinstance(document, dict) else None
    if not isinstance(ref, (dict, type(None))) or (
            isinstance(ref, dict) and not isinstance(ref.get("name", ""), str)):
        raise LFSError(422, "ref must be an object with the name of a ref")


def _object_error(oid, size, code, message):
    """A per-object error; the oid and size as given when they are a string
    and a whole number (anything else is not echoed)."""
    return {"oid": oid if isinstance(oid, str) else "",
            "size": size if isinstance(size, int) and not isinstance(size, bool) else 0,
            "error": {"code": code, "message": message}}


def _stored_size(store, repository, oid):
    try:
        with store.open(repository, oid) as stored:
            return stored.size
    except storage.ObjectNotFound:
        return None


# Locks -----------------------------------------------------------------------------

def lock_path(document):
    """The path a create-lock request names; LFSError 422 unless it is one."""
    check_ref(document)
    path = document.get("path") if isinstance(document, dict) else None
    if (not isinstance(path, str) or not path or len(path) > MAX_LOCK_PATH or "\0" in path
            or not _utf8(path)):
        raise LFSError(422, "path must be a file's path in the repository, up to %d characters"
                       % MAX_LOCK_PATH)
    return path


def _utf8(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate from a JSON escape
        return False
    return True


def lock_limit(value):
    """A page size from a query value or a JSON member (None: the default)."""
    if value is None:
        return DEFAULT_LOCK_LIMIT
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 6:
        value = int(value)
    value = whole_number(value)
    if value is None or not 1 <= value <= MAX_LOCK_LIMIT:
        raise LFSError(422, "limit must be a whole number from 1 to %d" % MAX_LOCK_LIMIT)
    return value


class Locks:
    """The File Locking API's locks, per repository, at most one per path.
    Subclasses keep them: ``_read(repository)`` gives ``{path: lock}``, and
    ``_change(repository, change)`` runs ``change`` on that dict alone
    (no other change between its read and its write) and keeps what it left."""

    def create(self, repository, path, owner):
        """``(lock, created)``: a new lock of ``path`` for ``owner``, or the
        lock that already holds it and False."""
        def change(locks):
            if path in locks:
                return locks[path], False
            if len(locks) >= MAX_LOCKS:
                raise LFSError(507, "repository %s holds %d locks, the most it may" % (
                    repository, MAX_LOCKS))
            locks[path] = {"id": secrets.token_hex(16), "path": path, "owner": {"name": owner},
                           "locked_at": datetime.datetime.now(datetime.timezone.utc).strftime(
                               "%Y-%m-%dT%H:%M:%SZ")}
            return locks[path], True
        return self._change(repository, change)

    def find(self, repository, path=None, lock_id=None, cursor=None, limit=DEFAULT_LOCK_LIMIT):
        """``(locks, next_cursor)``: a page of the repository's locks in path
        order, those of ``path`` or with ``lock_id`` only when given, from the
        path ``cursor`` on; ``next_cursor`` is None on the last page."""
        locks = [lock for _, lock in sorted(self._read(repository).items())
                 if (path is None or lock["path"] == path)
                 and (lock_id is None or lock["id"] == lock_id)
                 and (cursor is None or lock["path"] >= cursor)]
        return locks[:limit], locks[limit]["path"] if len(locks) > limit else None

    def unlock(self, repository, lock_id, owner, force):
        """Remove the lock ``lock_id`` and return it; LFSError 404 if there is
        none, 403 if it is someone else's and ``force`` is not set."""
        def change(locks):
            for path, lock in locks.items():
                if lock["id"] == lock_id:
                    if lock["owner"]["name"] != owner and not force:
                        raise LFSError(403, "lock %s belongs to %s; unlock it with force"
                                       % (lock_id, lock["owner"]["name"]))
                    return locks.pop(path)
            raise LFSError(404, "no lock %s" % lock_id)
        return self._change(repository, change)


class MemoryLocks(Locks):
    """Locks in this process; gone when it exits."""

    def __init__(self):
        self._repositories = {}
        self._lock = threading.Lock()

    def _read(self, repository):
        storage.check_repository(repository)
        with self._lock:
            return dict(self._repositories.get(repository, {}))

    def _change(self, repository, change):
        storage.check_repository(repository)
        with self._lock:
            return change(self._repositories.setdefault(repository, {}))


class DiskLocks(Locks):
    """Locks in ``root/@locks/<repository>.json``, durable: each change writes
    the repository's whole file anew (fsynced) and renames it into place (the
    directory fsynced), so a reader sees the locks before or after it, never
    half. Changes to a repository's locks take turns under an exclusive
    ``flock`` on ``root/@locks/<repository>.flock``: two processes on one root
    create one lock per path. No symlink is followed; a full or read-only disk
    raises the store's errors (507, 503), and leaves no temporary file."""

    DIRECTORY = "@locks"

    def __init__(self, root):
        self._directory = os.path.join(root, self.DIRECTORY)
        try:
            os.mkdir(self._directory)
        except FileExistsError:
            pass

    def _path(self, repository, suffix):
        storage.check_repository(repository)
        return os.path.join(self._directory, repository + suffix)

    def _read(self, repository):
        try:
            fd = os.open(self._path(repository, ".json"), os.O_RDONLY | _NOFOLLOW)
        except FileNotFoundError:
            return {}
        with open(fd, "rb") as file:
            return json.loads(file.read())

    def _change(self, repository, change):
        with storage.write_errors_as_store_errors():
            turn = os.open(self._path(repository, ".flock"),
                           os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
            try:
                fcntl.flock(turn, fcntl.LOCK_EX)   # released when it is closed
                locks = self._read(repository)
                before = dict(locks)
                result = change(locks)
                if locks != before:
                    self._write(repository, locks)
                return result
            finally:
                os.close(turn)

    def _write(self, repository, locks):
        temporary = self._path(repository, ".json.@tmp")   # one per repository: changes take turns
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, 0o644)
            with open(fd, "wb") as file:
                file.write(json.dumps(locks).encode())
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self._path(repository, ".json"))
        except BaseException:
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass
            raise
        directory = os.open(self._directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def open_locks(store):
    """The locks that go with ``store``: on disk beside a disk store, in
    memory beside the memory store; None for a store that instances share
    (the S3 store), where locks in one instance would not bind another."""
    if isinstance(store, storage.DiskStore):
        return DiskLocks(store.root)
    if isinstance(store, storage.MemoryStore):
        return MemoryLocks()
    return None
