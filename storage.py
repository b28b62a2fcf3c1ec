"""Content-addressed object stores, keyed by repository and SHA-256 object id.

Two backends: ``MemoryStore`` (a dict, the embedded default) and ``DiskStore``
(files under a directory, durable); ``s3.S3Store`` keeps the same contract. A store knows nothing about HTTP. It takes a readable binary *source* (anything
with ``read()`` returning every remaining byte and ``readinto(buffer)``
returning how many bytes it wrote, 0 at the end), names what it reads by the
lowercase hex SHA-256 of its bytes (the *oid*), and keeps one copy per
repository. Problems are raised as ``StoreError`` subclasses; the caller
decides what they mean to its own clients.

Every store offers the same calls:

``put(repository, source, expected_oid=None) -> (oid, size)``
``open(repository, oid, whole=False) -> StoredObject``
``delete(repository, oid)``
``list_objects(repository, after=None, limit=1000) -> [(oid, size), ...]``
``usage() -> (objects, bytes)``
``writable() -> bool``
``quarantine(repository, oid, file)``
``close()``

``open``'s ``whole`` says that the caller means to read the whole object from
its start: a store whose reads are calls to an engine may make that read at
once, and learn the size from it (the S3 store: one GetObject instead of a
HeadObject, then a GetObject); the others need no hint.

Both take ``max_total_size``, a quota on the bytes stored: an upload that
would exceed it raises InsufficientStorage, before its body is read when
``put`` is told its ``length``, as soon as it passes the room left when not
(see ``_Quota``). Only an upload with an ``expected_oid`` the repository
already holds needs no room.

Run as a program, it checks a disk store: ``python storage.py verify DIR``.
"""

import array
import bisect
import collections
import contextlib
import copy
import errno
import functools
import hashlib
import io
import itertools
import os
import platform
import queue
import re
import shutil
import stat
import sys
import tempfile
import threading
import weakref

import checksums

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


class StoreNotWritable(StoreError):
    """The store cannot be written now (a read-only filesystem); nothing changed."""


class StoreBusy(StoreError):
    """The process has no file descriptor left for the store now; nothing changed."""


class StoreUnavailable(StoreError):
    """The storage behind the store (an S3 engine) cannot be reached now, or
    refused the call; a retry later may succeed."""


class ForeignEntry(StoreError):
    """Where the disk store needs a directory of its own, the data directory holds
    something else (a symlink, a file, a special file), which it will not write through."""


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
    holds exactly ``size`` bytes. ``may_change_at_rest`` says whether its
    bytes could have been damaged since they were stored (a file can be; bytes
    in memory cannot), so a reader should check them: against ``checksums``
    (the checksums.BlockChecksums recorded when it was written) when there
    are any, else against the oid. A store may give, instead of the
    checksums, a function that fetches them; it is called the first time they
    are asked for (a HEAD never asks, nor does the read of a small object,
    which is checked whole). A reader that has read the whole object and
    found it hash to its oid says so with ``checked(data)``: a store may
    keep it (``on_checked``). Close it (or use ``with``) when done."""

    def __init__(self, file, size, may_change_at_rest=False, checksums=None, on_checked=None):
        self.file = file
        self.size = size
        self.may_change_at_rest = may_change_at_rest
        self._checksums = checksums
        self._on_checked = on_checked

    def checked(self, data):
        """``data``, the whole object, was found to hash to its oid."""
        if self._on_checked is not None:
            self._on_checked(data)

    @property
    def checksums(self):
        if callable(self._checksums):
            self._checksums = self._checksums()
        return self._checksums

    @checksums.setter
    def checksums(self, value):
        self._checksums = value

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
    - A listing page costs O(limit + log n): each repository keeps its oids
      in order as well (``bisect``), with their sizes, beside the dict that
      finds them.
    """

    def __init__(self, max_total_size=None):
        self._repositories = {}  # repository -> {oid: bytes}
        # repository -> (its oids, sorted; their sizes, in the same order). The
        # sizes could be had from the dict, but a page of 1,000 from 500,000
        # objects then took 3x as long as from 10,000: a dict probe and a
        # bytes header each, scattered over memory. In an array they are one run.
        self._ordered = {}
        self._objects = 0
        self._bytes = 0
        self._quota = _Quota(max_total_size)
        self._lock = threading.Lock()

    def put(self, repository, source, expected_oid=None, length=None):
        """Read ``source`` to its end and store it in ``repository``.

        Returns ``(oid, size)``. If ``expected_oid`` is given, it is checked
        before anything is read, and bytes that hash to anything else raise
        DigestMismatch with nothing stored. ``length``, when the caller knows
        it, is checked against the quota before anything is read (see
        ``_Quota``). An exception raised by ``source`` propagates and stores nothing.
        """
        check_repository(repository)
        if expected_oid is not None:
            expected_oid = check_expected_oid(expected_oid)
        with self._lock:
            stored = expected_oid in self._repositories.get(repository, {})
            hold = _Hold() if stored else self._quota.hold(self._bytes, length)
            room = None if stored or length is not None else self._quota.room(self._bytes)
        try:
            data = (source if room is None else _WithinRoom(source, room)).read()
            oid = hashlib.sha256(data).hexdigest()
            check_digest(oid, expected_oid)
            with self._lock:
                objects = self._repositories.setdefault(repository, {})
                if oid not in objects:
                    self._quota.check(self._bytes, len(data), hold)
                    self._quota.release(hold)
                    objects[oid] = data
                    oids, sizes = self._ordered.setdefault(repository, ([], array.array("Q")))
                    index = bisect.bisect_left(oids, oid)
                    oids.insert(index, oid)
                    sizes.insert(index, len(data))
                    self._objects += 1
                    self._bytes += len(data)
        finally:
            with self._lock:
                self._quota.release(hold)
        return oid, len(data)

    def open(self, repository, oid, whole=False):
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
                oids, sizes = self._ordered[repository]
                index = bisect.bisect_left(oids, canonical_oid(oid))
                del oids[index], sizes[index]
                if not objects:
                    del self._repositories[repository], self._ordered[repository]
        if data is None:
            raise not_found(repository, oid)

    def usage(self):
        """``(objects, bytes)`` currently stored, all repositories together."""
        with self._lock:
            return self._objects, self._bytes

    def writable(self):
        """Always: memory can always be written (within the quota)."""
        return True

    def quarantine(self, repository, oid, file):
        """Take a damaged object out of service (bytes in memory cannot be
        damaged at rest, so this only deletes)."""
        self.delete(repository, oid)

    def list_objects(self, repository, after=None, limit=1000):
        """Up to ``limit`` ``(oid, size)`` pairs of ``repository``, sorted by oid,
        starting after the oid ``after``; an unknown repository has none."""
        check_repository(repository)
        with self._lock:
            oids, sizes = self._ordered.get(repository, ((), ()))
            first = 0 if after is None else bisect.bisect_right(oids, after)
            return list(zip(oids[first:first + limit], sizes[first:first + limit]))


class _Quota:
    """A quota on the bytes stored (None: no quota), with room held for the
    uploads in flight that declared their length, so that concurrent uploads
    cannot overshoot it together and an upload that cannot fit is refused
    before its body is read. Its methods are called under the store's lock,
    with ``used``, the bytes stored now."""

    def __init__(self, limit):
        self.limit = limit
        self._held = 0   # bytes promised to uploads in flight

    def hold(self, used, length):
        """Promise ``length`` bytes (None: unknown) to an upload; return the
        _Hold, to pass to ``check`` and ``release``."""
        if self.limit is None or length is None:
            return _Hold()
        self._refuse_beyond(used + self._held, length)
        self._held += length
        return _Hold(length)

    def room(self, used):
        """The most bytes an upload of unknown length may have now (None: any)."""
        return None if self.limit is None else max(0, self.limit - used - self._held)

    def check(self, used, size, hold):
        """Before publishing a new object of ``size`` for an upload that holds ``hold``."""
        if self.limit is not None:
            self._refuse_beyond(used + self._held - hold.bytes, size)

    def release(self, hold):
        """Give back what ``hold`` holds: once its object is counted in ``used``
        (so that it is not counted twice meanwhile), or when the upload ends."""
        self._held -= hold.bytes
        hold.bytes = 0

    def _refuse_beyond(self, taken, size):
        if taken + size > self.limit:
            raise InsufficientStorage(
                "storing %d more bytes would exceed the %d-byte quota (%d bytes stored or "
                "promised to uploads in progress)" % (size, self.limit, taken))


