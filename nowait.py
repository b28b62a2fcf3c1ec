"""System calls that do not wait, made without handing over the GIL (Linux).

CPython releases the GIL around every system call, so that other threads run
while one waits. A call that does not wait gains nothing from it, and under
load it costs much: the thread that lets go of the GIL wakes one waiting for
it, and on return must wait until that one lets go in turn, two thread
switches for a call of a microsecond or two. With 16 busy connections on this
project's 2-core machine, a 1 KiB GET from the disk store (six calls) cost
215-225 us of CPU, and one from the memory store (two calls) 106-112 us.

The calls here go through ``ctypes.PyDLL``, which keeps the GIL, and each only
where the kernel has what it needs in memory:

- ``status``: statx of an open file, whose inode is in memory;
- ``cached``: cachestat (Linux 6.5), which tells whether a file's bytes are all
  in the page cache; then ``read``, preadv2 with RWF_NOWAIT, for those bytes.
  RWF_NOWAIT alone is not enough: on bytes that are not cached it starts the
  disk read itself (read-ahead, 36-90 us here for 1 KiB, and it may sleep for
  a free request on a busy disk) before it gives up; that still happens to
  bytes evicted between the two calls (40-140 us seen), under memory
  pressure, as may a fault on the buffer if it was swapped out. A read of cached bytes
  may still set the file's access time (under relatime, once a day), which
  takes a journal handle: up to 0.9 ms was seen under another process's fsyncs;
- ``close`` of a file opened only to be read, if it still has a name: the last
  close of a deleted file frees its blocks, which can wait on the journal.
  The name is looked at just before (statx). Another process, or another
  thread (one in the kernel already, or one the interpreter switches to
  between the two calls), may delete or replace the file in those
  microseconds; the close then frees its blocks with the GIL held (93 us
  typical, 287 us at most, seen for 64 KiB: the disk store closes so only
  files that small). A re-upload of stored bytes replaces the file too.

Each returns None (or False) where the kernel would have had to wait, or the
call is missing, and the caller then makes the ordinary call, which releases
the GIL. They are free of waits on a local filesystem only (NFS
may ask its server), so the disk store uses them only on one of
``LOCAL_FILESYSTEMS``, and reads only of small files (a long copy is better
made with the GIL released) whose bytes were cached when it opened them (see
``storage._ObjectFile``). The disk store's openat2 has the same form, with
RESOLVE_CACHED (see ``storage._load_openat2``).

Fair turns. A request must still let go of the GIL once while it has work
left, not only at the ``recv`` where it waits for the next request: the
response's send does (``gateway.ResponseWriter``), though it never waits.
CPython hands a released GIL to whichever thread asks first, and a thread
whose ``recv`` has just returned, already on a CPU, beats one that has been
queued for the GIL, asleep; the queued one's 5 ms switch interval forces no
hand-over while other threads keep taking turns. With the send made here
too, a request let go only at its ``recv``, and under 16 connections in one
process a few connections were served over and over while others waited:
p99 of 1 KiB GETs from the memory store 410-750 ms against 16-19 ms with
the send releasing it, for 20-35% more requests served in all (see the
README, "Round two", "Fair turns").

Elsewhere than Linux (or without ctypes, or with a C library without these
functions) ``AVAILABLE`` is False and every function returns None or False.
"""

import collections
import errno
import os
import platform
import sys
import types

# Filesystems on which a cached lookup and open, a statx and a read of cached
# bytes need neither a server nor the disk. Others (NFS, CIFS, FUSE) get the
# ordinary calls.
LOCAL_FILESYSTEMS = frozenset(("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "f2fs"))

# Errors after which the ordinary call is made: the call would have had to wait,
# or this kernel or filesystem does not have it (or a sandbox refuses it).
_ORDINARY_CALL_NEEDED = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR,
                                   errno.EOPNOTSUPP, errno.ENOSYS, errno.EPERM))

# The most a held call copies: a copy of 256 KiB (a loopback send) took 110 us
# here, and a longer copy is better made with the GIL released.
HELD_COPY_BYTES = 64 * 1024

_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
# Machines on which Linux numbers its newer system calls from one shared table
# (openat2 437, cachestat 451); MIPS and Alpha number them otherwise.
SHARED_SYSCALL_TABLE_MACHINES = frozenset((
    "x86_64", "aarch64", "i386", "i686", "armv7l", "armv8l", "ppc64", "ppc64le", "s390x",
    "riscv64", "loongarch64"))
