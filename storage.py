"""Content-addressed object stores, keyed by repository and SHA-256 object id.

Two backends: ``MemoryStore`` (a dict, the embedded default) and ``DiskStore``
(files under a directory, durable). A store knows nothing about HTTP. It takes a readable binary *source* (anything
with ``read()`` returning every remaining byte and ``readinto(buffer)``
returning how many bytes it wrote, 0 at the end), names what it reads by the
lowercase hex SHA-256 of its bytes (the *oid*), and keeps one copy per
repository. Problems are raised as ``StoreError`` subclasses; the caller
decides what they mean to its own clients.

Every store offers the same three calls:

``put(repository, source, expected_oid=None) -> (oid, size)``
``open(repository, oid) -> StoredObject``
``delete(repository, oid)``
``list_objects(repository, after=None, limit=1000) -> [(oid, size), ...]``
``usage() -> (objects, bytes)``
``close()``

Both take ``max_total_size``, a quota on the bytes stored: an upload that
would exceed it raises InsufficientStorage, except an upload of an object the
repository already holds, which adds nothing.

Run as a program, it checks a disk store: ``python storage.py verify DIR``.
"""

import contextlib
import errno
import hashlib
import heapq
import io
import os
import queue
import re
import shutil
import sys
import tempfile
import threading

try:
    import fcntl   # POSIX only; the in-memory store must import anywhere
except ImportError:
    fcntl = None
DISK_STORE_SUPPORTED = fcntl is not None

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


class InsufficientStorage(StoreError):
    """The disk (or the user's quota) is full; nothing was stored."""


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


def not_found(repository, oid):
    return ObjectNotFound("object %s not found in repository %s" % (oid[:80], repository))


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
    - The quota is checked and the object added in one step under the lock,
      so concurrent uploads cannot overshoot it together.
    """

    def __init__(self, max_total_size=None):
        self._repositories = {}  # repository -> {oid: bytes}
        self._objects = 0
        self._bytes = 0
        self._max_total_size = max_total_size
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
            objects = self._repositories.setdefault(repository, {})
            if oid not in objects:
                _check_quota(self._bytes, len(data), self._max_total_size)
                objects[oid] = data
                self._objects += 1
                self._bytes += len(data)
        return oid, len(data)

    def open(self, repository, oid):
        """Return the object as a StoredObject, or raise ObjectNotFound."""
        check_repository(repository)
        with self._lock:
            data = self._repositories.get(repository, {}).get(canonical_oid(oid))
        if data is None:
            raise not_found(repository, oid)
        return StoredObject(io.BytesIO(data), len(data))  # BytesIO shares bytes: no copy

    def close(self):
        """Nothing to release: the objects go with the process."""

    def delete(self, repository, oid):
        """Remove the object, or raise ObjectNotFound if the repository lacks it."""
        check_repository(repository)
        with self._lock:
            objects = self._repositories.get(repository, {})
            data = objects.pop(canonical_oid(oid), None)
            if data is not None:
                self._objects -= 1
                self._bytes -= len(data)
                if not objects:
                    del self._repositories[repository]
        if data is None:
            raise not_found(repository, oid)

    def usage(self):
        """``(objects, bytes)`` currently stored, all repositories together."""
        with self._lock:
            return self._objects, self._bytes

    def list_objects(self, repository, after=None, limit=1000):
        """Up to ``limit`` ``(oid, size)`` pairs of ``repository``, sorted by oid,
        starting after the oid ``after``; an unknown repository has none."""
        check_repository(repository)
        with self._lock:
            objects = self._repositories.get(repository, {})
            oids = heapq.nsmallest(limit, (oid for oid in objects if after is None or oid > after))
            return [(oid, len(objects[oid])) for oid in oids]


def _check_quota(used, size, limit):
    if limit is not None and used + size > limit:
        raise InsufficientStorage("storing %d more bytes would exceed the %d-byte quota "
                                  "(%d bytes in use)" % (size, limit, used))


def _fsync_dir(path):
    """Make the entries of directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def object_path(root, repository, oid):
    """Where an object lives on disk: ``root/<repository>/<oid[:2]>/<oid>``."""
    return os.path.join(root, repository, oid[:2], oid)