class _Hold:
    """Bytes of the quota held for one upload (0: none)."""

    __slots__ = ("bytes",)

    def __init__(self, count=0):
        self.bytes = count


class _WithinRoom:
    """A source that raises InsufficientStorage as soon as it has given more
    than ``room`` bytes: an upload of unknown length stops at the quota's line,
    not after its whole body arrived."""

    def __init__(self, source, room):
        self._source = source
        self._room = room
        self._given = 0

    def readinto(self, buffer):
        count = self._source.readinto(memoryview(buffer)[:self._room + 1 - self._given])
        self._given += count
        if self._given > self._room:
            raise InsufficientStorage("the upload passed the room left under the quota "
                                      "(%d bytes)" % self._room)
        return count

    def read(self):
        return read_to_end(self)


def _load_syncfs():
    """syncfs(2) as a function of a descriptor that raises OSError, or None:
    not Linux, or a kernel before 5.8, whose syncfs did not report write
    errors (a durability promise needs them)."""
    match = re.match(r"(\d+)\.(\d+)", os.uname().release) if sys.platform == "linux" else None
    if match is None or tuple(map(int, match.groups())) < (5, 8):
        return None
    try:
        import ctypes   # only here: the rest of the store works without it
        function = ctypes.CDLL(None, use_errno=True).syncfs   # releases the GIL while it runs
    except (ImportError, OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]

    def syncfs(fd):
        if function(fd) != 0:
            number = ctypes.get_errno()
            raise OSError(number, os.strerror(number))
    return syncfs


SYNCFS = _load_syncfs()

_SYS_OPENAT2 = 437
# Machines on which Linux numbers its newer system calls from one shared table
# (openat2 is 437); MIPS and Alpha number them otherwise.
SHARED_SYSCALL_TABLE_MACHINES = frozenset((
    "x86_64", "aarch64", "i386", "i686", "armv7l", "armv8l", "ppc64", "ppc64le", "s390x",
    "riscv64", "loongarch64"))
_AT_FDCWD = -100
_RESOLVE_NO_SYMLINKS = 0x04   # no symlink followed anywhere on the path (nor /proc's magic links)


