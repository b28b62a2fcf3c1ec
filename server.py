"""HTTP front end of the data storage service: /data/<repository>/<oid>.

A ThreadingHTTPServer whose handler speaks HTTP/1.1 (RFC 9110, RFC 9112),
parses the request target into a route and hands request bodies, as streams,
to a store from ``storage``. Every error, whether found while parsing the
request, by the store, or unexpected, is raised as an exception and turned
into a JSON response in one place: ``DataStorageHandler._answer``. Also here:
connection limits and graceful shutdown (``ConnectionLimiter``), logs, and
``--workers`` processes.

Run ``python server.py --help`` for the command line.
"""

import argparse
import collections
import datetime
import email.utils
import hmac
import http
import json
import os
import re
import select
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import metrics
import storage

DEFAULT_PORT = 8282
DEFAULT_MAX_OBJECT_SIZE = 1 << 30
DEFAULT_REQUEST_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_SHUTDOWN_TIMEOUT = 20.0
SERVER_SOFTWARE = "data-storage/1.0"

MAX_LINE_BYTES = 8192        # request line, each header line, each chunk-size line
MAX_HEADER_FIELDS = 100
MAX_HEADER_BYTES = 64 * 1024
INLINE_BODY_BYTES = 64 * 1024   # bodies up to this size go out in the same write as the headers
DRAIN_BODY_BYTES = 64 * 1024    # an unread body up to this size is read and dropped to keep the connection
LINGER_SECONDS = 2.0
BODY_BLOCK_BYTES = 256 * 1024
OVERSIZED = 1 << 62   # stands for a Content-Length too long to be worth converting