_SYS_CACHESTAT = 451
_AT_EMPTY_PATH = 0x1000
_STATX_WANTED = 0x0001 | 0x0004 | 0x0200   # STATX_TYPE | STATX_NLINK | STATX_SIZE
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _load():
    """The C library's functions, called with the GIL held; None if any is
    missing, or statx is refused (a sandbox's filter)."""
    if sys.platform != "linux" or not _RWF_NOWAIT:
        return None
    try:
        import ctypes
        libc = ctypes.PyDLL(None, use_errno=True)
        functions = libc.preadv2, libc.statx, libc.close, libc.syscall
    except (ImportError, OSError, AttributeError):   # no ctypes; glibc < 2.28
        return None
    preadv2, statx, close, syscall = functions

    class IOVec(ctypes.Structure):   # struct iovec
        _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]

    class StatX(ctypes.Structure):   # struct statx: its first fields, and room for the rest
        _fields_ = [("mask", ctypes.c_uint32), ("blksize", ctypes.c_uint32),
                    ("attributes", ctypes.c_uint64), ("nlink", ctypes.c_uint32),
                    ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("mode", ctypes.c_uint16),
                    ("spare", ctypes.c_uint16), ("ino", ctypes.c_uint64), ("size", ctypes.c_uint64),
                    ("rest", ctypes.c_uint8 * (256 - 48))]   # sizeof(struct statx) is 256

    class CacheRange(ctypes.Structure):   # struct cachestat_range
        _fields_ = [("offset", ctypes.c_uint64), ("length", ctypes.c_uint64)]

    class CacheStat(ctypes.Structure):   # struct cachestat
        _fields_ = [(name, ctypes.c_uint64) for name in (
            "cached", "dirty", "writeback", "evicted", "recently_evicted")]

    preadv2.argtypes = [ctypes.c_int, ctypes.POINTER(IOVec), ctypes.c_int, ctypes.c_long,
                        ctypes.c_int]
    preadv2.restype = ctypes.c_ssize_t
    statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                      ctypes.POINTER(StatX)]
    statx.restype = ctypes.c_int
    close.argtypes = [ctypes.c_int]
    close.restype = ctypes.c_int
    syscall.restype = ctypes.c_long
    libc = types.SimpleNamespace(ctypes=ctypes, IOVec=IOVec, preadv2=preadv2,
                                 statx=statx, close=close, syscall=syscall, StatX=StatX,
                                 CacheRange=CacheRange, CacheStat=CacheStat)
    if statx(-100, b"/", 0, _STATX_WANTED, ctypes.byref(StatX())) != 0:
        return None   # -100: AT_FDCWD
    return libc


def _cachestat(libc, fd, size, pages):
    ctypes = libc.ctypes
    return libc.syscall(ctypes.c_long(_SYS_CACHESTAT), ctypes.c_uint(fd),
                        ctypes.byref(libc.CacheRange(0, size)), ctypes.byref(pages),
                        ctypes.c_uint(0))


_LIBC = _load()
AVAILABLE = _LIBC is not None


def _error():
    """None if the failed call would have had to wait; else raise its error."""
    number = _LIBC.ctypes.get_errno()
    if number in _ORDINARY_CALL_NEEDED:
        return None
    raise OSError(number, os.strerror(number))   # its subclass, as os raises


Status = collections.namedtuple("Status", "st_mode st_size st_nlink")   # as os.fstat names them


def status(fd):
    """The Status of the open file ``fd`` (its type, size and links), or None
    if there is no such call."""
    if _LIBC is None:
        return None
    result = _LIBC.StatX()
    if _LIBC.statx(fd, b"", _AT_EMPTY_PATH, _STATX_WANTED, _LIBC.ctypes.byref(result)) != 0:
        return _error()
    return Status(result.mode, result.size, result.nlink)


def cached(fd, size):
    """True if the first ``size`` bytes of the file ``fd`` are all in the page
    cache now; False if not, or if cachestat is missing or refused. Only on a
    filesystem where ``reads_cached`` said yes (it checks the machine too)."""
    if _LIBC is None:
        return False
    pages = _LIBC.CacheStat()
    if _cachestat(_LIBC, fd, size, pages) != 0:
        _error()
        return False
    return pages.cached >= -(-size // _PAGE_BYTES)


def reads_cached(fd):
    """True if ``cached`` and ``read`` work on ``fd``, a regular file of the
    process's own: not before Linux 6.5, nor on tmpfs (it refuses RWF_NOWAIT),
    nor on a machine without the shared system call table. (cachestat asks
    for a file the process owns or may write, since Linux 6.14.)"""
    if _LIBC is None or platform.machine() not in SHARED_SYSCALL_TABLE_MACHINES:
        return False
    return (_cachestat(_LIBC, fd, 0, _LIBC.CacheStat()) == 0
            and (_read_without_waiting(fd, bytearray(1), 0) >= 0
                 or _LIBC.ctypes.get_errno() == errno.EAGAIN))   # refused: EOPNOTSUPP


def read(fd, buffer):
    """Read into ``buffer`` (writable bytes) what is in the page cache, from the
    file position of ``fd``, which moves on; return the count (0 at the end of
    the file), which may be short of what the file holds: what follows is not
    cached. None if none of it is cached, or the call is missing here (or on
    this filesystem: tmpfs refuses RWF_NOWAIT). Only for bytes that ``cached``
    found in the page cache: on others, the kernel starts reading them from
    the disk before it gives up."""
    if _LIBC is None:
        return None
    count = _read_without_waiting(fd, buffer, -1)   # -1: from the file position
    return count if count >= 0 else _error()


def _read_without_waiting(fd, buffer, offset):
    """preadv2 with RWF_NOWAIT into ``buffer``: the count, or -1 (errno set)."""
    ctypes = _LIBC.ctypes
    target = (ctypes.c_char * len(buffer)).from_buffer(buffer)
    try:
        vector = _LIBC.IOVec(ctypes.addressof(target), len(buffer))
        return _LIBC.preadv2(fd, ctypes.byref(vector), 1, offset, _RWF_NOWAIT)
    finally:
        del target   # the buffer may be resized once no export of it is left


def close(fd):
    """Close ``fd``, a file opened only to be read, if it still has a name;
    True if closed, False if it has none (its last close may wait), or there
    is no such call."""
    try:
        now = status(fd)
    except OSError:   # ENOMEM: the ordinary close follows
        return False
    if now is None or now.st_nlink == 0:
        return False
    if _LIBC.close(fd) != 0:
        number = _LIBC.ctypes.get_errno()
        if number != errno.EINTR:   # Linux has closed it even so (close(2))
            raise OSError(number, os.strerror(number))
    return True