def _load_openat2():
    """openat2(2) with RESOLVE_NO_SYMLINKS, as a function ``(dir_fd, path,
    flags)`` that returns a descriptor or raises OSError; or
    None: not Linux 5.6 or later on a machine whose system call number is
    known, or a sandbox refuses the call. One call opens
    ``repository/shard/oid`` with no symlink followed on the way, where
    walking the directories takes five (each a hand-over of the GIL: see
    DiskStore.open).

    It lets go of the GIL, as the os module's calls do: a form that kept it
    (ctypes.PyDLL, with RESOLVE_CACHED so as never to wait) was measured no
    faster, and it lengthened the other connections' waits (README, "Round
    two", "Fair turns")."""
    if sys.platform != "linux" or platform.machine() not in SHARED_SYSCALL_TABLE_MACHINES:
        return None
    try:
        import ctypes   # only here: the rest of the store works without it
        syscall = ctypes.CDLL(None, use_errno=True).syscall   # releases the GIL while it runs
    except (ImportError, OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long

    class OpenHow(ctypes.Structure):   # struct open_how
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                    ("resolve", ctypes.c_uint64)]

    hows = {}   # flags -> open_how, made once: the kernel only reads it

    def openat2(dir_fd, path, flags):
        how = hows.get(flags)
        if how is None:
            how = hows[flags] = OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_NO_SYMLINKS)
        fd = syscall(
            ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(os.fsencode(path)),
            ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd < 0:
            number = ctypes.get_errno()
            raise OSError(number, os.strerror(number), path)
        return fd

    try:
        os.close(openat2(_AT_FDCWD, "/", os.O_RDONLY | os.O_DIRECTORY))
    except OSError:   # ENOSYS before Linux 5.6; EPERM from a seccomp filter
        return None
    return openat2


_PROBED = object()   # DiskStore's default openat2: what openat2_function() finds


@functools.lru_cache(maxsize=None)
def openat2_function():
    """``_load_openat2()``, probed once, when a disk store first needs it."""
    return _load_openat2()

# Filesystems whose syncfs makes data durable as fsync does. Not every one's
# does: FUSE's returns at once unless the daemon implements it, CIFS has none.
SYNCFS_DURABLE = ("ext3", "ext4", "xfs", "btrfs", "overlay")
# Where the disk store makes uploads durable by group commit unless told not to:
# not on overlayfs, whose syncfs reports the upper filesystem's write errors
# only in kernels newer than 5.8 (on request only, there).
GROUP_COMMIT_BY_DEFAULT = ("ext3", "ext4", "xfs", "btrfs")


def syncfs_durable(data_dir):
    """``(durable, kind)``: whether a syncfs makes data written under
    ``data_dir`` (or, before it is made, its parent) durable as an fsync would
    (Linux 5.8+, and a filesystem in SYNCFS_DURABLE), and the filesystem's type."""
    try:
        kind = filesystem_type(data_dir if os.path.isdir(data_dir)
                               else os.path.dirname(os.path.abspath(data_dir)))
    except OSError:
        kind = None
    return SYNCFS is not None and kind in SYNCFS_DURABLE, kind


def filesystem_type(path):
    """The type of the filesystem holding ``path``, from /proc/self/mountinfo
    (Linux), or None if it cannot be told."""
    device = os.stat(path).st_dev
    wanted = "%d:%d" % (os.major(device), os.minor(device))
    try:
        with open("/proc/self/mountinfo") as mounts:
            for line in mounts:
                if line.split()[2] == wanted:
                    return line.split(" - ", 1)[1].split()[0]
    except OSError:
        pass
    return None


class GroupCommit:
    """Publishes uploads in batches made durable by syncs of the whole
    filesystem that each batch shares (group commit).

    ``commit(upload)`` queues an upload and returns once it is published and
    durable. This object's own thread takes the uploads queued meanwhile as a
    batch and runs a two-stage pipeline, one sync per round::

        write(batch n); publish(batch n-1); sync(); acknowledge batch n-1

    (``write`` and ``publish`` are the store's: write what was handed over in
    memory into temporary files, and rename into place.) So no upload returns
    before a sync that began once its bytes were written and ended before its
    rename, and another that began after its rename; and each sync serves two
    batches. A sync is a ``sync_filesystem(fd)`` (syncfs: one flush of the
    disk's cache for all the uploads in a round, instead of two fsyncs each).

    The connection threads' part of a small upload is then one wait: the
    batch's file-system calls are made by one thread, one after the other,
    instead of by each connection thread, each call handing the GIL over to
    the others and queueing to get it back (measured in the README).

    A failed sync fails every later one too (fail-stop): syncfs reports a
    write error once, and the data it lost is not written again, so no later
    sync could vouch for the writes made before it."""

    def __init__(self, path, sync_filesystem, write, publish):
        """``path``: a directory on the filesystem to sync. ``write(uploads)``
        and ``publish(uploads)`` keep an upload's own failure in its ``error``;
        what they raise fails every upload in the round."""
        self._path = path
        self._sync_filesystem = sync_filesystem
        self._write = write
        self._publish = publish
        self._failure = None   # kept across a fork: the child's writes so far are the parent's
        self._fd = None
        self._start()
        me = weakref.ref(self)   # a hook cannot be removed: it must not keep this alive
        os.register_at_fork(after_in_child=lambda: me() and me()._fd is not None and me()._start())

    def _start(self):
        """An open file of this process's own (syncfs reports a write error
        once per open file: one shared with a forked process could give the
        error to it and 0 to us), and no committer thread yet (a parent's
        thread is not in a forked child): the first upload starts one."""
        if self._fd is not None:
            os.close(self._fd)   # the parent's open file: this process's copy only
        self._fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._arrived = threading.Condition()
        self._queued = []
        self._committer = None
        self._closing = False

    def close(self):
        """Commit what is queued, then stop."""
        with self._arrived:
            self._closing = True
            self._arrived.notify()
            committer = self._committer
        if committer is not None:
            committer.join()
        os.close(self._fd)
        self._fd = None

    def commit(self, upload):
        """Queue ``upload`` (see ``_Upload``); return once it is published and
        durable, or raise what committing it raised for it."""
        upload.committed = threading.Lock()
        upload.committed.acquire()   # released by the committer: the cheapest wait there is
        with self._arrived:
            if self._closing:
                raise StoreUnavailable("the store is closed")
            if self._committer is None:   # set once started: a failed start is tried again
                committer = threading.Thread(target=self._run, name="group commit", daemon=True)
                committer.start()
                self._committer = committer
            self._queued.append(upload)
            self._arrived.notify()
        upload.committed.acquire()
        if upload.error is not None:
            raise upload.error

    def _sync(self):
        if self._failure is not None:
            raise OSError(self._failure.errno, "an earlier sync of the disk failed (%s): "
                          "writes since may be lost; restart once the disk is checked"
                          % self._failure.strerror)
        try:
            self._sync_filesystem(self._fd)
        except OSError as error:
            self._failure = error
            raise

    def _run(self):
        synced = []   # uploads whose bytes the last sync made durable: to be published
        while True:
            with self._arrived:
                while not (self._queued or synced or self._closing):
                    self._arrived.wait()
                if not (self._queued or synced):
                    return
                written, self._queued = self._queued, []
            try:
                self._write(written)
                self._publish([upload for upload in synced if upload.error is None])
                self._sync()
            except BaseException as error:   # for the whole round; the thread carries on
                for upload in synced + written:
                    upload.error = upload.error or _of_its_own(error)
            for upload in synced + [upload for upload in written if upload.error is not None]:
                upload.committed.release()
            synced = [upload for upload in written if upload.error is None]


def _of_its_own(error):
    """For one of the threads that will raise ``error``: a copy of it, caused
    by it, if it is an OSError or a StoreError (what a round fails with),
    whose copies keep their type, arguments and attributes; anything else as
    it is. One exception raised in several threads at once gathers all their
    tracebacks, each thread's frames added to the others'."""
    if not isinstance(error, (OSError, StoreError)):
        return error
    copied = copy.copy(error)   # not its traceback
    copied.__cause__ = error
    return copied


class _Upload:
    """An upload on its way to ``GroupCommit.commit``: its object, and either
    its body in memory (``body``, written by the committer) or the temporary
    file it was written to (``temporary_path``)."""

    __slots__ = ("repository", "oid", "size", "hold", "body", "temporary_path", "error",
                 "committed", "shard_fd")

    def __init__(self, repository, oid, size, hold, body=None, temporary_path=None):
        self.repository, self.oid, self.size, self.hold = repository, oid, size, hold
        self.body, self.temporary_path = body, temporary_path
        self.error = self.committed = self.shard_fd = None


def _fsync_dir(path):
    """Make the entries of directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def object_directory(repository, oid):
    """The names of an object's directories below the root: its repository's,
    then its shard's (``<oid[:2]>``)."""
    return repository, oid[:2]


def object_path(root, repository, oid):
    """Where an object lives on disk: ``root/<repository>/<oid[:2]>/<oid>``."""
    return os.path.join(root, *object_directory(repository, oid), oid)


# Directories below the root are opened without following a symlink (O_NOFOLLOW)
# and only if they are directories (O_DIRECTORY, which also keeps a FIFO from
# being opened at all); what they hold is then reached through their descriptors.
# One opened only to reach an entry needs no more than O_PATH, where Linux has
# it: a lookup, cheaper than a read-only open on the path of every GET.
_REAL_DIRECTORY = getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
_LIST_FLAGS = os.O_RDONLY | _REAL_DIRECTORY
_WALK_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | _REAL_DIRECTORY
# Objects: no symlink followed, and a FIFO opened without waiting for a writer.
# O_NONBLOCK stays on the descriptor: it changes nothing for a regular file,
# and anything else is closed again at once.
# An upload's temporary file: made new, never through a symlink.
_TEMPORARY_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                    | getattr(os, "O_CLOEXEC", 0))
_OBJECT_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
# What opening a path below the root with those flags raises when something the
# store did not make is there: no directory, or a symlink, where a directory
# belongs (ENOTDIR); a symlink (ELOOP; EMLINK on FreeBSD); a socket (ENXIO).
_FOREIGN = frozenset((errno.ENOTDIR, errno.ELOOP, errno.EMLINK, errno.ENXIO))
_NOT_OURS = _FOREIGN | {errno.ENOENT}   # ... or when nothing is there


def _open_directory_beneath(root, names, flags=_WALK_FLAGS):
    """A descriptor on the directory ``root/names[0]/names[1]/...``, reached
    without following a symlink below ``root``; with the default ``flags`` it
    can only be used to reach entries, not to list them. Raises OSError with an
    errno in ``_NOT_OURS`` when one of them is missing or is not a real directory."""
    fd = os.open(os.path.join(root, names[0]), flags)
    for name in names[1:]:
        try:
            inner = os.open(name, flags, dir_fd=fd)
        finally:
            os.close(fd)
        fd = inner
    return fd


def _regular_file_size(name, dir_fd):
    """The size of ``name`` in the directory ``dir_fd`` if it is a regular file
    (a symlink is not followed), else None."""
    try:
        status = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return status.st_size if stat.S_ISREG(status.st_mode) else None


@contextlib.contextmanager
def _refusing_foreign_directories(names):
    """Turn the errors of opening a directory ``names`` (below the root) that is
    not a real directory into ForeignEntry."""
    try:
        yield
    except OSError as error:
        if error.errno not in _FOREIGN:
            raise
        raise ForeignEntry("cannot store objects in %s/: it, or a directory above it in the data "
                           "directory, is not a directory the store made (a symlink or a file?)"
                           % "/".join(names)) from error


def _exists(name, dir_fd):
    """Whether the directory ``dir_fd`` has an entry ``name``, of whatever kind."""
    return _entry_mode(name, dir_fd) is not None


def _entry_mode(name, dir_fd):
    """The ``st_mode`` of the entry ``name`` in the directory ``dir_fd``, of
    whatever kind (a symlink is not followed), or None if there is none."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return None


def _kind(mode):
    """What a non-regular entry is, in words, from its ``st_mode``."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
    return next((name for is_kind, name in kinds if is_kind(mode)), "a device")


class _CheckedObjects:
    """Small objects' bytes, kept in this process once read whole and found
    to hash to their oid, ``limit`` bytes in all (each counted with
    ENTRY_BYTES more, what its key and entry cost), the least recently read
    dropped first. An object's bytes never change (its name is their
    digest), so a copy is right for as long as the object is stored: the
    store asks the disk whether it still is (one ``fstatat``) before it
    serves one, since another process may have deleted it."""

    ENTRY_BYTES = 512

    def __init__(self, limit):
        self._limit = limit
        self._bytes = 0
        self._objects = collections.OrderedDict()   # (repository, oid) -> bytes, oldest first
        self._lock = threading.Lock()

    def get(self, key):
        """The bytes kept for ``key``, or None."""
        with self._lock:
            data = self._objects.get(key)
            if data is not None:
                self._objects.move_to_end(key)
            return data

    def keep(self, key, data):
        if len(data) + self.ENTRY_BYTES > self._limit:
            return
        with self._lock:
            self._drop(key)
            self._objects[key] = data
            self._bytes += len(data) + self.ENTRY_BYTES
            while self._bytes > self._limit:
                self._drop(next(iter(self._objects)))

    def drop(self, key):
        with self._lock:
            self._drop(key)

    def _drop(self, key):
        data = self._objects.pop(key, None)
        if data is not None:
            self._bytes -= len(data) + self.ENTRY_BYTES