DEFAULT_LIST_LIMIT = 1000
MAX_LIST_LIMIT = 10000
OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")
ROUTE_PATHS = {   # route name -> path template, as in openapi.json
    "health": "/healthz",
    "metrics": "/metrics",
    "openapi": "/openapi.json",
    "repository": "/data/{repository}",
    "object": "/data/{repository}/{oid}",
}
FIXED_ROUTES = {path: route for route, path in ROUTE_PATHS.items() if "{" not in path}
LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
KNOWN_METHODS = frozenset(   # metrics label other methods "other"
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"))
TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
REQUEST_LINE = re.compile(r"(%s) (\S+) HTTP/(\d)\.(\d)" % TOKEN)
HEADER_LINE = re.compile(r"(%s):[ \t]*(.*?)[ \t]*" % TOKEN)
CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r\n")
SINGLE_RANGE = re.compile(r"bytes[ \t]*=[ \t]*(\d{0,19})[ \t]*-[ \t]*(\d{0,19})")
REASONS = {status.value: status.phrase for status in http.HTTPStatus}

STORE_ERROR_STATUS = {
    storage.InvalidRepository: 400,
    storage.InvalidObjectId: 400,
    storage.DigestMismatch: 400,
    storage.ObjectNotFound: 404,
    storage.InsufficientStorage: 507,
}


class HTTPError(Exception):
    """An error response to send: status, message, extra headers, and whether
    the connection must be closed afterwards (its framing can't be trusted)."""

    def __init__(self, status, message, headers=(), close=False):
        super().__init__(message)
        self.status = status
        self.headers = list(headers)
        self.close = close


class ClientDisconnected(ConnectionError):
    """The client closed the connection before the end of the request body."""


class RangeNotSatisfiable(Exception):
    """The Range header asks for bytes beyond the object (RFC 9110 §15.5.17)."""


class Headers:
    """Request header fields: case-insensitive names, repeated fields kept in order."""

    def __init__(self):
        self._fields = {}

    def add(self, name, value):
        self._fields.setdefault(name.lower(), []).append(value)

    def get(self, name, default=None):
        """The field's value, repeated fields joined by ", " (RFC 9110 §5.3)."""
        values = self._fields.get(name.lower())
        return ", ".join(values) if values else default


def split_list(value):
    """The members of a comma-separated field value, without empty ones."""
    return [item.strip() for item in value.split(",") if item.strip()]


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
    if segments[0] != "data" or len(segments) not in (2, 3) or "" in segments:
        return None, (), query
    try:
        arguments = tuple(urllib.parse.unquote(s, errors="strict") for s in segments[1:])
    except UnicodeDecodeError:
        raise HTTPError(400, "path segments must be percent-encoded UTF-8") from None
    return ("repository", "object")[len(arguments) - 1], arguments, query


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
    Raise RangeNotSatisfiable if the range starts beyond the object."""
    match = SINGLE_RANGE.fullmatch(value.strip())
    if not match:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable()
        return max(0, size - suffix), size - 1
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable()
    return start, size - 1 if not last else min(int(last), size - 1)


def etag_matches(if_none_match, etag):
    """Weak comparison of an If-None-Match value with our ETag (RFC 9110 §13.1.2)."""
    tags = split_list(if_none_match)
    return "*" in tags or any(tag[2:] == etag if tag.startswith("W/") else tag == etag
                              for tag in tags)


class RequestBody:
    """A request body being read from the connection.

    On its first read it sends the ``100 Continue`` the client may be waiting
    for (RFC 9110 §10.1.1), so a request refused before its body is read gets
    its final status instead. Subclasses frame the body; ``read()`` returns
    everything that is left and ``readinto(buffer)`` fills part of a buffer,
    0 meaning the end.
    """

    length = None  # total length when known in advance

    def __init__(self, rfile, on_first_read):
        self._rfile = rfile
        self._on_first_read = on_first_read
        self.started = False
        self.finished = False
        self.received = 0   # body bytes read so far

    def _start(self):
        if not self.started:
            self.started = True
            self._on_first_read()

    def read(self):
        parts = bytearray()
        block = bytearray(BODY_BLOCK_BYTES)
        view = memoryview(block)
        while True:
            count = self.readinto(block)
            if not count:
                return bytes(parts)
            parts += view[:count]

    def _read_some(self, buffer, limit):
        """Read up to ``limit`` bytes into ``buffer``; the connection ending here is a cut-off."""
        count = self._rfile.readinto(memoryview(buffer)[:limit])
        if not count:
            raise self._cut_off()
        self.received += count
        return count

    @staticmethod
    def _cut_off():
        return ClientDisconnected("connection closed before the end of the request body")


class EmptyBody(RequestBody):
    """No body: neither Content-Length nor Transfer-Encoding (RFC 9112 §6.3)."""

    length = 0

    def __init__(self):
        super().__init__(None, None)
        self.started = self.finished = True

    def readinto(self, buffer):
        return 0

    def read(self):
        return b""


class FixedLengthBody(RequestBody):
    """A body framed by Content-Length."""

    def __init__(self, rfile, length, on_first_read):
        super().__init__(rfile, on_first_read)
        self.length = self.remaining = length
        self.finished = length == 0

    def readinto(self, buffer):
        self._start()
        if not self.remaining:
            return 0
        count = self._read_some(buffer, self.remaining)
        self.remaining -= count
        self.finished = not self.remaining
        return count

    def read(self):
        self._start()
        data = self._rfile.read(self.remaining)  # one allocation, filled in place
        if len(data) != self.remaining:
            raise self._cut_off()
        self.received += self.remaining
        self.remaining = 0
        self.finished = True
        return data


class ChunkedBody(RequestBody):
    """A body in the chunked transfer coding (RFC 9112 §7.1), limited to
    ``limit`` bytes of content. Extensions are ignored; trailers are read
    and dropped."""

    def __init__(self, rfile, limit, on_first_read):
        super().__init__(rfile, on_first_read)
        self._limit = limit
        self._declared = 0
        self._chunk_left = 0

    def readinto(self, buffer):
        self._start()
        if self.finished:
            return 0
        if not self._chunk_left:
            self._chunk_left = self._read_chunk_size()
            if not self._chunk_left:
                self._read_trailers()
                self.finished = True
                return 0
        count = self._read_some(buffer, self._chunk_left)
        self._chunk_left -= count
        if not self._chunk_left and self._rfile.read(2) != b"\r\n":
            raise HTTPError(400, "chunk data not followed by CRLF", close=True)
        return count

    def _read_line(self):
        line = self._rfile.readline(MAX_LINE_BYTES + 1)
        if not line:
            raise self._cut_off()
        if len(line) > MAX_LINE_BYTES:
            raise HTTPError(400, "chunk line longer than %d bytes" % MAX_LINE_BYTES, close=True)
        return line

    def _read_chunk_size(self):
        match = CHUNK_SIZE_LINE.fullmatch(self._read_line())
        if not match:
            raise HTTPError(400, "malformed chunk size line", close=True)
        size = int(match.group(1), 16)
        self._declared += size
        if self._declared > self._limit:
            raise HTTPError(413, "object larger than the %d-byte limit" % self._limit, close=True)
        return size

    def _read_trailers(self):
        for _ in range(MAX_HEADER_FIELDS + 1):
            if self._read_line() in (b"\r\n", b"\n"):
                return
        raise HTTPError(400, "too many trailer fields", close=True)


class ConnectionLimiter:
    """Bounds the connections served at once and drains them at shutdown.

    A connection is *idle* while its thread waits for the next request line.
    When every slot is taken, a new connection reclaims the slot of the
    connection idle the longest (RFC 9112 §9.5 lets a server close an idle
    persistent connection at any time), so idle keep-alive clients cannot
    lock out real requests; only when every connection is mid-request is the
    newcomer refused. A connection whose next request has already arrived,
    unread, is not idle and is never closed under it. While draining, only
    connections idle for IDLE_GRACE_SECONDS are closed (checked again as the
    drain waits): a connection accepted a moment ago may have a request that
    its thread has read but not yet announced. Sockets are shut down, never
    closed, from other threads: the owning thread sees end-of-file and cleans up.
    """

    IDLE_GRACE_SECONDS = 0.5

    def __init__(self, limit):
        self.limit = limit
        self.draining = False
        self._open = set()
        self._idle = collections.OrderedDict()   # socket -> idle since (monotonic), longest first
        self._lock = threading.Lock()
        self._all_closed = threading.Condition(self._lock)

    def admit(self, sock):
        """Take a slot for a new connection; False if every slot is mid-request."""
        with self._lock:
            if len(self._open) >= self.limit:
                victim = next((s for s in self._idle if not _has_unread_bytes(s)), None)
                if victim is None:
                    return False
                del self._idle[victim]
                self._open.discard(victim)
                _shut_down(victim)
            self._open.add(sock)
            self._idle[sock] = time.monotonic()
            return True

    def idle(self, sock, first_request):
        """Mark a connection as waiting for a request; False if it should close
        instead. While draining, a connection still gets its first request
        answered (with Connection: close), so a health check sees 503."""
        with self._lock:
            if (self.draining and not first_request) or sock not in self._open:
                return False
            self._idle[sock] = time.monotonic()
            self._idle.move_to_end(sock)
            return True

    def busy(self, sock):
        with self._lock:
            self._idle.pop(sock, None)

    def counts(self):
        """``(open, idle)`` connections right now."""
        with self._lock:
            return len(self._open), len(self._idle)

    def release(self, sock):
        with self._lock:
            self._open.discard(sock)
            self._idle.pop(sock, None)
            if not self._open:
                self._all_closed.notify_all()

    def begin_draining(self):
        """From now on connections close after their current request; idle ones
        are closed now or, if they became idle a moment ago, while ``wait_closed`` waits."""
        with self._lock:
            self.draining = True
            self._close_idle()

    def wait_closed(self, timeout):
        """Wait up to ``timeout`` seconds for every connection to close; return how many remain."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._open and time.monotonic() < deadline:
                self._all_closed.wait(min(deadline - time.monotonic(), self.IDLE_GRACE_SECONDS))
                self._close_idle()
            return len(self._open)

    def _close_idle(self):
        """Shut down connections idle past the grace period with nothing unread (lock held)."""
        now = time.monotonic()
        for sock, since in list(self._idle.items()):
            if now - since >= self.IDLE_GRACE_SECONDS and not _has_unread_bytes(sock):
                _shut_down(sock)
                del self._idle[sock]


def _has_unread_bytes(sock):
    """True if the socket is readable now: a request, or the client's close, has arrived.
    (A zero-timeout poll; recv would first wait out the socket's timeout.)"""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


_CONTROL_CHARACTERS = {code: "\\x%02x" % code for code in (*range(0x20), *range(0x7f, 0xa0))}


def _shut_down(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def format_head(status, headers, content_length, date, close):
    """The bytes of a response's status line and header section."""
    lines = ["HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, "")),
             "Date: %s\r\nServer: %s\r\nContent-Length: %d\r\n"
             % (date, SERVER_SOFTWARE, content_length)]
    lines.extend("%s: %s\r\n" % field for field in headers)
    if close:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def json_error(message):
    return json.dumps({"error": message}).encode()


class DataStorageHandler(BaseHTTPRequestHandler):
    """Serves one connection: a keep-alive sequence of requests.

    The stdlib's request parsing is replaced (``handle_one_request``) so that
    every error, even on a malformed request line, is a JSON response with a
    status line, and so that request bodies are framed per RFC 9112 §6.
    Per-request state is reset at the start of each request, because one
    handler object serves every request on its connection.
    """

    protocol_version = "HTTP/1.1"
    server_version = SERVER_SOFTWARE
    disable_nagle_algorithm = True   # small responses must not wait ~40 ms for an ACK
    routes = {
        "health": {"GET": "get_health", "HEAD": "get_health"},
        "metrics": {"GET": "get_metrics", "HEAD": "get_metrics"},
        "openapi": {"GET": "get_openapi", "HEAD": "get_openapi"},
        "repository": {"GET": "list_objects", "HEAD": "list_objects", "PUT": "put_object"},
        "object": {"GET": "get_object", "HEAD": "get_object",
                   "PUT": "put_object", "DELETE": "delete_object"},
    }
    public_routes = frozenset({"health"})   # answered without a token, for load balancers

    def setup(self):
        self.timeout = self.server.request_timeout
        self._requests_seen = 0
        super().setup()

    def handle_one_request(self):
        """Wait for a request, then read, route and answer it, accounting for it
        once at the end (access log, metrics)."""
        self.close_connection = True
        if not self.server.connections.idle(self.connection, first_request=not self._requests_seen):
            return
        try:
            raw = self.rfile.readline(MAX_LINE_BYTES + 1)
            if raw in (b"\r\n", b"\n"):   # RFC 9112 §2.2: ignore an empty line before a request
                raw = self.rfile.readline(MAX_LINE_BYTES + 1)
        except (ConnectionError, socket.timeout):
            return   # idle too long, or gone: nothing to answer
        if not raw:
            return
        self.server.connections.busy(self.connection)
        self._requests_seen += 1
        self.close_connection = False
        self.command = self.path = None
        self.requestline = ""
        self.request_version = self.protocol_version
        self._status = None
        self._sent_bytes = 0
        self._expect_continue = False
        self._body = EmptyBody()
        started = time.monotonic()
        self.server.metrics.request_started()
        try:
            self._answer(raw)
        except (ConnectionError, socket.timeout) as error:
            # The client went away or stalled: nobody is left to answer.
            self.server.log("warning", '%s "%s" abandoned: %s'
                            % (self.address_string(), self.requestline[:200], error))
            self.close_connection = True
        finally:
            self._account(time.monotonic() - started)

    def _answer(self, raw_request_line):
        """Answer one request; any exception but a lost connection becomes a response."""
        try:
            self._read_request_head(raw_request_line)
            self._dispatch()
        except HTTPError as error:
            self._send_error(error.status, str(error), error.headers, error.close)
        except storage.StoreError as error:
            self._send_error(STORE_ERROR_STATUS.get(type(error), 500), str(error))
        except (ConnectionError, socket.timeout):
            raise
        except Exception:
            self.server.log("error", "unexpected error in %r:\n%s"
                            % (self.requestline[:200], traceback.format_exc()))
            self._send_error(500, "internal server error", close=True)
        self._finish_request_body()

    def _account(self, seconds):
        method = self.command if self.command in KNOWN_METHODS else "other"
        self.server.metrics.request_ended(method, self._status, seconds, self._body.received,
                                          self._sent_bytes)
        if self._status is not None:
            self.server.log_access(self.client_address[0], self.command, self.path,
                                   self.requestline, self._status, self._body.received,
                                   self._sent_bytes, seconds)

    def _read_request_head(self, raw):
        """Parse the request line and header fields."""
        if len(raw) > MAX_LINE_BYTES:
            raise HTTPError(414, "request line longer than %d bytes" % MAX_LINE_BYTES, close=True)
        self.requestline = raw.decode("latin-1").rstrip("\r\n")
        match = REQUEST_LINE.fullmatch(self.requestline)
        if not match:
            raise HTTPError(400, "malformed request line %r (HTTP/1.x required)"
                            % self.requestline[:200], close=True)
        self.command, self.path, major, minor = match.groups()
        if major != "1":
            raise HTTPError(505, "HTTP version %s.%s not supported; use HTTP/1.1"
                            % (major, minor), close=True)
        self.request_version = "HTTP/1.%s" % minor
        self.headers = self._read_header_fields()
        connection = [option.lower() for option in split_list(self.headers.get("Connection", ""))]
        self.close_connection = minor == "0" or "close" in connection
        self._body = self._frame_body()

    def _read_header_fields(self):
        headers = Headers()
        total = 0
        for _ in range(MAX_HEADER_FIELDS + 1):
            raw = self.rfile.readline(MAX_LINE_BYTES + 1)
            total += len(raw)
            if len(raw) > MAX_LINE_BYTES or total > MAX_HEADER_BYTES:
                raise HTTPError(431, "header fields too large", close=True)
            if raw in (b"\r\n", b"\n"):
                return headers
            if not raw:
                raise HTTPError(400, "connection closed inside the header section", close=True)
            match = HEADER_LINE.fullmatch(raw.decode("latin-1").rstrip("\r\n"))
            if not match or "\r" in match.group(2) or "\0" in match.group(2):
                # Includes obsolete line folding and whitespace before the colon (RFC 9112 §5).
                raise HTTPError(400, "malformed header field %r" % raw[:100], close=True)
            headers.add(*match.groups())
        raise HTTPError(431, "more than %d header fields" % MAX_HEADER_FIELDS, close=True)

    def _frame_body(self):
        """Decide how the request body is delimited (RFC 9112 §6.1, §6.3)."""
        transfer_encoding = self.headers.get("Transfer-Encoding")
        content_length = self.headers.get("Content-Length")
        if transfer_encoding is not None:
            if content_length is not None:
                raise HTTPError(400, "both Transfer-Encoding and Content-Length given", close=True)
            if self.request_version == "HTTP/1.0":
                raise HTTPError(400, "Transfer-Encoding is not allowed in HTTP/1.0", close=True)
            codings = [coding.lower() for coding in split_list(transfer_encoding)]
            if codings[-1:] != ["chunked"] or codings.count("chunked") > 1:
                raise HTTPError(400, "chunked must be the final transfer coding, applied once",
                                close=True)
            if len(codings) > 1:
                raise HTTPError(501, "transfer coding %r not supported" % codings[0], close=True)
            self._expect_continue_if_asked()
            return ChunkedBody(self.rfile, self.server.max_object_size, self._send_continue)
        if content_length is not None:
            values = set(split_list(content_length))
            if len(values) != 1 or not all(value.isascii() and value.isdigit() for value in values):
                raise HTTPError(400, "invalid Content-Length %r" % content_length[:100], close=True)
            digits = values.pop().lstrip("0")
            length = int(digits or "0") if len(digits) <= 18 else OVERSIZED
            if length:
                self._expect_continue_if_asked()
                return FixedLengthBody(self.rfile, length, self._send_continue)
        return EmptyBody()

    def _expect_continue_if_asked(self):
        expect = self.headers.get("Expect", "")
        self._expect_continue = (expect.lower() == "100-continue"
                                 and self.request_version != "HTTP/1.0")

    def _send_continue(self):
        if self._expect_continue:
            self._expect_continue = False
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _dispatch(self):
        route, arguments, self._query = parse_target(self.path)
        if (self.server.auth_token is not None and route not in self.public_routes
                and not self._authorized()):
            raise HTTPError(401, "missing or wrong bearer token",
                            [("WWW-Authenticate", 'Bearer realm="data-storage"')])
        if route is None:
            raise HTTPError(404, "no such resource: %s" % self.path[:200])
        methods = self.routes[route]
        handler = methods.get(self.command)
        if handler is None:
            # Also for methods we have never heard of: the resource exists and
            # Allow says what it supports (RFC 9110 §15.5.6).
            raise HTTPError(405, "method %s not allowed here" % self.command[:40],
                            [("Allow", ", ".join(methods))])
        getattr(self, handler)(*arguments)

    def _authorized(self):
        """Check ``Authorization: Bearer <token>`` in constant time (RFC 6750 §2.1)."""
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode("latin-1"), self.server.auth_token)

    # Route handlers -------------------------------------------------------

    def put_object(self, repository, oid=None):
        """Store the body; with an oid in the path, only if the body hashes to it."""
        body = self._body
        if body.length is not None and body.length > self.server.max_object_size:
            raise HTTPError(413, "object of %d bytes exceeds the %d-byte limit"
                            % (body.length, self.server.max_object_size))
        oid, size = self.server.store.put(repository, body, expected_oid=oid)
        self._send_json(201, {"oid": oid, "size": size},
                        [("Location", "/data/%s/%s" % (repository, oid))])

    def get_object(self, repository, oid):
        """Send the object (GET) or its headers (HEAD), honouring If-None-Match
        (RFC 9110 §13.1.2) and a single byte Range (RFC 9110 §14)."""
        with self.server.store.open(repository, oid) as stored:
            size = stored.size
            etag = '"%s"' % oid.lower()
            headers = [("ETag", etag), ("Accept-Ranges", "bytes")]
            if etag_matches(self.headers.get("If-None-Match", ""), etag):
                self._send_response(304, headers, content_length=size)
                return
            first, last = 0, size - 1
            status = 200
            range_value = self.headers.get("Range")
            if (range_value is not None and self.command == "GET"
                    and self.headers.get("If-Range", etag) == etag):
                try:
                    selected = parse_range(range_value, size)
                except RangeNotSatisfiable:
                    raise HTTPError(416, "range %s not satisfiable for %d bytes"
                                    % (range_value[:100], size),
                                    [("Content-Range", "bytes */%d" % size)]) from None
                if selected is not None:
                    status = 206
                    first, last = selected
                    headers.append(("Content-Range", "bytes %d-%d/%d" % (first, last, size)))
            headers.append(("Content-Type", "application/octet-stream"))
            count = last - first + 1
            if self.command == "HEAD":
                self._send_response(status, headers, content_length=count)
            elif count <= INLINE_BODY_BYTES:
                if first:
                    stored.file.seek(first)   # a stored object's file starts at 0
                body = stored.file.read(count)
                if len(body) != count:
                    raise OSError("stored object shorter than its recorded size")
                self._send_response(status, headers, body)
            else:
                self._send_response(status, headers, content_length=count)
                self._sent_bytes = self.connection.sendfile(stored.file, first, count)
                if self._sent_bytes != count:
                    raise ConnectionError("object ended before its recorded size")

    def delete_object(self, repository, oid):
        """Remove the object; 404 if the repository does not hold it."""
        self.server.store.delete(repository, oid)
        self._send_response(200, [])

    def list_objects(self, repository):
        """A page of the repository's objects, sorted by oid: ``?limit=N&after=OID``."""
        limit, after = parse_listing_query(self._query)
        listed = self.server.store.list_objects(repository, after=after, limit=limit + 1)
        page = listed[:limit]
        self._send_json(200, {"objects": [{"oid": oid, "size": size} for oid, size in page],
                              "next": page[-1][0] if len(listed) > limit else None})

    def get_health(self):
        """200 while serving; 503 once shutdown has begun, so balancers move away."""
        if self.server.connections.draining:
            self._send_json(503, {"status": "draining"})
        else:
            self._send_json(200, {"status": "ok"})

    def get_metrics(self):
        """Prometheus text exposition of the request metrics and the store's usage."""
        text = self.server.metrics.render(*self.server.store.usage())
        self._send_response(200, [("Content-Type", metrics.CONTENT_TYPE)], text.encode())

    def get_openapi(self):
        """The OpenAPI 3.1 description of this API, served as stored."""
        self._send_response(200, [("Content-Type", "application/json")],
                            self.server.openapi_document)

    # Responses ------------------------------------------------------------

    def _send_json(self, status, document, headers=()):
        self._send_response(status, [("Content-Type", "application/json"), *headers],
                            json.dumps(document).encode())

    def _send_error(self, status, message, headers=(), close=False):
        """Answer with a JSON error, unless a response is already under way,
        in which case the only honest thing left is to close the connection."""
        if close:
            self.close_connection = True
        if self._status is not None:
            self.close_connection = True
            return
        self._send_response(status, [("Content-Type", "application/json"), *headers],
                            json_error(message))

    def _send_response(self, status, headers, body=b"", content_length=None):
        """Write the status line, headers and body in one send. If
        ``content_length`` is given, the caller sends that many bytes after."""
        if ((not self._body.finished and (self._expect_continue or not self._can_drain_body()))
                or self.server.connections.draining):
            self.close_connection = True
        length = len(body) if content_length is None else content_length
        head = format_head(status, headers, length, self.server.http_date(), self.close_connection)
        self._status = status
        if self.command == "HEAD":
            self.wfile.write(head)
        else:
            self.wfile.write(head + body)
            self._sent_bytes = len(body)

    def _can_drain_body(self):
        return self._body.length is not None and self._body.remaining <= DRAIN_BODY_BYTES

    def _finish_request_body(self):
        """Keep an unread body from being parsed as the next request
        (RFC 9112 §9.3): drop a small one, else close the connection."""
        if self._body.finished or self.close_connection:
            self._linger_if_unread()
            return
        buffer = bytearray(DRAIN_BODY_BYTES)
        try:
            while self._body.readinto(buffer):
                pass
        except (HTTPError, OSError):
            self.close_connection = True

    def _linger_if_unread(self):
        """Before closing with body bytes still unread, read and drop what the
        client sends for a moment, so the close does not reset the connection
        before the client has read the response."""
        if self._body.finished or self._expect_continue:
            return
        connection = self.connection
        try:
            connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_SECONDS
            while time.monotonic() < deadline:
                connection.settimeout(max(0.01, deadline - time.monotonic()))
                if not connection.recv(65536):
                    break
        except OSError:
            pass


class DataStorageServer(ThreadingHTTPServer):
    """A threaded HTTP server that owns the store and the service's limits.

    ``store`` may be given later (set the attribute before serving): worker
    processes open their own store after the listening socket is shared.

    One thread per connection, at most ``max_connections`` of them (see
    ConnectionLimiter); threads are daemons so that a stuck client cannot
    keep the process alive, and ``drain`` gives in-flight requests their
    time at shutdown instead.
    """

    request_queue_size = 1024
    daemon_threads = True

    def __init__(self, address, store, max_object_size=DEFAULT_MAX_OBJECT_SIZE,
                 request_timeout=DEFAULT_REQUEST_TIMEOUT, max_connections=DEFAULT_MAX_CONNECTIONS,
                 auth_token=None, log_stream=None, log_format="text", log_level="info",
                 handler_class=DataStorageHandler):
        self.store = store
        self.max_object_size = max_object_size
        self.request_timeout = request_timeout
        self.connections = ConnectionLimiter(max_connections)
        self.auth_token = os.fsencode(auth_token) if auth_token else None
        self.metrics = metrics.Metrics()
        with open(OPENAPI_PATH, "rb") as document:
            self.openapi_document = document.read()
        self.log_stream = log_stream or sys.stderr
        self.log_json = log_format == "json"
        self.log_threshold = LOG_LEVELS[log_level]
        self._date = self._log_date_cache = (0, "")
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler_class)

    def server_bind(self):
        # HTTPServer.server_bind would look up the host's FQDN, which can
        # stall start-up on a machine without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address):
        if self.connections.admit(request):
            super().process_request(request, client_address)
        else:
            self._refuse(request)

    def _refuse(self, request):
        """Answer 503 on the accepting thread, without reading the request."""
        body = json_error("too many connections; retry shortly")
        try:
            request.settimeout(1.0)
            request.sendall(format_head(503, [("Content-Type", "application/json"),
                                              ("Retry-After", "1")],
                                        len(body), self.http_date(), close=True) + body)
            request.setblocking(False)
            request.recv(65536)   # drop what has arrived: closing on unread bytes sends a reset
        except OSError:
            pass
        self.shutdown_request(request)

    def shutdown_request(self, request):
        self.connections.release(request)
        super().shutdown_request(request)

    def stop_accepting(self):
        """Close the listening socket, but first take the connections already
        waiting in its backlog: their clients have connected and may have sent
        a request, which they get answered (with Connection: close)."""
        self.connections.begin_draining()
        self.socket.setblocking(False)
        while True:
            try:
                request, client_address = self.get_request()
            except OSError:   # the backlog is empty
                break
            self.process_request(request, client_address)
        self.server_close()

    def drain(self, timeout):
        """Close idle connections and give in-flight requests up to ``timeout``
        seconds to finish; returns how many were still open after it."""
        self.connections.begin_draining()
        return self.connections.wait_closed(timeout)

    def log(self, level, message):
        """A line of the service log (start-up, warnings, errors), if ``level`` passes
        ``--log-level``."""
        if LOG_LEVELS[level] < self.log_threshold:
            return
        now = datetime.datetime.now(datetime.timezone.utc)
        if self.log_json:
            line = json.dumps({"time": now.isoformat(timespec="milliseconds"),
                               "level": level, "message": message})
        else:
            line = "%s %s %s" % (now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
                                 level.upper(), message)
        self.log_stream.write(line + "\n")

    def log_access(self, remote, method, path, request_line, status, received, sent, seconds):
        """The access-log line of a finished request: Common Log Format, or JSON.
        ``received`` and ``sent`` count body bytes."""
        if self.log_json:
            line = json.dumps({
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="milliseconds"),
                "remote": remote, "method": method, "path": path, "status": status,
                "request_bytes": received, "response_bytes": sent,
                "duration_ms": round(seconds * 1000, 3)})
        else:
            if not request_line.isprintable():
                request_line = request_line.translate(_CONTROL_CHARACTERS)
            line = '%s - - [%s] "%s" %d %d' % (remote, self._log_date(), request_line, status,
                                                 sent)
        self.log_stream.write(line + "\n")

    def handle_error(self, request, client_address):
        """An exception escaped a connection's handler: log it, instead of socketserver's
        traceback on stderr."""
        self.log("error", "error serving %s:\n%s" % (client_address[0], traceback.format_exc()))

    def http_date(self):
        """The current time as an HTTP-date, formatted at most once a second."""
        now = int(time.time())
        cached = self._date
        if cached[0] != now:
            cached = self._date = (now, email.utils.formatdate(now, usegmt=True))
        return cached[1]

    def _log_date(self):
        """The current time as the access log writes it, formatted at most once a second."""
        now = int(time.time())
        cached = self._log_date_cache
        if cached[0] != now:
            cached = self._log_date_cache = (now, time.strftime("%d/%b/%Y %H:%M:%S",
                                                                time.localtime(now)))
        return cached[1]


