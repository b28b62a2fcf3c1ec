"""The data storage service: a PEP 3333 application, and ``main`` to serve it.

``DataStorageServer`` holds the object semantics of ``/data/<repository>/<oid>``
and the operational routes, and nothing about connections: it reads request
bodies from ``wsgi.input``, hands them to a store from ``storage`` as streams,
and returns responses as iterables, so any WSGI server or test client can host
it (``python server.py`` runs it on the stdlib gateway in ``gateway.py``). Every
error, from the request, the store or a bug, is raised as an exception and
turned into a JSON response in one place, ``DataStorageServer._respond``.

Run ``python server.py --help`` for the command line.
"""

import sys

if sys.version_info < (3, 9):   # before anything that an older Python cannot even parse
    sys.exit("data storage service: needs Python 3.9 or newer, not %d.%d"
             % tuple(sys.version_info[:2]))

import argparse   # noqa: E402 (after the version check, on purpose)
import binascii
import functools
import hashlib
import hmac
import json
import os
import re
import threading
import time
import traceback
import urllib.parse
import zlib

import gateway
import http11
import lfs
import logs
import metrics as metrics_module
import s3
import storage
import workers

DEFAULT_PORT = 8282
DEFAULT_MAX_OBJECT_SIZE = 1 << 30
DEFAULT_SHUTDOWN_TIMEOUT = 20.0
INLINE_BODY_BYTES = 64 * 1024   # larger objects are streamed from their file, not read into memory
BODY_BLOCK_BYTES = 256 * 1024
DEFAULT_LIST_LIMIT = 1000
MAX_LIST_LIMIT = 10000
OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")
ROUTE_PATHS = {   # route name -> path template, as in openapi.json
    "health": "/healthz",
    "metrics": "/metrics",
    "openapi": "/openapi.json",
    "repository": "/data/{repository}",
    "object": "/data/{repository}/{oid}",
    "lfs-batch": "/lfs/{repository}/objects/batch",
    "lfs-verify": "/lfs/{repository}/verify",
    "lfs-locks": "/lfs/{repository}/locks",
    "lfs-locks-verify": "/lfs/{repository}/locks/verify",
    "lfs-unlock": "/lfs/{repository}/locks/{id}/unlock",
}
HOST_PATTERN = re.compile(r"[A-Za-z0-9.:\[\]_~-]+")   # a Host value: name or address, port
FIXED_ROUTES = {path: route for route, path in ROUTE_PATHS.items() if "{" not in path}
TEMPLATED_ROUTES = [(route, path.split("/")[1:]) for route, path in ROUTE_PATHS.items()
                    if "{" in path]
JSON = ("Content-Type", "application/json")
NO_STORE = ("Cache-Control", "no-store")   # errors, listings, health, metrics: they change
OBJECT_LIFETIME = "max-age=31536000, immutable"   # an oid's bytes never change
OPENAPI_LIFETIME = "max-age=300"

STORE_ERROR_STATUS = {
    storage.InvalidRepository: 400,
    storage.InvalidObjectId: 400,
    storage.DigestMismatch: 400,
    storage.ObjectNotFound: 404,
    storage.InsufficientStorage: 507,
    storage.StoreNotWritable: 503,
    storage.StoreBusy: 503,
    storage.StoreUnavailable: 503,
}
RETRY_LATER = ("Retry-After", "1")   # with a 503 from the store: it is a passing condition


class HTTPError(Exception):
    """An error response to give: status, message and extra headers."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = status
        self.headers = list(headers)


class IntegrityFailure(OSError):
    """Bytes of an object failed their check; ``sound``: the store found the
    object sound after all (its checksums were wrong, and are mended)."""

    def __init__(self, oid, sound):
        super().__init__("object %s failed its integrity check" % oid)
        self.sound = sound


class RangeNotSatisfiable(Exception):
    """The Range header asks for bytes beyond the object (RFC 9110 §15.5.17)."""


class Response:
    """What a route answers: a status, headers, and a body that is either bytes
    or a ``FileSlice`` of a stored object. Content-Length is ``length``: the
    body's, unless given (a HEAD or 304 states the length a GET would send)."""

    def __init__(self, status, headers=(), body=b"", length=None):
        self.status = status
        self.headers = list(headers)
        self.body = body
        self.length = len(body) if length is None else length

    @classmethod
    def json(cls, status, document, headers=()):
        """A JSON document that no cache keeps."""
        return cls(status, [JSON, NO_STORE, *headers], json.dumps(document).encode())

    @classmethod
    def error(cls, status, message, headers=()):
        return cls.json(status, {"error": message}, headers)


# Requests -------------------------------------------------------------------------