class DiskStore:
    """Objects as files under ``root``, laid out as ``root/<repository>/<oid[:2]>/<oid>``.

    Guarantees:
    - A returned ``put`` means durable: the bytes were made durable in a
      temporary file, renamed into place with ``os.replace``, and the
      directory entry was made durable, before ``put`` returns: by an fsync
      of the file, then of its directory; or, with ``sync_filesystem``, by
      two syncs of the whole filesystem that the uploads in flight share.
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
    - Only what the store writes counts as an object: a regular file in real
      repository and shard directories. No symlink below the root is followed
      (paths below it are opened with openat2's RESOLVE_NO_SYMLINKS, or
      directory by directory with O_NOFOLLOW, and entries are reached through
      their directories' descriptors), so nothing outside the root is read,
      listed or unlinked. Anything else at an object path (a symlink, a directory, a FIFO,
      a socket) is not found, not listed and not counted, and is never opened
      in a way that could block. A put of its content moves it to the
      quarantine and publishes the object; a put into a repository or shard
      path that is not a real directory raises ForeignEntry. (A small object
      kept in memory, ``_CheckedObjects``, is served while a stat that may
      follow a symlinked directory finds its name: bytes already checked,
      never read through the link.)
    - Usage (objects, bytes) is one account for the root, kept in the file
      ``root/@ledger`` by every process on it, under ``flock``: the quota is
      checked, the account raised and the object renamed into place in one
      step, so several processes never overshoot the quota together and all
      report the same usage. Start-up reads the account instead of walking
      the tree (which happens once, when the ledger is new). The account is
      raised before the rename and lowered after an unlink, so a crash
      between the two leaves it high (the quota kept too strictly), never
      low; ``verify`` lowers it for what it moves out, and deleting
      ``@ledger`` while no server runs has the next start recount it. Room
      promised to uploads in flight is counted per process.
    """

    BLOCK_BYTES = 1 << 20
    TEMPORARY_DIR = "@tmp"
    LEDGER_FILE = "@ledger"
    QUARANTINE_DIR = "quarantine"

    def __init__(self, root, max_total_size=None, *, sync_file=os.fsync,
                 sync_directory=_fsync_dir, sync_filesystem=None, openat2=_PROBED):
        """``sync_file(fd)`` and ``sync_directory(path)`` make a file's data and
        a directory's entries durable. With ``sync_filesystem(fd)`` (SYNCFS),
        which makes everything written to a filesystem durable, uploads share
        its calls (a GroupCommit) instead. Tests pass recorders to check the
        order. ``openat2`` (by default ``openat2_function()``) opens objects
        in one call; without it (None) their directories are walked."""
        if openat2 is _PROBED:
            openat2 = openat2_function()
        if not DISK_STORE_SUPPORTED:
            raise StoreError("the disk store needs fcntl.flock (POSIX: Linux, macOS, BSD)")
        self._sync_file = sync_file
        self._sync_directory = sync_directory
        self._openat2 = openat2
        self._checked = _CheckedObjects(CHECKED_OBJECTS_BYTES)
        self.root = os.path.abspath(root)
        self._quota = _Quota(max_total_size)
        self._lock = threading.Lock()
        temporary_root = os.path.join(self.root, self.TEMPORARY_DIR)
        try:
            os.mkdir(self.root)   # not makedirs: a mistyped path must not create a tree
        except FileExistsError:
            pass
        os.makedirs(temporary_root, exist_ok=True)
        # Objects are opened from here with openat2 (the root itself may be a
        # symlink). It stays open as long as the store object lives, not only
        # until ``close``: a request still in flight may open an object.
        self._root_fd = None
        if openat2 is not None:
            self._root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY)
            weakref.finalize(self, os.close, self._root_fd)
        # Start-ups take turns (a lock on @tmp itself), so that no process's
        # clean-up can remove another's directory before it is locked.
        self._lock_fd = self._ledger_fd = self._group_commit = None   # for close, if this fails
        startup_fd = os.open(temporary_root, os.O_RDONLY)
        try:
            fcntl.flock(startup_fd, fcntl.LOCK_EX)
            self._remove_abandoned_temporary_dirs(temporary_root)
            self._temporary_dir = tempfile.mkdtemp(prefix="%d-" % os.getpid(), dir=temporary_root)
            self._temporary_names = itertools.count()
            self._lock_fd = os.open(self._temporary_dir, os.O_RDONLY)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Every upload is renamed from here, so this is its filesystem.
            self._group_commit = sync_filesystem and GroupCommit(
                self._temporary_dir, sync_filesystem, self._write_uploads, self._publish_uploads)
            self._ledger_path = os.path.join(self.root, self.LEDGER_FILE)
            self._open_ledger()
            if _parse_ledger(os.pread(self._ledger_fd, 64, 0)) is None:
                # A new root, one from before the ledger, or a damaged ledger.
                self._write_ledger(self._count_objects())
        except BaseException:
            self.close()
            raise
        finally:
            os.close(startup_fd)   # releases the start-up lock

    @property
    def group_commit(self):
        """Whether uploads are made durable in batches (a GroupCommit)."""
        return bool(self._group_commit)

    def close(self):
        """Release this process's temporary directory."""
        if self._lock_fd is not None:
            if self._group_commit:
                self._group_commit.close()   # first: it commits what is queued
            shutil.rmtree(self._temporary_dir, ignore_errors=True)
            os.close(self._lock_fd)
            if self._ledger_fd is not None:
                os.close(self._ledger_fd)
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

    def put(self, repository, source, expected_oid=None, length=None):
        """Stream ``source`` to disk and publish it in ``repository``.

        Returns ``(oid, size)`` once the object is durable. If
        ``expected_oid`` is given it is checked before anything is read, and
        content that hashes to anything else raises DigestMismatch with
        nothing stored. ``length``, when the caller knows it, is checked
        against the quota before anything is read (see ``_Quota``). Any
        exception leaves no trace on disk.
        """
        check_repository(repository)
        if expected_oid is not None:
            expected_oid = check_expected_oid(expected_oid)
        hold, room = _Hold(), None
        if self._quota.limit is not None and not (   # else there is nothing to count
                expected_oid is not None and self._is_stored(repository, expected_oid)):
            with self._lock, self._ledger(fcntl.LOCK_SH) as (_, stored_bytes):
                hold = self._quota.hold(stored_bytes, length)
                room = None if length is not None else self._quota.room(stored_bytes)
        try:
            return self._put(repository, source if room is None else _WithinRoom(source, room),
                             expected_oid, hold, length)
        finally:
            if hold.bytes:   # else no lock to wait for: publishing uploads hold it a while
                with self._lock:
                    self._quota.release(hold)

    def _is_stored(self, repository, oid):
        try:
            self.open(repository, oid).close()
        except ObjectNotFound:
            return False
        return True

    def _put(self, repository, source, expected_oid, hold, length):
        with write_errors_as_store_errors():
            first = None
            if self._group_commit:
                first, count = self._first_block(source, length)
                if count < len(first) and count <= HANDED_OVER_BYTES:   # the whole body is here
                    # Not a chunked upload's 1 MiB buffer kept for a small body while it waits.
                    body = memoryview(first)[:count] if len(first) == count + 1 else first[:count]
                    first = None
                    return self._commit_handed_over(repository, body, expected_oid, hold)
            fd, temporary_path = self._new_temporary_file()
            try:
                with _ObjectFile(fd) as file:
                    if first is None:
                        first, count = self._first_block(source, length)
                    recorder = checksums.Recorder(length)
                    oid, size = self._write(first, count, source, file, recorder)
                    first = None   # not kept while the upload waits for its batch
                    _record_checksums(file.fileno(), recorder.finish())
                    if not self._group_commit:
                        self._sync_file(file.fileno())   # its bytes, before its name
                check_digest(oid, expected_oid)
                if self._group_commit:
                    self._group_commit.commit(_Upload(repository, oid, size, hold,
                                                      temporary_path=temporary_path))
                    return oid, size
                upload = _Upload(repository, oid, size, hold, temporary_path=temporary_path)
                self._publish_uploads([upload])
                if upload.error is not None:
                    raise upload.error
            except BaseException:
                _remove_quietly(temporary_path)
                raise
            self._sync_directory(os.path.join(self.root, *object_directory(repository, oid)))
        return oid, size

    def _commit_handed_over(self, repository, body, expected_oid, hold):
        """Hash ``body`` and have the committer write and publish it (see GroupCommit)."""
        oid = hashlib.sha256(body).hexdigest()
        check_digest(oid, expected_oid)
        upload = _Upload(repository, oid, len(body), hold, body=body)
        try:
            self._group_commit.commit(upload)
        except BaseException:
            if upload.temporary_path is not None:
                _remove_quietly(upload.temporary_path)
            raise
        return oid, len(body)

    def _write_uploads(self, uploads):
        """Write the bodies handed over in memory into temporary files (for the
        GroupCommit, on its thread, before the sync that makes them durable)."""
        for upload in uploads:
            if upload.body is not None:
                with _error_kept(upload):
                    upload.temporary_path = self._write_handed_over(upload.body)

    def _publish_uploads(self, uploads):
        """Rename ``uploads`` into place, once their bytes are durable (for the
        GroupCommit, on its thread; or one upload on its own). An upload that
        fails on its own (a full disk, the quota, a foreign entry) gets its
        error and leaves the others be."""
        if not uploads:
            return   # no lock to take
        for upload in uploads:
            with _error_kept(upload):
                upload.shard_fd = self._shard_directory_to_write(
                    object_directory(upload.repository, upload.oid))
        try:
            self._publish_batch([upload for upload in uploads if upload.error is None])
        finally:
            for upload in uploads:
                if upload.shard_fd is not None:
                    os.close(upload.shard_fd)

    def _write_handed_over(self, body):
        """The path of a new temporary file holding ``body`` (at most
        HANDED_OVER_BYTES: no block checksums)."""
        fd, temporary_path = self._new_temporary_file()
        try:
            with _ObjectFile(fd) as file:
                _write_all(file, body)
        except BaseException:
            _remove_quietly(temporary_path)
            raise
        return temporary_path

    def _publish_batch(self, uploads):
        """Rename the uploads' finished files into place under one hold of the
        ledger: each new object checked against the quota and counted in turn
        (once, if the batch holds it twice). The account is written before the
        renames, so a crash between the two leaves it high (a quota kept too
        strictly), never low; and again after them if some failed. Whatever
        else holds an object's name (a directory, a symlink, a FIFO) is moved
        to the quarantine first: a rename cannot replace a directory, and the
        others are not objects."""
        with self._lock, self._ledger(fcntl.LOCK_EX) as (objects, stored_bytes):
            counted = (objects, stored_bytes)
            unplaced = {}   # (repository, oid) -> size: new objects counted, not renamed yet
            for upload in uploads:
                if (upload.repository, upload.oid) in unplaced:
                    continue   # the same object twice in one batch: counted once
                with _error_kept(upload):
                    # One look: another process may publish it meanwhile.
                    present = _entry_mode(upload.oid, upload.shard_fd)
                    if present is not None and stat.S_ISREG(present):
                        continue   # stored: renamed over, which changes nothing
                    self._quota.check(stored_bytes, upload.size, upload.hold)
                    self._quota.release(upload.hold)   # counted in stored_bytes from here
                    if present is not None:
                        self._quarantine(upload.repository, upload.oid, upload.shard_fd)
                    unplaced[upload.repository, upload.oid] = upload.size
                    objects, stored_bytes = objects + 1, stored_bytes + upload.size
            if (objects, stored_bytes) != counted:
                self._write_ledger((objects, stored_bytes))
            estimated = (objects, stored_bytes)
            for upload in uploads:
                if upload.error is None:
                    with _error_kept(upload):
                        os.replace(upload.temporary_path, upload.oid, dst_dir_fd=upload.shard_fd)
                        unplaced.pop((upload.repository, upload.oid), None)
            for size in unplaced.values():   # no upload of it could be renamed
                objects, stored_bytes = objects - 1, stored_bytes - size
            if (objects, stored_bytes) != estimated:
                self._write_ledger((objects, stored_bytes))

    def _new_temporary_file(self):
        """``(fd, path)`` of a new file in this process's temporary directory,
        named ``<pid>-<count>``: workers forked after the store was opened
        share the directory. A worker killed mid-upload leaves its file, and
        one forked later may get its pid: such a name is passed over."""
        while True:
            path = os.path.join(self._temporary_dir, "%d-%d" % (
                os.getpid(), next(self._temporary_names)))
            try:
                return os.open(path, _TEMPORARY_FLAGS, 0o600), path
            except FileExistsError:
                continue

    def _first_block(self, source, length):
        """``(buffer, count)``: the first BLOCK_BYTES of ``source`` read into a
        buffer of that size, or of ``length + 1`` when ``length`` is known and
        smaller (zeroing 1 MiB for a small PUT cost more than the rest of its
        hashing and writing). ``count < len(buffer)``: that is the whole body."""
        first = bytearray(self.BLOCK_BYTES if length is None else min(self.BLOCK_BYTES, length + 1))
        return first, fill(source, first)

    def _write(self, first, count, source, file, recorder):
        """Write ``first[:count]`` (see ``_first_block``) and the rest of
        ``source`` into ``file``, hashing as it goes and giving the bytes to
        ``recorder`` (a checksums.Recorder); return ``(oid, size)``.

        A body that fits in the first block is hashed and written here. A larger
        one goes through a pipeline: this thread reads and hashes block n+1
        while a _FileWriter thread checksums and writes block n (hashlib,
        zlib and file writes all release the GIL), so an upload costs about
        the slower of the two rather than their sum.
        """
        digest = hashlib.sha256()
        digest.update(memoryview(first)[:count])
        if count < len(first):
            recorder.update(memoryview(first)[:count])
            _write_all(file, memoryview(first)[:count])
            return digest.hexdigest(), count
        size = count
        writer = _FileWriter(file, [bytearray(self.BLOCK_BYTES) for _ in range(3)], recorder)
        writer.submit(memoryview(first))
        try:
            while True:
                block = writer.next_free_buffer()
                count = fill(source, block)   # whole blocks: tiny chunks cost no write each
                if not count:
                    break
                chunk = memoryview(block)[:count]
                digest.update(chunk)
                writer.submit(chunk)
                size += count
        finally:
            writer.finish()
        return digest.hexdigest(), size

    def _shard_directory_to_write(self, directory):
        """A descriptor on the object's ``directory`` (see ``object_directory``),
        made first if missing. Raises ForeignEntry if its path holds anything but
        real directories: the store neither writes through a symlink nor moves
        aside what an operator may have put there on purpose."""
        with _refusing_foreign_directories(directory):
            try:
                return self._open_beneath(directory, _WALK_FLAGS)
            except FileNotFoundError:
                return self._make_shard_directory(*directory)

    def _make_shard_directory(self, repository, shard):
        """Create the object's directories, fsyncing each new entry's parent, and
        return a descriptor on the shard directory. A repository directory made
        here is removed again if its shard directory cannot be made (a full
        disk), so a failed upload leaves no empty repository."""
        repository_dir = os.path.join(self.root, repository)
        try:
            os.mkdir(repository_dir)
        except FileExistsError:
            made_repository = False
        else:
            made_repository = True
        repository_fd = _open_directory_beneath(self.root, (repository,))
        try:
            try:
                os.mkdir(shard, dir_fd=repository_fd)   # mkdirat: never through a symlink
            except FileExistsError:
                pass   # made meanwhile by a concurrent upload
            except OSError:
                if made_repository:
                    _remove_directory_quietly(repository_dir)
                raise
            shard_fd = os.open(shard, _WALK_FLAGS, dir_fd=repository_fd)
        finally:
            os.close(repository_fd)
        try:
            self._sync_directory(repository_dir)
            self._sync_directory(self.root)
        except BaseException:
            os.close(shard_fd)
            raise
        return shard_fd

    def _canonical_oid(self, repository, oid):
        """The oid in lowercase; ObjectNotFound if ``oid`` is no oid at all."""
        check_repository(repository)
        canonical = canonical_oid(oid)
        if canonical is None:
            raise not_found(repository, oid)
        return canonical

    def _open_shard_directory(self, repository, oid):
        """A descriptor on the object's shard directory; ObjectNotFound if it is
        missing or not a real directory in a real repository directory."""
        try:
            return self._open_beneath(object_directory(repository, oid), _WALK_FLAGS)
        except OSError as error:
            if error.errno in _NOT_OURS:
                raise not_found(repository, oid) from None
            raise

    def open(self, repository, oid, whole=False):
        """Return the object as a StoredObject, or raise ObjectNotFound. Only
        a regular file is an object; nothing it opens can block.

        An object of up to HANDED_OVER_BYTES (one that a reader checks whole
        against its oid) is kept in memory once a reader has found it sound
        (``StoredObject.checked``; hashed again here), and served from there
        while it stays stored: one ``fstatat`` says it still is, instead of
        four calls to open and read it, and no check again
        (``_CheckedObjects``, ``_still_stored``).

        Every system call hands the GIL over to the other connection
        threads and waits to get it back, so a GET makes as few as it can:
        one ``openat2`` (where there is none, the repository and shard
        directories are opened and closed on the way), one ``fstat`` (a
        FileIO would make another), and the block checksums' ``fgetxattr``
        only if they are asked for. Each lets go of the GIL: forms that kept
        it (ctypes.PyDLL) were measured no faster once a request lets go of
        it at its send anyway (README, "Round two", "Fair turns")."""
        oid = self._canonical_oid(repository, oid)
        names = (*object_directory(repository, oid), oid)
        kept = self._checked.get((repository, oid))
        if kept is not None:
            if self._still_stored(names):
                return StoredObject(io.BytesIO(kept), len(kept))   # BytesIO shares bytes: no copy
            self._checked.drop((repository, oid))
        with write_errors_as_store_errors():   # out of descriptors: StoreBusy
            try:
                fd = self._open_beneath(names, _OBJECT_FLAGS)
            except OSError as error:
                if error.errno in _NOT_OURS:
                    raise not_found(repository, oid) from None
                raise
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise not_found(repository, oid)
        except BaseException:
            os.close(fd)
            raise
        file = _ObjectFile(fd)
        keep = None
        if status.st_size <= HANDED_OVER_BYTES:
            keep = functools.partial(self._keep_checked, (repository, oid))
        return StoredObject(file, status.st_size, may_change_at_rest=True,
                            checksums=lambda: _recorded_checksums(file.fileno()), on_checked=keep)

    def _keep_checked(self, key, data):
        """A reader found ``data`` sound: keep it, if it is (the cache must
        never hold bytes that are not their oid's)."""
        if len(data) <= HANDED_OVER_BYTES and hashlib.sha256(data).hexdigest() == key[1]:
            self._checked.keep(key, bytes(data))

    def _still_stored(self, names):
        """Whether ``root/names[0]/.../names[-1]`` is a regular file still,
        with one ``fstatat`` (following a symlink on the way, which
        ``_open_beneath`` would refuse: the bytes served are the ones kept,
        whatever it finds; it only asks whether the object is still stored)."""
        path = "/".join(names) if self._root_fd is not None else os.path.join(self.root, *names)
        try:
            mode = _entry_mode(path, self._root_fd)
        except (OSError, ValueError):   # let the ordinary open say what is wrong
            return False
        return mode is not None and stat.S_ISREG(mode)

    def _open_beneath(self, names, flags):
        """A descriptor on ``root/names[0]/.../names[-1]`` (two names or more)
        opened with ``flags``, reached without following a symlink below the
        root: with one openat2, else by opening each directory on the way with
        O_NOFOLLOW. Raises OSError with an errno in ``_NOT_OURS`` when one of
        them is missing or is not a real directory."""
        if self._openat2 is not None:
            return self._openat2(self._root_fd, "/".join(names), flags)
        directory_fd = _open_directory_beneath(self.root, names[:-1])
        try:
            return os.open(names[-1], flags, dir_fd=directory_fd)
        finally:
            os.close(directory_fd)

    def delete(self, repository, oid):
        """Remove the object durably, or raise ObjectNotFound if the repository
        lacks it. Only a regular file in the store's own directories is removed,
        through their descriptors, so nothing outside the root can be unlinked."""
        oid = self._canonical_oid(repository, oid)
        shard_fd = self._open_shard_directory(repository, oid)
        try:
            with self._lock, write_errors_as_store_errors(), \
                    self._ledger(fcntl.LOCK_EX) as (objects, stored_bytes):
                size = _regular_file_size(oid, shard_fd)
                if size is None:
                    raise not_found(repository, oid)
                os.unlink(oid, dir_fd=shard_fd)   # before the account goes down
                self._write_ledger(_taken_out((objects, stored_bytes), size))
        except FileNotFoundError:
            raise not_found(repository, oid) from None   # deleted meanwhile by another process
        finally:
            os.close(shard_fd)
        with write_errors_as_store_errors():
            self._sync_directory(os.path.join(self.root, *object_directory(repository, oid)))

    def quarantine(self, repository, oid, file):
        """Take an object found damaged out of service: move it to
        ``root/quarantine/`` (as ``verify`` would) and out of the account.
        ``file`` is the one that was read: if the name holds another file by
        now (uploaded again meanwhile, sound), nothing moves. Returns where it
        went; ObjectNotFound if it is gone or replaced. A file that still
        hashes to its oid is not damaged: its block checksums were wrong, so
        they are recorded anew, the object stays, and this returns None."""
        oid = self._canonical_oid(repository, oid)
        read = os.fstat(file.fileno())
        recorder = checksums.Recorder(read.st_size)
        with write_errors_as_store_errors():
            if _hash_file(_Descriptor(file.fileno()), recorder, read.st_size) == oid:
                _record_checksums(file.fileno(), recorder.finish())
                return None
        shard_fd = self._open_shard_directory(repository, oid)
        try:
            with self._lock, write_errors_as_store_errors(), \
                    self._ledger(fcntl.LOCK_EX) as (objects, stored_bytes):
                try:
                    present = os.stat(oid, dir_fd=shard_fd, follow_symlinks=False)
                except FileNotFoundError:
                    raise not_found(repository, oid) from None
                if (present.st_dev, present.st_ino) != (read.st_dev, read.st_ino):
                    raise not_found(repository, oid)   # replaced: the one now there is not the one read
                counted = present.st_size
                moved_to = self._quarantine(repository, oid, shard_fd)
                self._write_ledger(_taken_out((objects, stored_bytes), counted))
                return moved_to
        finally:
            os.close(shard_fd)

    def writable(self):
        """Whether uploads and deletes can change the store now (False on a
        filesystem remounted read-only)."""
        return os.access(self._temporary_dir, os.W_OK)

    def usage(self):
        """``(objects, bytes)`` stored under the root, by the account that every
        process on it keeps (see the class docstring)."""
        with self._lock, self._ledger(fcntl.LOCK_SH) as counts:
            return counts

    def _open_ledger(self):
        # Read-only, so that an administrator can still remount the filesystem
        # read-only (each change opens it to write); never through a symlink.
        self._ledger_fd = os.open(self._ledger_path,
                                  os.O_RDONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        self._ledger_pid = os.getpid()

    @contextlib.contextmanager
    def _ledger(self, lock):
        """The account ``(objects, bytes)``, read under ``lock`` on the ledger
        file (LOCK_EX to change it with ``_write_ledger`` meanwhile); ``self._lock``
        held, since a flock belongs to the open file that all threads share. A
        process forked from the one that opened the store (``gunicorn
        --preload``) opens the file again: a shared open file shares its locks."""
        if self._ledger_pid != os.getpid():
            self._open_ledger()
        fcntl.flock(self._ledger_fd, lock)
        try:
            counts = _parse_ledger(os.pread(self._ledger_fd, 64, 0))
            if counts is None:
                raise StoreError("the account %s is damaged; stop the servers on %s and delete "
                                 "it to have it recounted" % (self._ledger_path, self.root))
            yield counts
        finally:
            fcntl.flock(self._ledger_fd, fcntl.LOCK_UN)

    def _write_ledger(self, counts):
        """Replace the account (its lock held, or the start-up lock)."""
        fd = os.open(self._ledger_path, os.O_WRONLY)
        try:
            os.pwrite(fd, ("%d %d" % counts).ljust(63).encode() + b"\n", 0)
        finally:
            os.close(fd)

    def _count_objects(self):
        """``(objects, bytes)`` by walking the whole tree: only when the ledger is new."""
        objects = stored_bytes = 0
        for _, oid, shard_fd in self._all_object_entries():
            size = _regular_file_size(oid, shard_fd)
            if size is not None:   # None: not ours, or deleted meanwhile by another process
                objects += 1
                stored_bytes += size
        return objects, stored_bytes

    def list_objects(self, repository, after=None, limit=1000):
        """Up to ``limit`` ``(oid, size)`` pairs of ``repository``, sorted by oid,
        starting after the oid ``after``. Reads one shard directory at a time,
        never the whole repository."""
        check_repository(repository)
        listed = []
        with contextlib.closing(self._object_entries(repository, after)) as entries:
            for oid, shard_fd in entries:
                if len(listed) == limit:
                    break
                size = _regular_file_size(oid, shard_fd)
                if size is not None:   # None: not ours, or deleted since the directory was read
                    listed.append((oid, size))
        return listed

    def _object_entries(self, repository, after=None):
        """Yield ``(oid, shard_fd)`` for each entry named like an object in the
        repository, of whatever kind, in oid order after ``after``; ``shard_fd``
        is its directory, valid until the next item is taken. Repository and
        shard paths that are not real directories are not entered."""
        try:
            repository_fd = _open_directory_beneath(self.root, (repository,), _LIST_FLAGS)
        except OSError as error:
            if error.errno in _NOT_OURS:
                return
            raise
        try:
            for shard in sorted(os.listdir(repository_fd)):
                if len(shard) != 2 or (after and shard < after[:2]):
                    continue
                try:
                    shard_fd = os.open(shard, _LIST_FLAGS, dir_fd=repository_fd)
                except OSError as error:
                    if error.errno in _NOT_OURS:
                        continue
                    raise
                try:
                    for name in sorted(os.listdir(shard_fd)):
                        if (canonical_oid(name) == name and name[:2] == shard
                                and (not after or name > after)):
                            yield name, shard_fd
                finally:
                    os.close(shard_fd)
        finally:
            os.close(repository_fd)

    def _all_object_entries(self):
        """Yield ``(repository, oid, shard_fd)`` for every entry named like an
        object under the root (see ``_object_entries``)."""
        for repository in sorted(os.listdir(self.root)):
            if REPOSITORY_PATTERN.fullmatch(repository) and repository not in (".", ".."):
                for oid, shard_fd in self._object_entries(repository):
                    yield repository, oid, shard_fd

    def verify(self, report=print):
        """Check every entry named like an object, without following a symlink
        or blocking on a special file: a regular file must hash to its name.
        Each that does not, and each that is not a regular file (a directory, a
        symlink, a FIFO, a socket), is corrupt: it is moved to
        ``root/quarantine/<repository>@<oid>`` and reported. One that cannot be
        checked or moved (an I/O error) is reported, counted corrupt and left
        in place, and the check carries on. A sound object whose block
        checksums are missing or wrong gets them recorded anew (not fsynced:
        they are an aid, and a lost one only costs speed). Returns
        ``(checked, corrupt)``."""
        checked = corrupt = 0
        for repository, oid, shard_fd in self._all_object_entries():
            try:
                finding = self._verify_entry(repository, oid, shard_fd)
            except FileNotFoundError:
                continue   # deleted by a running server meanwhile
            checked += 1
            if finding is not None:
                corrupt += 1
                report("corrupt: %s/%s %s" % (repository, oid, finding))
        return checked, corrupt

    def _verify_entry(self, repository, oid, shard_fd):
        """None if the entry is a sound object; else quarantine it if possible
        and say what was found. FileNotFoundError if it is gone."""
        try:
            problem, examined, pin = _object_problem(oid, shard_fd)
            try:
                if problem is None:
                    return None
                with self._lock, self._ledger(fcntl.LOCK_EX) as (objects, stored_bytes):
                    present = os.stat(oid, dir_fd=shard_fd, follow_symlinks=False)
                    if _identity(present) != examined:
                        return None   # replaced meanwhile by an upload, which hashed what it stored
                    moved_to = self._quarantine(repository, oid, shard_fd)
                    if stat.S_ISREG(present.st_mode):   # a regular file was in the account
                        self._write_ledger(_taken_out((objects, stored_bytes), present.st_size))
                return "%s; moved to %s" % (problem, moved_to)
            finally:
                if pin is not None:
                    os.close(pin)
        except FileNotFoundError:
            raise
        except OSError as error:
            return "could not be checked or moved (%s); left in place" % error

    def _quarantine(self, repository, oid, shard_fd):
        """Move the entry named ``oid`` in ``shard_fd`` to
        ``root/quarantine/<repository>@<oid>``, or ``...@2``, ``@3``... when that
        name is taken (a rename could not replace a directory, and would lose
        what was quarantined before); return where it went."""
        quarantine = os.path.join(self.root, self.QUARANTINE_DIR)
        try:
            os.mkdir(quarantine)
        except FileExistsError:
            pass
        quarantine_fd = _open_directory_beneath(self.root, (self.QUARANTINE_DIR,))
        try:
            for number in itertools.count(1):
                name = "%s@%s" % (repository, oid) + ("@%d" % number if number > 1 else "")
                if not _exists(name, quarantine_fd):
                    os.rename(oid, name, src_dir_fd=shard_fd, dst_dir_fd=quarantine_fd)
                    return os.path.join(quarantine, name)
        finally:
            os.close(quarantine_fd)


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
    """Writes submitted buffers to a file on its own thread, in order (giving
    each to ``recorder`` first), and hands each buffer back for reuse once written. Every FLUSH_BYTES it asks
    a _BackgroundFlush to fdatasync, without waiting for it. An error is
    kept and raised to the caller at its next call."""

    FLUSH_BYTES = 16 << 20

    def __init__(self, file, buffers, recorder):
        super().__init__(daemon=True)
        self._file = file
        self._recorder = recorder
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
                    self._recorder.update(chunk)
                    _write_all(self._file, chunk)
                except BaseException as error:
                    self._error = error
                unflushed += len(chunk)
                if unflushed >= self.FLUSH_BYTES:
                    self._flush.request()
                    unflushed = 0
            self._free.put(chunk.obj)


def read_to_end(source, block_size=256 * 1024):
    """Everything left in ``source``, gathered through ``readinto`` in blocks
    (for a source whose length is not known in advance)."""
    parts = bytearray()
    block = bytearray(block_size)
    while True:
        count = source.readinto(block)
        if not count:
            return bytes(parts)
        parts += memoryview(block)[:count]


def fill(source, buffer):
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


# A smaller object gets no block checksums: readers check it whole against its
# oid (the application reads objects of up to 64 KiB whole), and recording them
# would cost every small upload one more system call.
CHECKSUMS_FROM_BYTES = 64 * 1024 + 1


def _record_checksums(fd, recorded):
    """Keep ``recorded`` (BlockChecksums, or None) with the file, if it is
    CHECKSUMS_FROM_BYTES or larger. They are an aid, not part of the object:
    where the file system takes no extended attributes (or the platform has
    none) the object goes without, and is checked against its oid when read."""
    if recorded is None or recorded.size < CHECKSUMS_FROM_BYTES or not hasattr(os, "setxattr"):
        return
    try:
        os.setxattr(fd, checksums.ATTRIBUTE, recorded.to_bytes())
    except OSError:
        pass


def _recorded_checksums(fd):
    """The BlockChecksums kept with the file, or None if it has none intact."""
    if not hasattr(os, "getxattr"):
        return None
    try:
        return checksums.BlockChecksums.from_bytes(os.getxattr(fd, checksums.ATTRIBUTE))
    except OSError:
        return None


# With group commit, bodies up to this size are handed over in memory and
# written by the committer: one file-system call each, made by one thread.
# They get no block checksums, so their files need no more than a write.
HANDED_OVER_BYTES = CHECKSUMS_FROM_BYTES - 1

# Bytes of small objects a disk store keeps in memory once read and checked
# (per process: each worker keeps its own). See _CheckedObjects.
CHECKED_OBJECTS_BYTES = 32 * 1024 * 1024


@contextlib.contextmanager
def _error_kept(upload):
    """Keep an error raised for one upload of a batch (as the store error it
    stands for) in ``upload.error``, and go on with the others."""
    try:
        with write_errors_as_store_errors():
            yield
    except Exception as error:
        upload.error = error


def _parse_ledger(data):
    """``(objects, bytes)`` from the ledger's bytes, or None unless they are two
    whole numbers, not negative."""
    fields = data.split()
    if len(fields) != 2 or not all(field.isdigit() for field in fields):
        return None
    return int(fields[0]), int(fields[1])


@contextlib.contextmanager
def write_errors_as_store_errors():
    """A full disk is InsufficientStorage, a read-only one StoreNotWritable, no
    descriptor left StoreBusy: conditions of the storage or the process, not
    faults of the request or of the code."""
    try:
        yield
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage("not enough storage for the object: %s"
                                      % os.strerror(error.errno)) from error
        if error.errno == errno.EROFS:
            raise StoreNotWritable("the data directory cannot be written now: %s"
                                   % os.strerror(error.errno)) from error
        if error.errno in (errno.EMFILE, errno.ENFILE):
            raise StoreBusy("the server has no file descriptor left now; retry shortly: %s"
                            % os.strerror(error.errno)) from error
        raise


def _object_problem(oid, shard_fd):
    """``(problem, identity, pin)`` of the entry ``oid`` in ``shard_fd``:
    problem None if it is a regular file whose bytes hash to ``oid``, else
    what is wrong with it, in words. Follows no symlink and opens a FIFO
    without waiting for a writer. A sound object's block checksums are
    recorded anew when they are missing (stored by an older version, or copied
    without extended attributes) or do not match its bytes. ``pin`` is a
    descriptor on the entry for the caller to close, so that its inode number
    cannot go to an upload that replaces it meanwhile (``identity`` would then
    match the newcomer); None for an entry that cannot be opened (a symlink, a
    socket), which an upload, a regular file, cannot pass for."""
    try:
        fd = os.open(oid, _OBJECT_FLAGS, dir_fd=shard_fd)
    except OSError as error:
        if error.errno not in _FOREIGN:
            raise
        found = os.stat(oid, dir_fd=shard_fd, follow_symlinks=False)
        return "is " + _kind(found.st_mode), _identity(found), None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            return "is " + _kind(status.st_mode), _identity(status), fd
        found, size = _recorded_checksums(fd), status.st_size
        recorder = checksums.Recorder(size, found.block_size if found and found.size == size
                                      else None)
        with open(fd, "rb", buffering=0, closefd=False) as file:
            if _hash_file(file, recorder, size) != oid:
                return "does not hash to its name", _identity(status), fd
        recorded = recorder.finish()
        if recorded is not None and (found is None or (found.size, found.crcs) != (
                recorded.size, recorded.crcs)):
            _record_checksums(fd, recorded)
        os.close(fd)
        return None, _identity(status), None
    except BaseException:
        os.close(fd)
        raise


def _identity(status):
    """Which entry a stat result is of: its device, inode and kind."""
    return status.st_dev, status.st_ino, stat.S_IFMT(status.st_mode)


def _taken_out(counts, size):
    """The account ``(objects, bytes)`` once an object of ``size`` bytes is out
    of it. Never below zero: an object whose size changed at rest (damage, or
    a hand on the file) is taken out at its size now, which can be more than
    was counted for it, and an account below zero would stop every process
    on the root (see ``_ledger``) until a recount."""
    objects, stored_bytes = counts
    return max(objects - 1, 0), max(stored_bytes - size, 0)


class _ObjectFile(io.RawIOBase):
    """An object's open file, read or written unbuffered as a FileIO would
    be, without the ``fstat`` a FileIO makes when it is made (``DiskStore
    .open`` has just made one; an upload's new file needs none). Closing it,
    or its collection, closes the descriptor."""

    def __init__(self, fd):
        super().__init__()
        self._fd = fd

    def fileno(self):
        self._checkClosed()
        return self._fd

    def readable(self):
        return True

    def writable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, buffer):
        self._checkClosed()   # its number may be another file's by now
        return os.readv(self._fd, [buffer])

    def write(self, data):
        self._checkClosed()
        return os.write(self._fd, data)

    def seek(self, offset, whence=os.SEEK_SET):
        self._checkClosed()
        return os.lseek(self._fd, offset, whence)

    def tell(self):
        self._checkClosed()
        return os.lseek(self._fd, 0, os.SEEK_CUR)

    def close(self):
        if not self.closed:
            try:
                super().close()
            finally:
                os.close(self._fd)


class _Descriptor:
    """``readinto`` from the start of a descriptor, with pread: its position is another's."""

    def __init__(self, fd):
        self._fd = fd
        self._offset = 0

    def readinto(self, buffer):
        data = os.pread(self._fd, len(buffer), self._offset)
        buffer[:len(data)] = data
        self._offset += len(data)
        return len(data)


def _hash_file(file, recorder, size):
    """The SHA-256 of what is left to read in ``file`` (``size`` bytes, as
    far as is known), read a block at a time and given to ``recorder`` (a
    checksums.Recorder) as well. The buffer fits the file: ``verify`` reads
    many small ones."""
    digest = hashlib.sha256()
    block = bytearray(max(1, min(DiskStore.BLOCK_BYTES, size + 1)))
    view = memoryview(block)
    for count in iter(lambda: file.readinto(block), 0):
        digest.update(view[:count])
        recorder.update(view[:count])
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
              "Re-hash every object under DIR; move corrupt ones, and anything at an object\n"
              "path that is not a regular file, to DIR/quarantine/.",
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
        checked, store.root, corrupt, " (listed above)" if corrupt else ""))
    return 1 if corrupt else 0


if __name__ == "__main__":
    sys.exit(main())