def _byte_count(text):
    # int() alone would also take "+5", " 5 " and "1_0".
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError("expected a whole number, got %r" % text)
    return int(text)


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("expected a positive number of seconds, got %r" % text)
    return value


def _positive_count(text):
    value = _byte_count(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected at least 1")
    return value


def _port_number(text):
    value = _byte_count(text)
    if value > 65535:
        raise argparse.ArgumentTypeError("port %d is above 65535" % value)
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Content-addressed object storage over HTTP: PUT or list /data/REPO; "
                    "GET|HEAD|PUT|DELETE /data/REPO/OID; /healthz, /metrics, /openapi.json.")
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
    parser.add_argument("--max-total-size", type=_byte_count, metavar="BYTES",
                        help="quota on the bytes stored; uploads beyond it get 507 "
                             "(default: no quota)")
    parser.add_argument("--request-timeout", type=_seconds, default=DEFAULT_REQUEST_TIMEOUT,
                        metavar="SECONDS",
                        help="close a connection idle or stalled this long, mid-request "
                             "included (default: %(default)s)")
    parser.add_argument("--max-connections", type=_positive_count, default=DEFAULT_MAX_CONNECTIONS,
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
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="access log: Common Log Format lines, or one JSON object per "
                             "line (default: %(default)s)")
    parser.add_argument("--log-level", choices=tuple(LOG_LEVELS), default="info",
                        help="least severe service-log line written: start-up, warnings, "
                             "errors (default: %(default)s)")
    parser.add_argument("--workers", type=_positive_count, default=1, metavar="N",
                        help="serve from N processes sharing the listening socket; needs "
                             "--data-dir, since processes cannot share memory (default: 1)")
    args = parser.parse_args(argv)
    if args.workers > 1 and not args.data_dir:
        parser.error("--workers above 1 needs --data-dir: worker processes cannot share "
                     "the in-memory store")
    return args


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def serve_until_signalled(server, shutdown_timeout):
    """Serve until SIGTERM or SIGINT; then stop accepting, close idle
    connections and give in-flight requests ``shutdown_timeout`` seconds."""
    def stop(signum, frame):
        server.log("info", "signal %d: draining and stopping" % signum)
        # shutdown() waits for serve_forever() to return, so not on this thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)   # blocked across a worker's fork
    server.serve_forever()
    server.stop_accepting()
    left = server.drain(shutdown_timeout)
    if left:
        server.log("warning", "stopping with %d requests unfinished after %ss"
                   % (left, shutdown_timeout))


