"""System calls that cannot wait, made without handing over the GIL (Linux).

CPython releases the GIL around every system call, so that other threads run
while one waits. A call that cannot wait gains nothing from it, and under load
it costs much: the thread that lets go of the GIL wakes one waiting for it, and
on return must wait until that one lets go in turn, two thread switches for a
call of a microsecond or two. With 16 busy connections on this project's
2-core machine, a 1 KiB GET from the disk store (six calls) cost 225 us of CPU,
and one from the memory store (two calls) 110 us.

The calls here go through ``ctypes.PyDLL``, which keeps the GIL, and each is
made in a form in which the kernel does not wait:

- ``send``: with MSG_DONTWAIT;
- ``read``: preadv2 with RWF_NOWAIT, which gives only bytes already in the
  page cache, and fails with EAGAIN rather than read the disk;
- ``status``: statx of an open file, whose inode is in memory;
- ``close`` of a file opened only to be read, which writes nothing back.

Each returns None where the kernel would have had to wait (or the call is
missing), and the caller then makes the ordinary call, which releases the GIL.
The last three are free of waits on a local filesystem only (NFS may ask its
server), so the disk store uses them only on one of ``LOCAL_FILESYSTEMS``. The
disk store's openat2 has the same form (RESOLVE_CACHED; see
``storage._load_openat2``).

Elsewhere than Linux (or without ctypes) ``AVAILABLE`` is False and every
function returns None.
"""

import errno
import os
import socket
import sys

# Filesystems whose statx, cached reads and read-only close never wait for a
# server or the disk. Others (NFS, CIFS, FUSE) get the ordinary calls.
LOCAL_FILESYSTEMS = frozenset(("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "f2fs"))

# Errors after which the ordinary call is made: the call would have had to wait,
# or this kernel or filesystem does not have it.
_ORDINARY_CALL_NEEDED = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR,
                                   errno.EOPNOTSUPP, errno.ENOSYS))

_SEND_FLAGS = getattr(socket, "MSG_DONTWAIT", 0) | getattr(socket, "MSG_NOSIGNAL", 0)
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_AT_EMPTY_PATH = 0x1000
_STATX_TYPE_AND_SIZE = 0x0001 | 0x0200   # STATX_TYPE | STATX_SIZE
_STATX_BYTES = 256   # sizeof(struct statx)
_STATX_MODE = slice(28, 30)   # stx_mode, a __u16
_STATX_SIZE = slice(40, 48)   # stx_size, a __u64


def _load():
    """The C library's functions, called with the GIL held; None if any is missing."""
    if sys.platform != "linux" or not _RWF_NOWAIT:
        return None
    try:
        import ctypes
        libc = ctypes.PyDLL(None, use_errno=True)
        functions = libc.send, libc.preadv2, libc.statx, libc.close
    except (ImportError, OSError, AttributeError):   # no ctypes; glibc < 2.28
        return None
    send, preadv2, statx, close = functions
    send.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
    send.restype = ctypes.c_ssize_t

    class IOVec(ctypes.Structure):   # struct iovec
        _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]

    preadv2.argtypes = [ctypes.c_int, ctypes.POINTER(IOVec), ctypes.c_int, ctypes.c_long,
                        ctypes.c_int]
    preadv2.restype = ctypes.c_ssize_t
    statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                      ctypes.c_char_p]
    statx.restype = ctypes.c_int
    close.argtypes = [ctypes.c_int]
    close.restype = ctypes.c_int
    return ctypes, IOVec, send, preadv2, statx, close


_LIBC = _load()
AVAILABLE = _LIBC is not None


def _error(ctypes):
    number = ctypes.get_errno()
    if number in _ORDINARY_CALL_NEEDED:
        return None
    raise OSError(number, os.strerror(number))   # its subclass, as socket and os raise


def send(fd, data):
    """Send what of ``data`` (bytes) the socket ``fd`` takes at once; return how
    many bytes went, or None if it took none (its buffer is full) or there is
    no such call. Errors raise as ``socket.send`` raises them (BrokenPipeError,
    ConnectionResetError, ...)."""
    if _LIBC is None or type(data) is not bytes:
        return None
    ctypes, _, send_, _, _, _ = _LIBC
    sent = send_(fd, data, len(data), _SEND_FLAGS)
    return sent if sent >= 0 else _error(ctypes)


def read(fd, buffer):
    """Read into ``buffer`` (writable) from the file position of ``fd`` what is
    in the page cache; return the count (0 at the end of the file), which may
    be short of what the file holds: what follows is not cached. None if none
    of it is cached, or the call is missing here (or on this filesystem)."""
    if _LIBC is None:
        return None
    ctypes, IOVec, _, preadv2, _, _ = _LIBC
    target = (ctypes.c_char * len(buffer)).from_buffer(buffer)
    try:
        vector = IOVec(ctypes.addressof(target), len(buffer))
        count = preadv2(fd, ctypes.byref(vector), 1, -1, _RWF_NOWAIT)   # -1: the file position
    finally:
        del target   # the buffer may be resized once no export of it is left
    return count if count >= 0 else _error(ctypes)


def status(fd):
    """``(st_mode, st_size)`` of the open file ``fd``, or None if there is no such call."""
    if _LIBC is None:
        return None
    ctypes, _, _, _, statx, _ = _LIBC
    result = ctypes.create_string_buffer(_STATX_BYTES)
    if statx(fd, b"", _AT_EMPTY_PATH, _STATX_TYPE_AND_SIZE, result) != 0:
        return _error(ctypes)
    raw = result.raw
    return (int.from_bytes(raw[_STATX_MODE], sys.byteorder),
            int.from_bytes(raw[_STATX_SIZE], sys.byteorder))


def close(fd):
    """Close ``fd``, a file opened only to be read; False if there is no such call."""
    if _LIBC is None:
        return False
    ctypes = _LIBC[0]
    if _LIBC[5](fd) != 0:
        number = ctypes.get_errno()
        if number != errno.EINTR:   # Linux has closed it even so (close(2))
            raise OSError(number, os.strerror(number))
    return True