class DiskStore:
    """Objects as files under ``root``, laid out as ``root/<repository>/<oid[:2]>/<oid>``.

    Guarantees:
    - A returned ``put`` means durable: the bytes were fsynced in a temporary
      file, renamed into place with ``os.replace``, and the directory entry was
      fsynced, before ``put`` returns.
    - Never a partial object: bodies stream into a uniquely named temporary
      file in this process's own directory under ``root/@tmp`` (same
      filesystem, so the rename is atomic), hashed as they are written. A
      failed, cut-off or mismatched upload removes its temporary file. Every
      file named like an oid holds bytes that hash to that name, even after a
      crash at any moment.
    - Bounded memory: uploads are copied through at most four BLOCK_BYTES
      buffers (see ``_write``); downloads are open files, which the server
      streams with sendfile.
    - An open object keeps its bytes if it is deleted meanwhile (POSIX keeps
      an unlinked file alive while it is open).
    - Repositories are separate directories: the same bytes in two
      repositories are two files. Names are validated before any path is
      built, and ``@tmp`` and the quarantine's files use ``@``, which no
      repository name or oid can contain, so nothing escapes or collides.
    - Several processes may share one root: each writes its own temporary
      files and publishes them by an atomic rename, so no cross-process lock
      is needed. A process holds an exclusive ``flock`` on its temporary
      directory for its lifetime; start-up clean-up removes only directories
      whose lock it can take, that is, whose owner has exited. Start-ups take
      turns under a lock on ``@tmp``, so a directory is locked before any
      other process's clean-up can see it.
    - A full disk (ENOSPC, EDQUOT) raises InsufficientStorage after removing
      the temporary file; stored objects are untouched.
    - Directories are never removed on delete, so a delete cannot race a put
      that is about to rename into the same directory.
    - Usage (objects, bytes) is counted once at start by walking the tree and
      then kept by this process; the quota is checked and the object
      published in one step under a lock. Another process's changes to a
      shared root are seen at the next start, so with several processes the
      quota is enforced per process against that view.
    """

    BLOCK_BYTES = 1 << 20
    TEMPORARY_DIR = "@tmp"
    QUARANTINE_DIR = "quarantine"

    def __init__(self, root, max_total_size=None, *, sync_file=os.fsync,
                 sync_directory=_fsync_dir):
        """``sync_file(fd)`` and ``sync_directory(path)`` make a file's data and
        a directory's entries durable; tests pass recorders to check the order."""
        if not DISK_STORE_SUPPORTED:
            raise StoreError("the disk store needs fcntl.flock (POSIX: Linux, macOS, BSD)")
        self._sync_file = sync_file
        self._sync_directory = sync_directory
        self.root = os.path.abspath(root)
        self._max_total_size = max_total_size
        self._lock = threading.Lock()
        temporary_root = os.path.join(self.root, self.TEMPORARY_DIR)
        try:
            os.mkdir(self.root)   # not makedirs: a mistyped path must not create a tree
        except FileExistsError:
            pass
        os.makedirs(temporary_root, exist_ok=True)
        # Start-ups take turns (a lock on @tmp itself), so that no process's
        # clean-up can remove another's directory before it is locked.
        startup_fd = os.open(temporary_root, os.O_RDONLY)
        try:
            fcntl.flock(startup_fd, fcntl.LOCK_EX)
            self._remove_abandoned_temporary_dirs(temporary_root)
            self._temporary_dir = tempfile.mkdtemp(prefix="%d-" % os.getpid(), dir=temporary_root)
            self._lock_fd = os.open(self._temporary_dir, os.O_RDONLY)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(startup_fd)   # releases the start-up lock
        self._objects = self._bytes = 0
        for _, _, path in self.stored_objects():
            try:
                self._bytes += os.stat(path).st_size
            except FileNotFoundError:
                continue   # deleted meanwhile by another process on this root
            self._objects += 1

    def close(self):
        """Release this process's temporary directory."""
        if self._lock_fd is not None:
            shutil.rmtree(self._temporary_dir, ignore_errors=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    @staticmethod
    def _remove_abandoned_temporary_dirs(temporary_root):
        for entry in os.scandir(temporary_root):
            try:
                fd = os.open(entry.path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue   # its process is alive and may be writing there
            else:
                shutil.rmtree(entry.path, ignore_errors=True)
            finally:
                os.close(fd)

    def put(self, repository, source, expected_oid=None):
        """Stream ``source`` to disk and publish it in ``repository``.

        Returns ``(oid, size)`` once the object is durable. If
        ``expected_oid`` is given it is checked before anything is read, and
        content that hashes to anything else raises DigestMismatch with
        nothing stored. Any exception leaves no trace on disk.
        """
        check_repository(repository)
        if expected_oid is not None:
            expected_oid = check_expected_oid(expected_oid)
        with _disk_full_is_insufficient_storage():
            fd, temporary_path = tempfile.mkstemp(dir=self._temporary_dir)
            try:
                with open(fd, "wb", buffering=0) as file:
                    oid, size = self._write(source, file)
                    self._sync_file(file.fileno())
                check_digest(oid, expected_oid)
                final_path = object_path(self.root, repository, oid)
                self._make_parent_dirs(final_path)
                self._publish(temporary_path, final_path, size)
            except BaseException:
                _remove_quietly(temporary_path)
                raise
            self._sync_directory(os.path.dirname(final_path))
        return oid, size

    def _publish(self, temporary_path, final_path, size):
        """Rename the finished file into place, within the quota."""
        with self._lock:
            if os.path.exists(final_path):   # already stored: the rename changes nothing
                os.replace(temporary_path, final_path)
                return
            _check_quota(self._bytes, size, self._max_total_size)
            os.replace(temporary_path, final_path)
            self._objects += 1
            self._bytes += size

    def _write(self, source, file):
        """Copy ``source`` into ``file``, hashing as it goes; return ``(oid, size)``.

        A body that fits in one buffer is hashed and written here. A larger
        one goes through a pipeline: this thread reads and hashes block n+1
        while a _FileWriter thread writes block n (hashlib and file writes
        both release the GIL), so an upload costs about the slower of the
        two rather than their sum.
        """
        digest = hashlib.sha256()
        first = bytearray(self.BLOCK_BYTES)
        count = _fill(source, first)
        digest.update(memoryview(first)[:count])
        if count < len(first):
            _write_all(file, memoryview(first)[:count])
            return digest.hexdigest(), count
        size = count
        writer = _FileWriter(file, [bytearray(self.BLOCK_BYTES) for _ in range(3)])
        writer.submit(memoryview(first))
        try:
            while True:
                block = writer.next_free_buffer()
                count = _fill(source, block)   # whole blocks: tiny chunks cost no write each
                if not count:
                    break
                chunk = memoryview(block)[:count]
                digest.update(chunk)
                writer.submit(chunk)
                size += count
        finally:
            writer.finish()
        return digest.hexdigest(), size

    def _make_parent_dirs(self, path):
        """Create the object's directories, fsyncing each new entry's parent. A
        repository directory made here is removed again if its shard directory
        cannot be made (a full disk), so a failed upload leaves no empty repository."""
        shard_dir = os.path.dirname(path)
        if os.path.isdir(shard_dir):
            return
        repository_dir = os.path.dirname(shard_dir)
        try:
            os.mkdir(repository_dir)
        except FileExistsError:
            made_repository = False
        else:
            made_repository = True
        try:
            os.makedirs(shard_dir, exist_ok=True)
        except OSError:
            if made_repository:
                _remove_directory_quietly(repository_dir)
            raise
        self._sync_directory(repository_dir)
        self._sync_directory(self.root)

    def _path(self, repository, oid):
        """Where the object would be; ObjectNotFound if ``oid`` is no oid at all."""
        check_repository(repository)
        canonical = canonical_oid(oid)
        if canonical is None:
            raise not_found(repository, oid)
        return object_path(self.root, repository, canonical)

    def open(self, repository, oid):
        """Return the object as a StoredObject over an open file, or raise ObjectNotFound."""
        path = self._path(repository, oid)
        try:
            file = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise not_found(repository, oid) from None
        return StoredObject(file, os.fstat(file.fileno()).st_size)

    def delete(self, repository, oid):
        """Remove the object durably, or raise ObjectNotFound if the repository lacks it."""
        path = self._path(repository, oid)
        try:
            with self._lock:
                size = os.stat(path).st_size
                os.unlink(path)
                self._objects -= 1
                self._bytes -= size
        except FileNotFoundError:
            raise not_found(repository, oid) from None
        self._sync_directory(os.path.dirname(path))

    def usage(self):
        """``(objects, bytes)`` as this process counts them (see the class docstring)."""
        with self._lock:
            return self._objects, self._bytes

    def list_objects(self, repository, after=None, limit=1000):
        """Up to ``limit`` ``(oid, size)`` pairs of ``repository``, sorted by oid,
        starting after the oid ``after``. Reads one shard directory at a time,
        never the whole repository."""
        check_repository(repository)
        listed = []
        for oid, path in self._repository_objects(repository, after):
            if len(listed) == limit:
                break
            try:
                listed.append((oid, os.stat(path).st_size))
            except FileNotFoundError:
                continue   # deleted since the directory was read
        return listed

    def _repository_objects(self, repository, after=None):
        """Yield ``(oid, path)`` for the repository's objects in oid order, after ``after``."""
        repository_dir = os.path.join(self.root, repository)
        try:
            shards = sorted(os.listdir(repository_dir))
        except (FileNotFoundError, NotADirectoryError):
            return
        for shard in shards:
            shard_dir = os.path.join(repository_dir, shard)
            if len(shard) != 2 or (after and shard < after[:2]) or not os.path.isdir(shard_dir):
                continue
            for name in sorted(os.listdir(shard_dir)):
                if canonical_oid(name) == name and name[:2] == shard and (not after or name > after):
                    yield name, os.path.join(shard_dir, name)

    def stored_objects(self):
        """Yield ``(repository, oid, path)`` for every object file under the root."""
        for repository in sorted(os.listdir(self.root)):
            if REPOSITORY_PATTERN.fullmatch(repository) and repository not in (".", ".."):
                for oid, path in self._repository_objects(repository):
                    yield repository, oid, path

    def verify(self, report=print):
        """Re-hash every object; move each whose bytes do not match its name to
        ``root/quarantine/<repository>@<oid>``. Returns ``(checked, corrupt)``."""
        quarantine = os.path.join(self.root, self.QUARANTINE_DIR)
        checked = corrupt = 0
        for repository, oid, path in self.stored_objects():
            try:
                actual = _hash_file(path)
            except FileNotFoundError:
                continue   # deleted by a running server meanwhile
            checked += 1
            if actual != oid:
                corrupt += 1
                os.makedirs(quarantine, exist_ok=True)
                destination = os.path.join(quarantine, "%s@%s" % (repository, oid))
                os.replace(path, destination)
                report("corrupt: %s/%s moved to %s" % (repository, oid, destination))
        return checked, corrupt


class _BackgroundFlush(threading.Thread):
    """Runs fdatasync on a file whenever asked, on its own thread, so the disk
    writes back while the upload carries on and the final fsync has little
    left to do. Requests that arrive during a flush merge into the next one."""

    def __init__(self, fd):
        super().__init__(daemon=True)
        self._fd = fd
        self._wanted = threading.Event()
        self._stopping = False
        self.error = None
        self.start()

    def request(self):
        self._wanted.set()

    def stop(self):
        self._stopping = True
        self._wanted.set()
        self.join()

    def run(self):
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stopping:
                return
            try:
                _fdatasync(self._fd)
            except OSError as error:
                self.error = error
                return


class _FileWriter(threading.Thread):
    """Writes submitted buffers to a file on its own thread, in order, and
    hands each buffer back for reuse once written. Every FLUSH_BYTES it asks
    a _BackgroundFlush to fdatasync, without waiting for it. An error is
    kept and raised to the caller at its next call."""

    FLUSH_BYTES = 16 << 20

    def __init__(self, file, buffers):
        super().__init__(daemon=True)
        self._file = file
        self._written = queue.Queue()
        self._free = queue.Queue()
        for buffer in buffers:
            self._free.put(buffer)
        self._error = None
        self._flush = _BackgroundFlush(file.fileno())
        self.start()

    def submit(self, chunk):
        """Queue a memoryview for writing; the buffer under it belongs to the writer until
        ``next_free_buffer`` returns it."""
        self._raise_if_failed()
        self._written.put(chunk)

    def next_free_buffer(self):
        buffer = self._free.get()
        self._raise_if_failed()
        return buffer

    def finish(self):
        """Write what is queued, stop the threads, and raise an error if one had it."""
        self._written.put(None)
        self.join()
        self._flush.stop()
        self._error = self._error or self._flush.error
        self._raise_if_failed()

    def _raise_if_failed(self):
        if self._error is not None:
            raise self._error

    def run(self):
        unflushed = 0
        for chunk in iter(self._written.get, None):
            if self._error is None:
                try:
                    _write_all(self._file, chunk)
                except BaseException as error:
                    self._error = error
                unflushed += len(chunk)
                if unflushed >= self.FLUSH_BYTES:
                    self._flush.request()
                    unflushed = 0
            self._free.put(chunk.obj)


def _fill(source, buffer):
    """Read from ``source`` until ``buffer`` is full or the source ends; return the count."""
    view = memoryview(buffer)
    filled = 0
    while filled < len(buffer):
        count = source.readinto(view[filled:])
        if not count:
            break
        filled += count
    return filled


def _write_all(file, chunk):
    while chunk:
        chunk = chunk[file.write(chunk):]


_fdatasync = getattr(os, "fdatasync", os.fsync)   # macOS has no fdatasync


@contextlib.contextmanager
def _disk_full_is_insufficient_storage():
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise InsufficientStorage("not enough storage for the object: %s"
                                  % os.strerror(error.errno)) from error


def _hash_file(path):
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as file:
        block = bytearray(DiskStore.BLOCK_BYTES)
        view = memoryview(block)
        for count in iter(lambda: file.readinto(block), 0):
            digest.update(view[:count])
    return digest.hexdigest()


def _remove_directory_quietly(path):
    try:
        os.rmdir(path)
    except OSError:
        pass


def _remove_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def main(argv=None):
    """``python storage.py verify DIR``: exit 0 if every object is intact, 1 if not."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "verify":
        print("usage: python storage.py verify DIR\n\n"
              "Re-hash every object under DIR; move corrupt ones to DIR/quarantine/.",
              file=sys.stderr)
        return 2
    if not os.path.isdir(argv[1]):
        print("verify: %s is not a directory" % argv[1], file=sys.stderr)
        return 2
    store = DiskStore(argv[1])
    try:
        checked, corrupt = store.verify()
    finally:
        store.close()
    print("verified %d objects in %s: %d corrupt%s" % (
        checked, store.root, corrupt, " (moved to quarantine/)" if corrupt else ""))
    return 1 if corrupt else 0


if __name__ == "__main__":
    sys.exit(main())