def open_store(args):
    if args.data_dir:
        return storage.DiskStore(args.data_dir, max_total_size=args.max_total_size)
    return storage.MemoryStore(max_total_size=args.max_total_size)


def serve_in_this_process(server, args):
    server.store = open_store(args)
    try:
        serve_until_signalled(server, args.shutdown_timeout)
    finally:
        server.store.close()


def run_workers(server, args):
    """Fork ``args.workers`` processes that accept on the one listening socket,
    each with its own handle on the shared disk store. Restart a worker that
    dies; on SIGTERM or SIGINT, pass SIGTERM on and wait for all to drain."""
    workers = {}   # pid -> start time
    stopping = False

    parent = os.getpid()

    def start_worker():
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)   # no signal between fork and set-up
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                for signum in STOP_SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)
                threading.Thread(target=_stop_when_orphaned, args=(parent,), daemon=True).start()
                serve_in_this_process(server, args)
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        workers[pid] = time.monotonic()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def stop(signum, frame):
        nonlocal stopping
        stopping = True
        for pid in workers:
            os.kill(pid, signal.SIGTERM)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    # Every worker wakes for each new connection and only one wins it; the
    # others must get EAGAIN from accept() (which socketserver ignores), not
    # block there, deaf to shutdown, until the next connection.
    server.socket.setblocking(False)
    for _ in range(args.workers):
        start_worker()
    while workers:
        pid, status = os.wait()
        started = workers.pop(pid, None)
        if started is None or stopping:
            continue
        server.log("warning", "worker %d exited (wait status %d); starting another" % (pid, status))
        if time.monotonic() - started < 1:
            time.sleep(1)   # a worker that dies at once would otherwise fork in a tight loop
        if not stopping:
            start_worker()
    server.server_close()