class BodySource:
    """``wsgi.input`` as a store's source (``read()`` and ``readinto(buffer)``).

    Reads exactly CONTENT_LENGTH bytes, or to the end of the input when the
    server says it ends there (``wsgi.input_terminated``, as for a chunked
    body), then at most ``limit`` + 1 bytes before refusing with 413. Uses the
    input's ``readinto`` when it has one (no copy), else ``read(n)``. An
    exception from the input itself (a malformed chunk, a client that left)
    marks the body ``failed``: that request is the server's to answer. A body
    sent with Transfer-Encoding to a server that neither decodes it nor says
    where it ends (wsgiref.simple_server) is refused with 411, not taken as empty.
    """

    def __init__(self, environ, limit):
        self._input = environ["wsgi.input"]
        self._readinto = getattr(self._input, "readinto", None)
        self.length = content_length(environ)
        if environ.get("wsgi.input_terminated") and not self.length:
            # Read to the end of the input: a length of 0 beside it (a chunked
            # body, as Werkzeug passes one) says nothing of its size.
            self._remaining = self.length = None
        elif self.length is None and "HTTP_TRANSFER_ENCODING" in environ:
            # The server passes a body it has not decoded, and says not where it ends.
            raise HTTPError(411, "this server cannot read a body without Content-Length; "
                                 "send Content-Length")
        else:
            self._remaining = self.length or 0
        self.limit = limit
        self.received = 0
        self.failed = False

    def readinto(self, buffer):
        wanted = len(buffer)
        if self._remaining is not None:
            wanted = min(wanted, self._remaining)
        else:
            wanted = min(wanted, self.limit + 1 - self.received)
        if wanted <= 0:
            return 0
        count = self._input_call(self._fill, memoryview(buffer)[:wanted])
        self._account(count)
        return count

    def read(self):
        """Everything left; a Content-Length body in one allocation."""
        if self._remaining is None:
            return storage.read_to_end(self, BODY_BLOCK_BYTES)
        parts = []
        while self._remaining:   # once, unless the server returns less than asked
            part = self._input_call(self._input.read, self._remaining)
            self._account(len(part))
            parts.append(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _fill(self, view):
        if self._readinto is not None:
            return self._readinto(view)
        data = self._input.read(len(view))
        view[:len(data)] = data
        return len(data)

    def _input_call(self, function, argument):
        try:
            return function(argument)
        except Exception:
            self.failed = True
            raise

    def _account(self, count):
        if self._remaining is not None:
            if not count:
                self.failed = True
                raise http11.ClientDisconnected("request body ended before its Content-Length")
            self._remaining -= count
        self.received += count
        if self.received > self.limit:
            raise HTTPError(413, "object larger than the %d-byte limit" % self.limit)


def content_length(environ):
    """CONTENT_LENGTH as a number; None when absent or empty (PEP 3333)."""
    value = environ.get("CONTENT_LENGTH", "")
    if not value:
        return None
    try:
        return http11.parse_content_length(value)
    except http11.InvalidFraming:
        raise HTTPError(400, "invalid Content-Length %r" % value[:100]) from None


class Request:
    """One request as the application sees it: method, target, body; its
    header fields are ``environ["HTTP_..."]`` (PEP 3333)."""

    def __init__(self, environ, max_object_size):
        self.environ = environ
        self.method = environ["REQUEST_METHOD"]
        self.target = request_target(environ)
        self.query = ""   # set by routing
        self.lfs = is_lfs_target(self.target)   # git-lfs reads its errors: LFS error bodies
        self.body = BodySource(environ, max_object_size)



REPEATED_CREDENTIALS = re.compile(r",[ \t]*(?=(?:basic|bearer)[ \t])", re.IGNORECASE)


def authorization(environ):
    """``(scheme in lowercase, credentials)`` from the Authorization field,
    ``("", "")`` without one. A client may send the field twice (git-lfs sends
    an action's header and a configured ``http.extraHeader`` both), which a
    server joins with a comma: identical values count as one, different ones
    are a 400. Only a comma before a scheme separates values (a token may hold
    commas, never spaces)."""
    values = set()
    for value in REPEATED_CREDENTIALS.split(environ.get("HTTP_AUTHORIZATION", "")):
        scheme, _, credentials = value.strip(http11.WHITESPACE).partition(" ")
        values.add((scheme.lower(), credentials.strip(http11.WHITESPACE)))
    if len(values) > 1:
        raise HTTPError(400, "the Authorization field is given twice, with different values")
    return values.pop()


def is_lfs_target(target):
    """True for a request target under ``/lfs/`` (origin or absolute form)."""
    if not target.startswith("/"):
        target = "/" + target.partition("://")[2].partition("/")[2]
    return target.startswith("/lfs/")


def basic_credentials(encoded):
    """``(user, password)`` as bytes from Basic credentials (RFC 7617);
    ``(b"", b"")`` if they are not base64."""
    try:
        decoded = binascii.a2b_base64(encoded.encode("latin-1"))
    except (binascii.Error, UnicodeEncodeError):
        return b"", b""
    user, _, password = decoded.partition(b":")
    return user, password


def request_target(environ):
    """The target as the client sent it, so that ``a%2Fb`` stays one segment:
    REQUEST_URI or RAW_URI when the server gives one (and the application is
    mounted at the root), else rebuilt from PATH_INFO and QUERY_STRING."""
    raw = environ.get("REQUEST_URI") or environ.get("RAW_URI")
    if raw and not environ.get("SCRIPT_NAME"):
        return raw
    path = urllib.parse.quote(environ.get("PATH_INFO", "").encode("latin-1"), safe="/")
    query = environ.get("QUERY_STRING", "")
    return path + ("?" + query if query else "")


def parse_target(target):
    """Map a request target to ``(route, arguments, query)``; route is None if unknown.

    Accepts origin-form and absolute-form (RFC 9112 §3.2). Each segment is
    percent-decoded on its own, so ``a%2Fb`` stays one segment. The query is
    returned raw; only the routes that take parameters read it.
    """
    if not target.isascii():
        raise HTTPError(400, "request target must be ASCII; percent-encode other bytes")
    if not target.startswith("/"):
        scheme, _, rest = target.partition("://")
        if scheme.lower() not in ("http", "https") or not rest:
            raise HTTPError(400, "invalid request target %r" % target[:200])
        target = "/" + rest.partition("/")[2]
    path, _, query = target.partition("?")
    if path in FIXED_ROUTES:
        return FIXED_ROUTES[path], (), query
    segments = path.split("/")[1:]
    for route, template in TEMPLATED_ROUTES:
        if len(template) == len(segments) and "" not in segments and all(
                part.startswith("{") or part == segment for part, segment in zip(template, segments)):
            break
    else:
        return None, (), query
    try:
        arguments = [urllib.parse.unquote(segment, errors="strict") if "%" in segment else segment
                     for part, segment in zip(template, segments) if part.startswith("{")]
    except UnicodeDecodeError:
        raise HTTPError(400, "path segments must be percent-encoded UTF-8") from None
    return route, arguments, query


def parse_listing_query(query):
    """``(limit, after)`` from a listing's query string; 400 if either is malformed."""
    try:
        fields = urllib.parse.parse_qs(query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise HTTPError(400, "query must be percent-encoded UTF-8") from None
    for name in ("limit", "after"):
        if len(fields.get(name, ())) > 1:
            raise HTTPError(400, "query parameter %r given more than once" % name)
    limit_text = fields.get("limit", [str(DEFAULT_LIST_LIMIT)])[0]
    if not (limit_text.isascii() and limit_text.isdigit() and len(limit_text) <= 6
            and 1 <= int(limit_text) <= MAX_LIST_LIMIT):
        raise HTTPError(400, "limit must be a whole number from 1 to %d" % MAX_LIST_LIMIT)
    after = fields.get("after", [None])[0]
    if after is not None:
        after = storage.canonical_oid(after)
        if after is None:
            raise HTTPError(400, "after must be an object id (64 hex digits)")
    return int(limit_text), after


def parse_range(value, size):
    """Return ``(first, last)`` byte positions for a single-range Range value,
    or None to send the whole object (RFC 9110 §14.2: a server may ignore
    ranges it does not support, here several ranges or a malformed value).
    The unit is case-insensitive; a last position past the end is clamped,
    however many digits it has (§14.1.2). Raise RangeNotSatisfiable if the
    range starts beyond the object. Linear in the value's length."""
    unit, equals, spec = value.partition("=")
    first, dash, last = spec.partition("-")
    first, last = first.strip(http11.WHITESPACE), last.strip(http11.WHITESPACE)
    if (not equals or not dash or unit.strip(http11.WHITESPACE).lower() != "bytes"
            or not all(text == "" or (text.isascii() and text.isdigit()) for text in (first, last))):
        return None
    if not first:
        if not last:
            return None
        suffix = _position(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable()
        return max(0, size - suffix), size - 1
    start = _position(first)
    if last and _position(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable()
    return start, size - 1 if not last else min(_position(last), size - 1)


def _position(digits):
    """A byte position from its digits; any past 2**63 is past every object
    (and ``int()`` refuses strings of thousands of digits)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 19 else 1 << 64


# entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE (RFC 9110 §8.8.3); a comma may be
# inside one, so a list is read by its quotes, not split at commas.
_ENTITY_TAG = r'(?:W/)?"[\x21\x23-\x7e\x80-\xff]*"'
# #entity-tag: elements separated by commas and OWS; empty ones allowed (§5.6.1).
_ENTITY_TAG_LIST = re.compile(r"[ \t,]*{0}(?:[ \t]*,[ \t,]*{0})*[ \t,]*".format(_ENTITY_TAG))
_ENTITY_TAG_PARTS = re.compile(r'(W/)?("[^"]*")')


def entity_tags(value):
    """The entity-tags of an If-Match or If-None-Match value, as ``(weak,
    quoted tag)`` pairs; None for ``*``. A value that is neither ``*`` nor a
    list of entity-tags (``w/"x"``, ``"x", *``) matches nothing: If-Match then
    fails, as it must when the client's condition cannot be read."""
    if value.strip(http11.WHITESPACE) == "*":
        return None
    if not _ENTITY_TAG_LIST.fullmatch(value):
        return []
    return [(bool(weak), tag) for weak, tag in _ENTITY_TAG_PARTS.findall(value)]


def etag_matches(if_none_match, etag):
    """Weak comparison of an If-None-Match value with our ETag (RFC 9110 §13.1.2)."""
    tags = entity_tags(if_none_match)
    return tags is None or any(tag == etag for _, tag in tags)


def etag_matches_strongly(if_match, etag):
    """Strong comparison of an If-Match value with the ETag of an existing
    object (RFC 9110 §13.1.1): ``*``, or our ETag itself, never a weak one."""
    tags = entity_tags(if_match)
    return tags is None or (False, etag) in tags


class FileSlice:
    """``count`` bytes of a stored object's file from position ``first``: a
    response body that iterates in blocks, and a file (``read``, ``seek``,
    ``tell``, ``fileno``) for ``wsgi.file_wrapper``, so that a server that
    sends files with ``sendfile`` can, and one that reads them stops at the
    slice's end. Positions are the file's own. Closing it closes the object."""

    def __init__(self, stored, first, count):
        self._stored = stored
        self.file = stored.file
        self.end = first + count
        self.file.seek(first)

    def read(self, size=-1):
        left = self.end - self.file.tell()
        data = self.file.read(left if size is None or size < 0 else min(size, left))
        if not data and left > 0:
            raise OSError("stored object shorter than its recorded size")
        return data

    def __iter__(self):
        while True:
            block = self.read(BODY_BLOCK_BYTES)
            if not block:
                return
            yield block

    def seek(self, position, whence=0):
        return self.file.seek(position, whence)

    def tell(self):
        return self.file.tell()

    def fileno(self):
        return self.file.fileno()

    def close(self):
        self._stored.close()


class CheckedObject(FileSlice):
    """Bytes of a stored object that go out only as far as they have been
    checked, so that a damaged object never arrives complete: the response is
    cut short at the damage instead, and ``on_damage()`` is called.

    With the object's recorded block checksums (``stored.checksums``) each
    block is checked before it goes out, and any range can be checked. An
    object without them is checked against its oid: then only the whole, and
    all but its last block may go out before the digest of the whole matches.

    ``checked_spans()`` says which spans of the file may go out when, for a
    server that sends them itself with sendfile (our gateway, which says so
    with ``environ[gateway.CHECKED_SPANS_KEY]``); read as an iterable it
    yields those spans' bytes."""

    def __init__(self, stored, first, count, oid, on_damage):
        super().__init__(stored, first, count)
        self._first = first
        self._oid = oid
        self._on_damage = on_damage
        self._checksums = stored.checksums
        # The bytes that may go out before any check end here.
        self._unchecked_end = first if self._checksums else self.end - min(BODY_BLOCK_BYTES, count)

    def __iter__(self):
        for offset, count in self.checked_spans():
            self.file.seek(offset)
            end = offset + count
            while self.file.tell() < end:
                block = self.file.read(min(BODY_BLOCK_BYTES, end - self.file.tell()))
                if not block:
                    raise OSError("stored object shorter than its recorded size")
                yield block

    def checked_spans(self):
        """``(offset, count)`` spans of the file, in order, that together make
        the body; each may go out once yielded. Raises OSError where the bytes
        fail their check (once ``on_damage()`` has been called), or cannot be
        checked."""
        checker = _Checker(self.file.fileno(), self._first, self.end, self._oid, self._checksums)
        if self._checksums:
            one_step = sum(1 for _ in self._checksums.blocks(self._first, self.end)) == 1
        else:
            one_step = self._unchecked_end == 0
        if one_step:
            checker.run()   # here and now: a thread would cost more than it saves
        else:
            checker.start()
        sent = self._first
        try:
            if self._unchecked_end > sent:
                yield sent, self._unchecked_end - sent
                sent = self._unchecked_end
            while sent < self.end:
                checked = checker.wait_beyond(sent)
                if checked is None:
                    if checker.failure is not None:
                        raise OSError("object %s could not be checked: %r" % (
                            self._oid, checker.failure))
                    self._on_damage()
                    raise OSError("object %s failed its integrity check; the response was cut "
                                  "short" % self._oid)
                yield sent, checked - sent
                sent = checked
        finally:
            checker.stop()


class _Checker(threading.Thread):
    """Checks bytes ``first:end`` of a file: each block against its recorded
    CRC (``recorded``, checksums.BlockChecksums), at most READ_AHEAD_BLOCKS
    ahead of what has been sent (the window between a block's check and its
    sending stays short), or, without them, the whole file against ``oid``;
    ``wait_beyond`` says how far it has got. It reads with pread from a
    descriptor of its own (the file's position belongs to the sender, and the
    sender may close the file before this ends); zlib, hashlib and reads
    release the GIL, so it runs beside sendfile. A mismatch or a read error
    is damage; any other failure (``failure``) only stops the check."""

    READ_BYTES = 1 << 20
    READ_AHEAD_BLOCKS = 4

    def __init__(self, fd, first, end, oid, recorded):
        super().__init__(daemon=True)
        self._fd = os.dup(fd)
        self._first, self._end = first, end
        self._oid = oid
        self._recorded = recorded
        self._progress = threading.Condition()
        self._checked = first   # bytes up to here are known good
        self._sent = first      # and up to here have been sent
        self._finished = False
        self._stopping = False
        self.failure = None

    def start(self):
        try:
            super().start()
        except BaseException:   # no thread to be had: nothing will close the descriptor
            os.close(self._fd)
            raise

    def run(self):
        try:
            if self._recorded:
                self._check_blocks()
            else:
                self._check_digest()
        except OSError:
            pass   # unreadable: damage
        except BaseException as error:
            self.failure = error
        finally:
            os.close(self._fd)
            with self._progress:
                self._finished = True
                self._progress.notify_all()

    def wait_beyond(self, offset):
        """Say that the bytes up to ``offset`` have been sent, and wait until
        those known good reach past it: return how far they reach, or None if
        the check ended first (damage, or ``failure``)."""
        with self._progress:
            self._sent = offset
            self._progress.notify_all()
            self._progress.wait_for(lambda: self._checked > offset or self._finished)
            return self._checked if self._checked > offset else None

    def stop(self):
        """Stop reading soon: nobody waits for the rest."""
        with self._progress:
            self._stopping = True
            self._progress.notify_all()

    def _check_blocks(self):
        ahead = self.READ_AHEAD_BLOCKS * self._recorded.block_size
        for offset, count, crc in self._recorded.blocks(self._first, self._end):
            with self._progress:
                self._progress.wait_for(lambda: offset < self._sent + ahead or self._stopping)
            if self._stopping or self._read(offset, count, zlib.crc32, 0) != crc:
                return
            with self._progress:
                self._checked = min(offset + count, self._end)
                self._progress.notify_all()

    def _check_digest(self):
        digest = hashlib.sha256()
        self._read(0, self._end, lambda data, digest: digest.update(data) or digest, digest)
        if not self._stopping and digest.hexdigest() == self._oid:
            with self._progress:
                self._checked = self._end
                self._progress.notify_all()

    def _read(self, offset, count, fold, value):
        """``value`` folded with ``fold(data, value)`` over the bytes
        ``offset:offset + count``, read a block at a time."""
        buffer = bytearray(min(self.READ_BYTES, count))
        view = memoryview(buffer)
        end = offset + count
        while offset < end and not self._stopping:
            got = _pread_into(self._fd, view[:min(len(buffer), end - offset)], offset)
            if not got:
                raise OSError("stored object shorter than its recorded size")
            value = fold(view[:got], value)
            offset += got
        return value


def _pread_into(fd, view, offset):
    """Read into ``view`` at ``offset``: preadv where there is one (no copy), else pread."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[:len(data)] = data
    return len(data)


class CheckedStream(FileSlice):
    """Bytes ``first:first + count`` of a stored object read once from a
    stream (the S3 store's), checked as they are read, so that a damaged
    object never arrives complete: the response is cut short instead, and
    ``on_damage()`` is called.

    With the object's recorded block checksums (``stored.checksums``) each
    block is checked before any of it is yielded, and any range can be
    checked: the stream then runs from the start of the range's first block
    to the end of its last. Without them only the whole object can be, against
    its oid: its last block is yielded only once the digest of the whole
    matches.

    ``begin()``, called before the response begins, reads until the first
    bytes that may go out, so that damage found by then raises
    IntegrityFailure there, and can be answered with a status; later damage
    raises it as the body is iterated. Reading, checking and sending take
    turns in one thread: measured on two busy cores (engine, client and
    service), a reader thread of its own only added thread switches and cost
    3-7% of the throughput."""

    READ_BYTES = 1 << 20   # a block, checked against the oid

    def __init__(self, stored, first, count, oid, on_damage):
        self._recorded = stored.checksums
        self._first, self._body_end = first, first + count
        stream_first, stream_end = first, first + count
        if self._recorded:   # whole blocks, to check them
            block_size = self._recorded.block_size
            stream_first = first - first % block_size
            stream_end = min(stored.size, -(-stream_end // block_size) * block_size)
        super().__init__(stored, stream_first, stream_end - stream_first)
        self._oid = oid
        self._on_damage = on_damage

    def begin(self):
        """Read until the first bytes that may go out (see the class's
        docstring); StoreUnavailable if the stream fails before, as when it
        cannot start."""
        self._blocks = self._blocks_to_send()
        try:
            self._head = next(self._blocks, None)
        except IntegrityFailure:
            raise
        except OSError as error:
            raise storage.StoreUnavailable("reading object %s from the store failed (%s); "
                                           "retry" % (self._oid, error)) from None

    def __iter__(self):
        if self._head is not None:
            yield self._head
        yield from self._blocks

    def _blocks_to_send(self):
        if self._recorded:
            for offset, count, crc in self._recorded.blocks(self._first, self._body_end):
                block = self._read_exactly(count)
                if zlib.crc32(block) != crc:
                    self._fail()
                if offset < self._first or offset + count > self._body_end:   # a range's edge
                    block = block[max(0, self._first - offset):self._body_end - offset]
                yield block
            return
        digest, held = hashlib.sha256(), None
        for block in iter(lambda: self.read(self.READ_BYTES), b""):
            digest.update(block)
            if held is not None:
                yield held
            held = block
        if digest.hexdigest() != self._oid:
            self._fail()
        if held is not None:
            yield held

    def _fail(self):
        raise IntegrityFailure(self._oid, sound=not self._on_damage())

    def _read_exactly(self, count):
        block = self.read(count)
        while len(block) < count:   # rare: a stream's read gives what it has
            block += self.read(count - len(block))
        return block


def has_descriptor(file):
    """True if ``file`` is an operating system file (sendfile and pread work on it)."""
    try:
        file.fileno()
    except (AttributeError, OSError):   # io.UnsupportedOperation is an OSError
        return False
    return True


# The application ---------------------------------------------------------------------

class DataStorageServer:
    """The data storage service as a WSGI (PEP 3333) application.

    ``DataStorageServer()`` serves a fresh, empty in-memory store;
    ``DataStorageServer(data_dir="DIR")`` the durable disk store in DIR; or pass
    any store from ``storage``. Keyword arguments only, with literal values, so
    that a server's factory syntax works:
    ``gunicorn -w 4 'server:DataStorageServer(data_dir="./data")'``.
    ``metrics``: a ``metrics.Metrics`` to count into (``--workers`` gives each
    worker a slot of one shared board), else one of its own; an S3 store's
    calls to its engine are counted there too, unless its client reports
    them elsewhere already.

    It reads ``wsgi.input`` (see BodySource), streams stored objects through
    ``wsgi.file_wrapper`` when the server offers one, sends no hop-by-hop
    header fields, and answers every error in JSON. An exception raised by
    ``wsgi.input`` itself propagates: the server knows what went wrong there.
    """

    routes = {   # route -> method -> handler; openapi.json describes exactly these
        "health": {"GET": "get_health", "HEAD": "get_health"},
        "metrics": {"GET": "get_metrics", "HEAD": "get_metrics"},
        "openapi": {"GET": "get_openapi", "HEAD": "get_openapi"},
        "repository": {"GET": "list_objects", "HEAD": "list_objects", "PUT": "put_object"},
        "object": {"GET": "get_object", "HEAD": "get_object",
                   "PUT": "put_object", "DELETE": "delete_object"},
        "lfs-batch": {"POST": "lfs_batch"},
        "lfs-verify": {"POST": "lfs_verify"},
        "lfs-locks": {"GET": "lfs_list_locks", "POST": "lfs_create_lock"},
        "lfs-locks-verify": {"POST": "lfs_verify_locks"},
        "lfs-unlock": {"POST": "lfs_unlock"},
    }
    public_routes = frozenset({"health"})   # answered without a token, for load balancers

    def __init__(self, store=None, *, data_dir=None, max_object_size=DEFAULT_MAX_OBJECT_SIZE,
                 max_total_size=None, auth_token=None, public_url=None, s3_endpoint=None,
                 spool_dir=None, group_commit=None, s3_timeout=None, metrics=None):
        if isinstance(store, str):   # "memory", or "s3://BUCKET[/PREFIX]"
            store = open_store(data_dir, max_total_size, store, s3_endpoint, spool_dir,
                               group_commit, s3_timeout)
        elif store is not None and any(setting is not None for setting in (
                data_dir, max_total_size, group_commit, s3_endpoint, spool_dir, s3_timeout)):
            raise ValueError("data_dir, max_total_size, group_commit, s3_endpoint, spool_dir "
                             "and s3_timeout open a store: pass them or a store")
        if auth_token is not None and not valid_token(auth_token):
            raise ValueError("auth_token must be printable ASCII without spaces, not empty")
        if public_url is not None and not valid_public_url(public_url):
            raise ValueError("public_url must be an http:// or https:// URL without query")
        self.store = store if store is not None else open_store(
            data_dir, max_total_size, s3_endpoint=s3_endpoint, spool_dir=spool_dir,
            group_commit=group_commit, s3_timeout=s3_timeout)
        self.metrics = metrics_module.Metrics() if metrics is None else metrics
        client = getattr(self.store, "client", None)   # the S3 store's engine
        if client is not None and client.on_call is None:
            client.on_call = self.metrics.store_call
        self.locks = lfs.open_locks(self.store)
        self.max_object_size = max_object_size
        self.auth_token = auth_token.encode() if auth_token is not None else None
        self.public_url = public_url.rstrip("/") if public_url is not None else None
        # Shared caches may keep an object only when anyone may read it.
        self.object_caching = ("Cache-Control", "%s, %s" % (
            "private" if self.auth_token else "public", OBJECT_LIFETIME))
        with open(OPENAPI_PATH, "rb") as document:
            self.openapi_document = document.read()
        self.openapi_etag = '"%s"' % hashlib.sha256(self.openapi_document).hexdigest()

    def __call__(self, environ, start_response):
        """Answer one request; it is counted in the metrics as its response is handed over."""
        started = time.monotonic()
        self.metrics.request_started()
        try:
            response, request = self._respond(environ)
        except BaseException:
            self.metrics.request_handed_back()
            raise
        headers, body = self._body_of(environ, response)
        self.metrics.request_ended(environ["REQUEST_METHOD"], response.status,
                                   time.monotonic() - started,
                                   request.body.received if request else 0,
                                   response.length if body != [b""] else 0)
        start_response(http11.status_line(response.status), headers)
        return body

    def close(self):
        """Release the store (its temporary files, for the disk store)."""
        self.store.close()

    def _respond(self, environ):
        """``(response, request)``, the request None if it could not be read;
        every exception but the input's own becomes a JSON error."""
        request = None
        lfs_errors = is_lfs_target(request_target(environ))   # also for a request not read
        try:
            request = Request(environ, self.max_object_size)
            return self._route(request), request
        except lfs.LFSError as error:
            return lfs_response(error.status, error.document()), request
        except HTTPError as error:
            status, message, headers = error.status, str(error), error.headers
        except storage.StoreError as error:
            status, message = STORE_ERROR_STATUS.get(type(error), 500), str(error)
            headers = [RETRY_LATER] if status == 503 else []
            if status >= 500:   # the storage's condition, for the operator to see
                environ["wsgi.errors"].write("store error in %s %r: %s\n" % (
                    environ["REQUEST_METHOD"], request_target(environ)[:200], error))
        except Exception:
            if request is not None and request.body.failed:
                raise
            environ["wsgi.errors"].write("unexpected error in %s %r:\n%s" % (
                environ["REQUEST_METHOD"], request_target(environ)[:200], traceback.format_exc()))
            status, message, headers = 500, "internal server error", []
        if lfs_errors:   # the same error, as git-lfs reads errors
            response = lfs_response(status, {"message": message}, headers)
        else:
            response = Response.error(status, message, headers)
        return response, request

    @staticmethod
    def _body_of(environ, response):
        """``(headers, iterable)``: the response's Content-Length added, and its
        body as PEP 3333 wants it (none for HEAD: the server sends none)."""
        body = response.body
        if environ["REQUEST_METHOD"] == "HEAD":
            if isinstance(body, FileSlice):
                body.close()
            body = b""
        elif isinstance(body, CheckedStream):
            pass   # read here, as it is checked: never a file for the server to send itself
        elif isinstance(body, CheckedObject):
            if environ.get(gateway.CHECKED_SPANS_KEY) and "wsgi.file_wrapper" in environ:
                body = environ["wsgi.file_wrapper"](body, BODY_BLOCK_BYTES)   # sent by spans
            # Elsewhere the body is read here, as it is checked (a server that
            # sends a file_wrapper's file itself would send it unchecked).
        elif isinstance(body, FileSlice):
            wrapper = environ.get("wsgi.file_wrapper")
            body = wrapper(body, BODY_BLOCK_BYTES) if wrapper else body
        headers = response.headers + [("Content-Length", str(response.length))]
        return headers, [body] if isinstance(body, bytes) else body

    def _route(self, request):
        route, arguments, request.query = parse_target(request.target)
        if (self.auth_token is not None and route not in self.public_routes
                and not self._authorized(request)):
            raise HTTPError(401, "missing or wrong token (Bearer, or the password of Basic)", [
                ("WWW-Authenticate", 'Bearer realm="data-storage"'),
                # git-lfs asks git's credential helpers for Basic credentials.
                *([("LFS-Authenticate", 'Basic realm="data-storage"')] if request.lfs else [])])
        if route is None:
            raise HTTPError(404, "no such resource: %s" % request.target[:200])
        methods = self.routes[route]
        handler = methods.get(request.method)
        if handler is None:
            # Also for methods we have never heard of: the resource exists and
            # Allow says what it supports (RFC 9110 §15.5.6).
            raise HTTPError(405, "method %s not allowed here" % request.method[:40],
                            [("Allow", ", ".join(methods))])
        return getattr(self, handler)(request, *arguments)

    def _authorized(self, request):
        """Check the token in constant time: ``Authorization: Bearer <token>``
        (RFC 6750 §2.1), or the password of Basic credentials with any user
        name (RFC 7617), for git's credential helpers and git-lfs."""
        scheme, secret = authorization(request.environ)
        if scheme == "basic":
            secret = basic_credentials(secret)[1]
        elif scheme == "bearer":
            secret = secret.encode("latin-1")
        else:
            return False
        return hmac.compare_digest(secret, self.auth_token)

    # Route handlers -------------------------------------------------------

    def put_object(self, request, repository, oid=None):
        """Store the body; with an oid in the path, only if the body hashes to it
        (and, with If-Match, only if the object is stored already; with
        If-None-Match, only if it is not)."""
        length = request.body.length
        if length is not None and length > self.max_object_size:
            raise HTTPError(413, "object of %d bytes exceeds the %d-byte limit"
                            % (length, self.max_object_size))
        if oid is not None:
            self._check_if_match(request, repository, oid)
            self._check_if_none_match(request, repository, oid)
        oid, size = self.store.put(repository, request.body, expected_oid=oid, length=length)
        return Response.json(201, {"oid": oid, "size": size},
                             [("Location", "/data/%s/%s" % (repository, oid))])

    def get_object(self, request, repository, oid):
        """The object (GET) or its headers (HEAD), honouring If-Match,
        If-None-Match (RFC 9110 §13.1) and a single byte Range (RFC 9110 §14).
        A GET without any of them reads it whole: the store is told so."""
        environ = request.environ
        stored = self.store.open(repository, oid, whole=request.method == "GET" and not any(
            name in environ for name in ("HTTP_RANGE", "HTTP_IF_MATCH", "HTTP_IF_NONE_MATCH")))
        try:
            self._check_if_match(request, repository, oid, stored)
            return self._object_response(request, stored, repository, oid.lower())
        except BaseException:
            stored.close()
            raise

    def _object_response(self, request, stored, repository, oid):
        """The response for an open object: its bytes when small (and the
        object closed), else a FileSlice that closes it when done. Bytes that
        may have changed at rest are checked before they go out: a small
        object whole, here, against its oid; a large one as it is sent
        (CheckedObject, or CheckedStream from a store without files); any
        range of an object with recorded checksums by the blocks it touches
        (the only place its checksums are asked for: HEAD needs none).
        Ranges of large objects without them are not checked (that would take
        reading the whole)."""
        size = stored.size
        etag = '"%s"' % oid
        headers = [("ETag", etag), ("Accept-Ranges", "bytes"), self.object_caching]
        if_none_match = request.environ.get("HTTP_IF_NONE_MATCH")
        if if_none_match is not None and etag_matches(if_none_match, etag):
            stored.close()
            return Response(304, headers, length=size)
        first, last, status = 0, size - 1, 200
        range_value = request.environ.get("HTTP_RANGE")
        if (range_value is not None and request.method == "GET"
                and request.environ.get("HTTP_IF_RANGE", etag) == etag):
            try:
                selected = parse_range(range_value, size)
            except RangeNotSatisfiable:
                raise HTTPError(416, "range %s not satisfiable for %d bytes"
                                % (range_value[:100], size),
                                [("Content-Range", "bytes */%d" % size)]) from None
            if selected is not None:
                (first, last), status = selected, 206
                headers.append(("Content-Range", "bytes %d-%d/%d" % (first, last, size)))
        headers.append(("Content-Type", "application/octet-stream"))
        count = last - first + 1
        checked = stored.may_change_at_rest
        whole = checked and size <= INLINE_BODY_BYTES   # read whole, checked here
        local = has_descriptor(stored.file)   # a file to pread and sendfile, not a stream
        recorded = None
        if request.method == "GET" and checked and not whole:
            recorded = stored.checksums   # asked for only here: a store may fetch them
            if recorded and recorded.size != size:
                self._failed_check(request, repository, oid, stored)   # truncated, or grown
                recorded = stored.checksums = None   # they were wrong (and are mended)
        if request.method == "GET" and not whole and (count > INLINE_BODY_BYTES or recorded):
            damaged = functools.partial(self._damaged, request.environ, repository, oid,
                                        stored.file)
            if checked and (recorded or count == size):
                body = (CheckedObject if local else CheckedStream)(stored, first, count, oid,
                                                                   damaged)
            else:
                body = FileSlice(stored, first, count)
            start = getattr(stored.file, "start", None)   # a stream from a store's engine
            try:   # the engine's GET, now: its failure is a status, not a cut response
                if start is not None:
                    start(body.end)
                if isinstance(body, CheckedStream):
                    body.begin()   # and so is damage in its first block
            except IntegrityFailure as failure:
                body.close()
                raise self._integrity_error(oid, failure.sound) from None
            except BaseException:
                body.close()
                raise
            return Response(status, headers, body, length=count)
        with stored:
            if request.method == "HEAD":
                return Response(status, headers, length=count)
            if not whole:
                stored.file.seek(first)   # a whole object is read from 0, where it starts
            body = stored.file.read(size if whole else count)
            if whole and hashlib.sha256(body).hexdigest() != oid:
                self._failed_check(request, repository, oid, stored)
                raise self._integrity_error(oid, sound=True)   # it changed between two reads
            if whole:
                stored.checked(body)   # the store may serve it from memory from now on
        body = body[first:first + count] if whole else body
        if len(body) != count:
            raise OSError("stored object shorter than its recorded size")
        return Response(status, headers, body)

    def _failed_check(self, request, repository, oid, stored):
        """Take a damaged object out of service, close it, and answer 500;
        return if the store finds it sound after all."""
        if not self._damaged(request.environ, repository, oid, stored.file):
            return
        stored.close()
        raise self._integrity_error(oid, sound=False)

    @staticmethod
    def _integrity_error(oid, sound):
        """The answer to a read whose bytes failed their check before any went out."""
        if sound:
            return HTTPError(503, "object %s failed a check but was not found damaged; retry"
                             % oid, [RETRY_LATER])
        return HTTPError(500, "object %s failed its integrity check and was taken out of "
                              "service; upload it again" % oid)

    def _damaged(self, environ, repository, oid, file):
        """An object's bytes (``file``) failed their check: quarantine the
        object and say so. True if it was damaged; False if the store found
        it sound after all (its block checksums were wrong, and are mended),
        or could not read it again to know (it is left in place)."""
        try:
            moved_to = self.store.quarantine(repository, oid, file)
        except storage.StoreUnavailable as error:
            environ["wsgi.errors"].write("object %s/%s failed a check and could not be read "
                                         "again (%s); left in place\n" % (repository, oid, error))
            return False
        except storage.StoreError as error:
            moved_to, where = "", "could not be moved: %s" % error
        else:
            where = "moved to %s" % moved_to
        if moved_to is None:
            environ["wsgi.errors"].write("object %s/%s: its block checksums were wrong and have "
                                         "been recorded anew; the object is sound\n" % (repository, oid))
            return False
        environ["wsgi.errors"].write("object %s/%s failed its integrity check; %s\n"
                                     % (repository, oid, where))
        return True

    def delete_object(self, request, repository, oid):
        """Remove the object; 404 if the repository does not hold it, 412 if
        If-Match names another or If-None-Match names it (or is ``*``)."""
        self._check_if_match(request, repository, oid)
        self._check_if_none_match(request, repository, oid)
        self.store.delete(repository, oid)
        return Response.json(200, {"deleted": oid.lower()})

    def _check_if_match(self, request, repository, oid, stored=None):
        """412 unless If-Match, when given, matches the stored object (RFC 9110
        §13.1.1); ``stored`` is the object if already open. The ETag of an
        object is its oid, so this asks whether that very object is stored."""
        if_match = request.environ.get("HTTP_IF_MATCH")
        if if_match is None:
            return
        if stored is None:
            try:
                self.store.open(repository, oid).close()
            except storage.ObjectNotFound:
                if request.method == "PUT":
                    raise HTTPError(412, "If-Match given, and the object is not stored") from None
                raise
        if not etag_matches_strongly(if_match, '"%s"' % oid.lower()):
            raise HTTPError(412, "If-Match does not match the object's ETag")

    def _check_if_none_match(self, request, repository, oid):
        """For a PUT or DELETE: 412 if If-None-Match, when given, is ``*`` or
        names the object's ETag, and the object is stored (RFC 9110 §13.1.2:
        a method other than GET or HEAD is then not performed)."""
        if_none_match = request.environ.get("HTTP_IF_NONE_MATCH")
        if if_none_match is None or not etag_matches(if_none_match, '"%s"' % oid.lower()):
            return
        try:
            self.store.open(repository, oid).close()
        except storage.ObjectNotFound:
            return
        raise HTTPError(412, "If-None-Match matches the stored object")

    def list_objects(self, request, repository):
        """A page of the repository's objects, sorted by oid: ``?limit=N&after=OID``."""
        limit, after = parse_listing_query(request.query)
        listed = self.store.list_objects(repository, after=after, limit=limit + 1)
        page = listed[:limit]
        return Response.json(200, {"objects": [{"oid": oid, "size": size} for oid, size in page],
                                   "next": page[-1][0] if len(listed) > limit else None})

    def get_health(self, request):
        """200 while serving; 503 once the server hosting us has begun to shut
        down, or while the store cannot be written, so balancers move away."""
        if request.environ.get(gateway.DRAINING_KEY):
            return Response.json(503, {"status": "draining"})
        if not self.store.writable():
            return Response.json(503, {"status": "not writable"})
        return Response.json(200, {"status": "ok"})

    def get_metrics(self, request):
        """Prometheus text exposition of the request metrics and the store's usage."""
        text = self.metrics.render(*(self.store.usage() or (None, None)))
        return Response(200, [("Content-Type", metrics_module.CONTENT_TYPE), NO_STORE], text.encode())

    def get_openapi(self, request):
        """The OpenAPI 3.1 description of this API, served as stored, with an
        ETag for revalidation."""
        headers = [("ETag", self.openapi_etag), ("Cache-Control", OPENAPI_LIFETIME)]
        if_none_match = request.environ.get("HTTP_IF_NONE_MATCH")
        if if_none_match is not None and etag_matches(if_none_match, self.openapi_etag):
            return Response(304, headers, length=len(self.openapi_document))
        return Response(200, [JSON, *headers], self.openapi_document)

    # Git LFS (the protocol is in lfs.py) ---------------------------------------

    def lfs_batch(self, request, repository):
        """The Batch API: actions on ``/data/<repository>/<oid>`` for each object."""
        document = self._lfs_document(request)
        storage.check_repository(repository)
        links = lfs.Links(self._base_url(request), repository, self._transfer_header(request))
        largest = self.max_object_size
        if isinstance(self.store, s3.S3Store):   # one PUT per object: none past S3's limit for it
            largest = min(largest, s3.MAX_SINGLE_PUT)
        return lfs_response(200, lfs.batch(self.store, document, links, largest))

    def lfs_verify(self, request, repository):
        """The verify action, after an upload: 200 if stored with that size."""
        return lfs_response(200, lfs.verify(self.store, repository, self._lfs_document(request)))

    def lfs_create_lock(self, request, repository):
        """Lock a path for the caller: 201, or 409 with the lock that holds it."""
        self._check_locking()
        path = lfs.lock_path(self._lfs_document(request))
        lock, created = self.locks.create(repository, path, self._lock_owner(request))
        if not created:
            return lfs_response(409, {"lock": lock, "message": "%s is already locked" % path})
        return lfs_response(201, {"lock": lock})

    def lfs_list_locks(self, request, repository):
        """A page of locks: ``?path=&id=&cursor=&limit=`` (``refspec`` is ignored:
        locks are per repository)."""
        self._check_locking()
        self._check_lfs_accept(request)
        try:
            fields = urllib.parse.parse_qs(request.query, errors="strict")
        except UnicodeDecodeError:
            raise lfs.LFSError(400, "query must be percent-encoded UTF-8") from None
        if any(len(values) > 1 for values in fields.values()):
            raise lfs.LFSError(400, "a query parameter is given more than once")
        field = {name: values[0] for name, values in fields.items()}.get
        locks, next_cursor = self.locks.find(repository, path=field("path"), lock_id=field("id"),
                                             cursor=field("cursor"),
                                             limit=lfs.lock_limit(field("limit")))
        return lfs_response(200, {"locks": locks, **(
            {"next_cursor": next_cursor} if next_cursor is not None else {})})

    def lfs_verify_locks(self, request, repository):
        """The locks that bear on a push, split into the caller's and others'."""
        self._check_locking()
        document = self._lfs_object(request)
        cursor = document.get("cursor")
        if cursor is not None and not isinstance(cursor, str):
            raise lfs.LFSError(422, "cursor must be a string")
        locks, next_cursor = self.locks.find(repository, cursor=cursor or None,
                                             limit=lfs.lock_limit(document.get("limit")))
        owner = self._lock_owner(request)
        return lfs_response(200, {
            "ours": [lock for lock in locks if lock["owner"]["name"] == owner],
            "theirs": [lock for lock in locks if lock["owner"]["name"] != owner],
            **({"next_cursor": next_cursor} if next_cursor is not None else {})})

    def lfs_unlock(self, request, repository, lock_id):
        """Remove a lock: the caller's own, or anyone's with ``"force": true``."""
        self._check_locking()
        force = self._lfs_object(request).get("force")
        if force is not None and not isinstance(force, bool):
            raise lfs.LFSError(422, "force must be true or false")
        lock = self.locks.unlock(repository, lock_id, self._lock_owner(request), bool(force))
        return lfs_response(200, {"lock": lock})

    def _lfs_document(self, request):
        """The JSON document of an LFS request: 406 if the client does not
        take LFS's media type, 415 unless sent as JSON, 413 past
        lfs.MAX_DOCUMENT_BYTES, 400 if malformed."""
        self._check_lfs_accept(request)
        media_type = request.environ.get("CONTENT_TYPE", "").partition(";")[0]
        if media_type.strip(http11.WHITESPACE).lower() not in (lfs.MEDIA_TYPE, "application/json"):
            raise lfs.LFSError(415, "send the request as %s" % lfs.MEDIA_TYPE)
        if (request.body.length or 0) > lfs.MAX_DOCUMENT_BYTES:
            raise lfs.LFSError(413, "request larger than %d bytes" % lfs.MAX_DOCUMENT_BYTES)
        block = bytearray(64 * 1024)
        # Not --max-object-size: the check is below, and the body's own (an
        # object's 413) must not come first, whatever a read brings.
        request.body.limit = lfs.MAX_DOCUMENT_BYTES + len(block)
        data = bytearray()
        for count in iter(lambda: request.body.readinto(block), 0):
            data += memoryview(block)[:count]
            if len(data) > lfs.MAX_DOCUMENT_BYTES:
                raise lfs.LFSError(413, "request larger than %d bytes" % lfs.MAX_DOCUMENT_BYTES)
        try:
            return json.loads(data, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as error:   # not UTF-8, not JSON, nested too deep
            raise lfs.LFSError(400, "malformed JSON: %s" % str(error)[:200]) from None

    def _check_locking(self):
        """404 where there are no locks to keep (git-lfs then goes on without:
        a push is not halted)."""
        if self.locks is None:
            raise lfs.LFSError(404, "file locking is not available with this store: locks kept "
                                    "by one instance would not bind the others")

    def _lfs_object(self, request):
        """The request's JSON document, which must be an object (422 if not),
        its ``ref`` too if it has one."""
        document = self._lfs_document(request)
        if not isinstance(document, dict):
            raise lfs.LFSError(422, "the request must be a JSON object")
        lfs.check_ref(document)
        return document

    @staticmethod
    def _check_lfs_accept(request):
        accept = request.environ.get("HTTP_ACCEPT")
        if accept is None:
            return
        media_types = {item.partition(";")[0].strip(http11.WHITESPACE).lower()
                       for item in accept.split(",")}
        if not media_types & {lfs.MEDIA_TYPE, "application/json", "application/*", "*/*"}:
            raise lfs.LFSError(406, "this API answers in %s" % lfs.MEDIA_TYPE)

    def _base_url(self, request):
        """The service's URL as the client reaches it: ``--public-url``, else
        the request's scheme and Host (PEP 3333's URL reconstruction)."""
        if self.public_url is not None:
            return self.public_url
        environ = request.environ
        scheme, _, rest = request.target.partition("://")
        if not request.target.startswith("/") and rest:   # absolute form: its authority wins
            return self._checked_base(scheme.lower(), rest.partition("/")[0])
        host = environ.get("HTTP_HOST")
        if not host:
            name = environ["SERVER_NAME"]
            host = "[%s]" % name if ":" in name else name
            if environ["SERVER_PORT"] != {"https": "443", "http": "80"}[environ["wsgi.url_scheme"]]:
                host += ":" + environ["SERVER_PORT"]
        return self._checked_base(environ["wsgi.url_scheme"], host)

    @staticmethod
    def _checked_base(scheme, host):
        if not HOST_PATTERN.fullmatch(host):
            raise lfs.LFSError(400, "invalid Host %r" % host[:100])
        return "%s://%s" % (scheme, host)

    def _transfer_header(self, request):
        """The header fields a transfer must carry: the batch's own credentials,
        when a token is required."""
        if self.auth_token is None:
            return {}
        scheme, credentials = authorization(request.environ)
        if scheme not in ("basic", "bearer"):
            return {}
        return {"Authorization": "%s %s" % (scheme.capitalize(), credentials)}

    @staticmethod
    def _lock_owner(request):
        """Who holds a lock: the user name of Basic credentials (git's
        credential helper, or ``http://NAME:TOKEN@host/lfs/R``), else anonymous."""
        scheme, credentials = authorization(request.environ)
        user = basic_credentials(credentials)[0] if scheme == "basic" else b""
        return user.decode("utf-8", "replace") or "anonymous"


def valid_public_url(url):
    """True for a URL that actions of Git LFS batches can start with: http or
    https, a host, a port if any in range, a path if any, nothing else."""
    if not (url.isascii() and url.isprintable()) or any(c in url for c in " ?#"):
        return False
    parsed = urllib.parse.urlsplit(url)
    try:
        parsed.port   # ValueError when out of range or not a number
    except ValueError:
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.hostname) and "@" not in parsed.netloc


def _refuse_constant(name):
    raise ValueError("%s is not JSON" % name)


def lfs_response(status, document, headers=()):
    """A Git LFS document (errors too: ``{"message": ...}``), in LFS's media type."""
    return Response(status, [("Content-Type", lfs.MEDIA_TYPE), NO_STORE, *headers],
                    json.dumps(document, allow_nan=False).encode())


def valid_token(token):
    """True for a token a client can send after ``Bearer `` as it is: printable
    ASCII without spaces (RFC 6750 §2.1 asks for less still)."""
    return bool(token) and token.isascii() and token.isprintable() and " " not in token


S3_ONLY = ("--s3-endpoint, --spool-dir and --s3-timeout are for an S3 store: give "
           "--store s3://BUCKET[/PREFIX]")


def open_store(data_dir=None, max_total_size=None, url=None, s3_endpoint=None, spool_dir=None,
               group_commit=None, s3_timeout=None, check=True):
    """The store to serve: the S3 store for ``url`` ``s3://BUCKET[/PREFIX]``
    (``check``ed: StoreUnavailable if the bucket cannot be used), the disk store
    in ``data_dir``, or a new in-memory store. ValueError for a combination
    that makes no sense. The disk store's uploads are made durable together
    (``storage.GroupCommit``) if ``group_commit``, by an fsync each if it is
    False, and by default (None) together where syncfs can be trusted with
    that (``storage.syncfs_durable``) on a filesystem of
    ``storage.GROUP_COMMIT_BY_DEFAULT``. Each connect, send and receive of a
    call to an S3 engine may take ``s3_timeout`` seconds (by default
    ``s3.DEFAULT_TIMEOUT``)."""
    if group_commit and data_dir is None:
        raise ValueError("--group-commit is for the disk store: give --data-dir")
    if group_commit and storage.SYNCFS is None:
        raise ValueError("--group-commit needs syncfs, which reports write errors on Linux "
                         "5.8 and later only")
    if url not in (None, "memory"):
        if data_dir is not None:
            raise ValueError("--data-dir and an S3 store are two stores: choose one")
        if max_total_size is not None:
            raise ValueError("--max-total-size cannot be kept for an S3 bucket: each process "
                             "would count only its own uploads")
        bucket, prefix = s3.parse_store_url(url)
        if spool_dir is not None and not os.path.isdir(spool_dir):
            raise ValueError("--spool-dir %s is not a directory" % spool_dir)
        credentials, region = s3.credentials_from_environment()
        endpoint = s3_endpoint or "https://s3.%s.amazonaws.com" % region
        timeout = s3.DEFAULT_TIMEOUT if s3_timeout is None else s3_timeout
        store = s3.S3Store(bucket, prefix, s3.Client(endpoint, region, credentials, timeout),
                           spool_dir)
        if check:
            store.check()
        return store
    if any(setting is not None for setting in (s3_endpoint, spool_dir, s3_timeout)):
        raise ValueError(S3_ONLY)
    if data_dir is not None:
        durable, kind = storage.syncfs_durable(data_dir)
        parent_exists = os.path.isdir(os.path.dirname(os.path.abspath(data_dir)))
        if group_commit and not durable and parent_exists:   # else the store says what is missing
            raise ValueError("--group-commit relies on syncfs, which makes data durable on %s; "
                             "this directory is on %s" % (", ".join(storage.SYNCFS_DURABLE),
                                                          kind or "a filesystem not known"))
        if group_commit is None:
            group_commit = durable and kind in storage.GROUP_COMMIT_BY_DEFAULT
        return storage.DiskStore(data_dir, max_total_size=max_total_size, sync_filesystem=(
            storage.SYNCFS if durable and group_commit else None))
    return storage.MemoryStore(max_total_size=max_total_size)


# The command line -------------------------------------------------------------------

def _byte_count(text):
    # int() alone would also take "+5", " 5 " and "1_0".
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError("expected a whole number, got %r" % text)
    return int(text)


MAX_SECONDS = 24 * 3600   # a timeout beyond it is a mistake (and from ~9e9 s, out of range)


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError("expected a positive number of seconds, at most %d "
                                         "(a day), got %r" % (MAX_SECONDS, text))
    return value


def _positive_count(text):
    value = _byte_count(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected at least 1")
    return value


def _worker_count(text):
    """A number of workers, or ``auto``: one per CPU this process may use."""
    if text == "auto":
        return workers.usable_cpus()
    return _positive_count(text)


def _port_number(text):
    value = _byte_count(text)
    if value > 65535:
        raise argparse.ArgumentTypeError("port %d is above 65535" % value)
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Content-addressed object storage over HTTP: PUT or list /data/REPO; "
                    "GET|HEAD|PUT|DELETE /data/REPO/OID; a Git LFS server at /lfs/REPO; "
                    "/healthz, /metrics, /openapi.json.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s; "
                             "0.0.0.0 or :: listens on all interfaces)")
    parser.add_argument("--port", type=_port_number, default=os.environ.get("PORT", str(DEFAULT_PORT)),
                        help="TCP port; 0 picks a free one (default: $PORT, else %d)" % DEFAULT_PORT)
    parser.add_argument("--max-object-size", type=_byte_count, default=DEFAULT_MAX_OBJECT_SIZE,
                        metavar="BYTES",
                        help="largest object accepted; larger uploads get 413 "
                             "(default: %(default)s, 1 GiB)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="keep objects durably in files under DIR (created if missing); "
                             "without it, objects live in memory and vanish on exit")
    parser.add_argument("--store", nargs="?", const="memory", metavar="URL",
                        help="where objects live: s3://BUCKET[/PREFIX] for an S3 bucket "
                             "(credentials from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                             "AWS_SESSION_TOKEN, AWS_REGION), or memory (also when given "
                             "without a value); --data-dir chooses the disk store")
    parser.add_argument("--s3-endpoint", metavar="URL",
                        help="the S3 engine's URL, e.g. http://127.0.0.1:8333 (default: AWS "
                             "in the region)")
    parser.add_argument("--s3-timeout", type=_seconds, metavar="SECONDS",
                        help="with an S3 store, how long each connect, send and receive of a "
                             "call to the engine may take before the call fails (default: %s)"
                             % s3.DEFAULT_TIMEOUT)
    parser.add_argument("--spool-dir", metavar="DIR",
                        help="with an S3 store, where uploads whose oid is not known yet are "
                             "held while they are hashed (default: the system's temporary "
                             "directory)")
    parser.add_argument("--group-commit", action=argparse.BooleanOptionalAction,
                        help="with --data-dir, make uploads durable in batches, by syncs of "
                             "the whole filesystem that concurrent uploads share, instead of "
                             "an fsync of each file and directory (default: on where syncfs "
                             "can be trusted with that: Linux 5.8+, on ext3/4, XFS or btrfs; "
                             "on request on overlayfs; see the README)")
    parser.add_argument("--max-total-size", type=_byte_count, metavar="BYTES",
                        help="quota on the bytes stored; uploads beyond it get 507 "
                             "(default: no quota)")
    parser.add_argument("--request-timeout", type=_seconds, default=gateway.DEFAULT_REQUEST_TIMEOUT,
                        metavar="SECONDS",
                        help="close a connection idle or stalled this long, mid-request "
                             "included (default: %(default)s)")
    parser.add_argument("--max-connections", type=_positive_count, default=gateway.DEFAULT_MAX_CONNECTIONS,
                        metavar="N",
                        help="connections served at once; idle keep-alive connections are "
                             "reclaimed first, then new ones get 503 (default: %(default)s)")
    parser.add_argument("--shutdown-timeout", type=_seconds, default=DEFAULT_SHUTDOWN_TIMEOUT,
                        metavar="SECONDS",
                        help="on SIGTERM/SIGINT, how long in-flight requests may take to "
                             "finish (default: %(default)s)")
    parser.add_argument("--auth-token", default=os.environ.get("DATA_STORAGE_TOKEN"),
                        metavar="TOKEN",
                        help="require 'Authorization: Bearer TOKEN' on every request "
                             "(default: $DATA_STORAGE_TOKEN; unset: no authentication)")
    parser.add_argument("--public-url", metavar="URL",
                        help="the service's URL as clients reach it (behind a proxy), for the "
                             "links in Git LFS batches (default: from each request's Host)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="access log: Common Log Format lines, or one JSON object per "
                             "line (default: %(default)s)")
    parser.add_argument("--log-level", choices=tuple(logs.LEVELS), default="info",
                        help="least severe service-log line written: start-up, warnings, "
                             "errors (default: %(default)s)")
    parser.add_argument("--workers", type=_worker_count, metavar="N",
                        help="serve from N processes sharing the listening socket (auto: one "
                             "per CPU this process may use); needs --data-dir or an S3 "
                             "--store, since processes cannot share memory (default: auto "
                             "with either where there is fork, else 1)")
    args = parser.parse_args(argv)
    if args.auth_token is not None and not valid_token(args.auth_token):
        parser.error("the token (--auth-token or DATA_STORAGE_TOKEN) must be printable ASCII "
                     "without spaces, and not empty (an empty one would turn authentication off)")
    if args.public_url is not None and not valid_public_url(args.public_url):
        parser.error("--public-url must be an http:// or https:// URL without query, "
                     "e.g. https://storage.example.com")
    s3_store = args.store not in (None, "memory")
    if not s3_store and any(setting is not None for setting in (
            args.s3_endpoint, args.spool_dir, args.s3_timeout)):
        parser.error(S3_ONLY)
    if s3_store and args.data_dir:
        parser.error("--data-dir and --store s3://... are two stores: choose one")
    if s3_store and args.max_total_size is not None:
        parser.error("--max-total-size cannot be kept for an S3 bucket: each process would "
                     "count only its own uploads")
    shared_store = args.data_dir or s3_store   # one that processes can share
    if args.workers is None:
        args.workers = workers.usable_cpus() if shared_store and hasattr(os, "fork") else 1
    if args.workers > 1 and not shared_store:
        parser.error("--workers above 1 needs --data-dir or an S3 --store: worker processes "
                     "cannot share the in-memory store")
    if args.workers > 1 and not hasattr(os, "fork"):
        parser.error("--workers above 1 needs os.fork, which this platform lacks")
    if args.group_commit and not args.data_dir:
        parser.error("--group-commit is for the disk store: give --data-dir")
    if args.data_dir and not storage.DISK_STORE_SUPPORTED:
        parser.error("--data-dir needs fcntl.flock, which this platform lacks "
                     "(the disk store runs on Linux, macOS and BSD)")
    return args


def main(argv=None):
    """Run the service; the exit status: 0, 1 if requests were cut off at
    shutdown (or workers kept dying), 2 if it could not start."""
    args = parse_args(argv)
    workers.block_stop_signals()
    # Workers count into one board, so that /metrics from any of them counts all.
    board = metrics_module.Board(args.workers, shared=True) if args.workers > 1 else None

    def make_application(slot=None):
        """The parent's application (it proves the store opens), or worker
        ``slot``'s, which counts into its slot of the board. A worker does
        not ask the S3 engine about the bucket again: the parent has, and one
        restarted while the engine is down must serve (503s), not die."""
        store = open_store(args.data_dir, args.max_total_size, args.store, args.s3_endpoint,
                           args.spool_dir, args.group_commit, args.s3_timeout,
                           check=slot is None)
        return DataStorageServer(store, max_object_size=args.max_object_size,
                                 auth_token=args.auth_token, public_url=args.public_url,
                                 metrics=None if slot is None else metrics_module.Metrics(board, slot))

    try:   # everything is checked before the port is announced
        application = make_application()
    except (OSError, storage.StoreError, ValueError) as error:
        if args.data_dir:
            return cannot_start("cannot use --data-dir %s: %s" % (args.data_dir, error))
        return cannot_start("cannot use the store %s: %s" % (args.store, error))
    log = logs.Log(log_format=args.log_format, level=args.log_level)
    max_connections, descriptors = gateway.fit_descriptors(args.max_connections)
    try:
        server = gateway.GatewayServer((args.host, args.port), None,
                                       request_timeout=args.request_timeout,
                                       max_connections=max_connections, log=log,
                                       multiprocess=args.workers > 1)
    except OSError as error:   # the port is taken, the host does not resolve, ...
        application.close()
        return cannot_start("cannot listen on %s port %d: %s" % (args.host, args.port, error))
    host, port = server.server_address[:2]
    print("data storage service listening on http://%s:%d (%s%s%s)" % (
        "[%s]" % host if ":" in host else host, port,
        "disk store in %s" % args.data_dir if args.data_dir else
        "S3 store %s" % args.store if args.store not in (None, "memory") else "in-memory store",
        ", %d workers" % args.workers if args.workers > 1 else "",
        ", bearer token required" if args.auth_token else ""), flush=True)
    if descriptors:
        log.log("warning", descriptors)
    log.log("info", "settings: max object size %d, quota %s, request timeout %ss, "
            "max connections %d, shutdown timeout %ss, workers %d%s%s" % (
                args.max_object_size, "none" if args.max_total_size is None else args.max_total_size,
                args.request_timeout,
                max_connections, args.shutdown_timeout, args.workers,
                ", group commit" if getattr(application.store, "group_commit", False) else "",
                ", S3 timeout %ss" % (s3.DEFAULT_TIMEOUT if args.s3_timeout is None
                                      else args.s3_timeout)
                if isinstance(application.store, s3.S3Store) else ""))
    if args.workers > 1:
        application.close()   # it proved the store opens; each worker opens its own
        return workers.run_workers(server, args.workers, make_application, args.shutdown_timeout,
                                   worker_exited=board.forget_in_flight)
    return workers.serve_application(server, application, args.shutdown_timeout)


def cannot_start(message):
    """One line on stderr and the exit status for a start-up that cannot succeed."""
    print("data storage service: %s" % message, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