def _stop_when_orphaned(parent, interval=0.5):
    """In a worker: drain and exit, as on SIGTERM, once the parent is gone
    (killed with SIGKILL, say), instead of serving on unsupervised."""
    while os.getppid() == parent:
        time.sleep(interval)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv=None):
    args = parse_args(argv)
    # Held back until the handlers are in place: a SIGTERM that arrives just
    # after the start-up line must still stop the server cleanly.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    server = DataStorageServer(
        (args.host, args.port), None, max_object_size=args.max_object_size,
        request_timeout=args.request_timeout, max_connections=args.max_connections,
        auth_token=args.auth_token, log_format=args.log_format, log_level=args.log_level)
    host, port = server.server_address[:2]
    print("data storage service listening on http://%s:%d (%s%s%s)" % (
        "[%s]" % host if ":" in host else host, port,
        "disk store in %s" % args.data_dir if args.data_dir else "in-memory store",
        ", %d workers" % args.workers if args.workers > 1 else "",
        ", bearer token required" if args.auth_token else ""), flush=True)
    server.log("info", "settings: max object size %d, quota %s, request timeout %ss, "
               "max connections %d, shutdown timeout %ss, workers %d" % (
                   args.max_object_size, args.max_total_size or "none", args.request_timeout,
                   args.max_connections, args.shutdown_timeout, args.workers))
    if args.workers > 1:
        run_workers(server, args)
    else:
        serve_in_this_process(server, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
