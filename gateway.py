"""The stdlib WSGI gateway: serves a PEP 3333 application over HTTP/1.1.

``GatewayServer`` is a ``ThreadingHTTPServer`` (a thread per connection) whose
handler, ``Connection``, reads keep-alive requests with ``http11`` and hands
each to the application as an ``Exchange``: the per-request state, from the
request line to the last byte of the response. What the gateway adds to the
application, and what ``http.server`` would get wrong:

- JSON answers to protocol faults, with a status line even for a bad request line;
- chunked request bodies (``wsgi.input_terminated``), and ``100 Continue`` sent
  lazily on the first body read, so a refused request gets its final status;
- ``TCP_NODELAY``, the head and a small body in one send, ``wsgi.file_wrapper``
  sent with ``sendfile``;
- an unread body drained, or the connection closed after a lingering read, so
  it never becomes the next request (RFC 9112 §9.3);
- per-operation timeouts without a ``poll`` before each ``recv`` and ``send``
  (``SocketTimeouts``, ``ResponseWriter``), a bound on connections that reclaims idle ones
  (``ConnectionLimiter``), and a graceful drain at shutdown;
- an access-log line for every response, and metrics for the responses the
  application did not give itself (protocol faults, refusals, abandoned requests).
"""

import collections
import contextlib
import email.utils
import errno
import io
import json
import math
import os
import select
import socket
import socketserver
import struct
import threading
import time
import traceback
import urllib.parse
from http.server import ThreadingHTTPServer

import http11
import logs

SERVER_SOFTWARE = "data-storage/1.0"
DEFAULT_REQUEST_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 256
POLL_INTERVAL = 0.1   # serve_forever's wake-up: how long an access-log line may wait
DESCRIPTOR_MARGIN = 64   # file descriptors beyond the connections': the store's, logs, ...
DESCRIPTORS_PER_CONNECTION = 3   # its socket; the object it sends, and the checker's copy of it
OUT_OF_DESCRIPTORS_PAUSE = 0.1   # seconds accept() rests when the process has no descriptor left
DRAINING_KEY = "data_storage.draining"   # environ: true once the server is shutting down
# environ: true because this server honours a file_wrapper file's ``checked_spans``
# (see Exchange._send_file), so an application can check a file while it is sent.
CHECKED_SPANS_KEY = "data_storage.checked_spans"
INLINE_BODY_BYTES = 64 * 1024   # response bodies up to this size go out in the same send as the head
DRAIN_BODY_BYTES = 64 * 1024    # an unread body up to this size is read and dropped to keep the connection
MIN_BODY_RATE = 1024            # bytes/s a body must average once --request-timeout has passed
LINGER_SECONDS = 2.0
HOP_BY_HOP = frozenset(("connection", "keep-alive", "transfer-encoding", "upgrade",
                        "proxy-connection", "te", "trailer"))
JSON_ERROR_HEADERS = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
RETRY_AFTER = [("Retry-After", "1")]   # with a 503 for too many connections


def fit_descriptors(connections):
    """``(connections, warning)``: raise this process's soft limit on open files
    to what ``connections`` need (DESCRIPTORS_PER_CONNECTION each, plus
    DESCRIPTOR_MARGIN for the store, logs and listener) if the hard limit allows; where it does not, fewer
    connections, so that the store always has descriptors left, and a warning
    saying so (else None). No limit to fit where ``resource`` is missing."""
    try:
        import resource
    except ImportError:
        return connections, None
    needed = connections * DESCRIPTORS_PER_CONNECTION + DESCRIPTOR_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return connections, None
    wanted = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    except (ValueError, OSError):   # macOS caps the soft limit lower than its hard one says
        pass
    if soft >= needed:
        return connections, None
    fitted = max(1, (soft - DESCRIPTOR_MARGIN) // DESCRIPTORS_PER_CONNECTION)
    return fitted, ("the limit on open files (%d) is below %d per connection + %d (%d): serving "
                    "at most %d connections at once; raise it (ulimit -n)"
                    % (soft, DESCRIPTORS_PER_CONNECTION, DESCRIPTOR_MARGIN, needed, fitted))


def json_error(message):
    return json.dumps({"error": message}).encode()


class FileWrapper:
    """``wsgi.file_wrapper``: a file the gateway sends with ``sendfile`` from its
    current position, as many bytes as the response's Content-Length says."""

    def __init__(self, filelike, block_size=256 * 1024):
        self.filelike = filelike
        self.block_size = block_size

    def __iter__(self):
        if hasattr(self.filelike, "checked_spans"):
            yield from self.filelike   # a file that checks its bytes as they are read
            return
        while True:
            block = self.filelike.read(self.block_size)
            if not block:
                return
            yield block

    def close(self):
        close = getattr(self.filelike, "close", None)
        if close is not None:
            close()


class ConnectionLimiter:
    """Bounds the connections served at once and drains them at shutdown.

    A connection is *idle* while its thread waits for the next request line,
    *in its head* from the first byte of a request until its header section
    is read, then *busy*. When every slot is taken, a new connection reclaims
    the slot of the connection idle the longest (RFC 9112 §9.5 lets a server
    close an idle persistent connection at any time), else that of the one in
    its head the longest, if for RECLAIM_GRACE_SECONDS (a head takes
    milliseconds; one that dawdles is a slowloris holding a slot), so neither
    idle clients nor trickled heads lock out real requests; only when every
    connection is busy is the newcomer refused. A connection whose next request has already arrived,
    unread, is not idle and is never closed under it. While draining, only
    connections idle for RECLAIM_GRACE_SECONDS are closed (checked again as the
    drain waits): a connection accepted a moment ago may have a request that
    its thread has read but not yet announced. Sockets are shut down, never
    closed, from other threads: the owning thread sees end-of-file and cleans
    up. An idle one is shut down for reading only: a request can still arrive
    as it is reclaimed or drained (its thread may have read it into its
    buffer just before), and its thread then learns from ``busy`` that the
    connection is closing and answers 503 without running it, on the half
    still open, so that the client is told and may retry.
    """

    RECLAIM_GRACE_SECONDS = 0.5

    def __init__(self, limit):
        self.limit = limit
        self.draining = False
        self._open = set()
        self._idle = collections.OrderedDict()   # socket -> idle since (monotonic), longest first
        self._in_head = collections.OrderedDict()   # socket -> head begun (monotonic), oldest first
        self._drained = set()   # shut down for reading by the drain, open until their threads end
        self._lock = threading.Lock()
        self._all_closed = threading.Condition(self._lock)

    def admit(self, sock):
        """Take a slot for a new connection; False if every slot is mid-request."""
        with self._lock:
            if len(self._open) >= self.limit:
                victim = self._reclaimable()
                if victim is None:
                    return False
                self._open.discard(victim)
                if self._idle.pop(victim, None) is not None:
                    _stop_reading(victim)
                else:   # a dawdling head: nothing to answer
                    del self._in_head[victim]
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

    def _reclaimable(self):
        """The connection to close for a newcomer, or None (lock held)."""
        victim = next((s for s in self._idle if not _has_unread_bytes(s)), None)
        if victim is None and self._in_head:
            oldest, since = next(iter(self._in_head.items()))
            if time.monotonic() - since >= self.RECLAIM_GRACE_SECONDS:
                victim = oldest
        return victim

    def reclaim_idle(self, count=8):
        """Close up to ``count`` of the connections idle the longest (nothing
        unread); how many it closed."""
        with self._lock:
            victims = [s for s in self._idle if not _has_unread_bytes(s)][:count]
            for sock in victims:
                del self._idle[sock]
                self._open.discard(sock)
                _stop_reading(sock)
            return len(victims)

    def reading_head(self, sock):
        """A request has begun to arrive on the connection."""
        with self._lock:
            self._idle.pop(sock, None)
            if sock in self._open:   # else reclaimed: ``busy`` will say so
                self._in_head[sock] = time.monotonic()

    def busy(self, sock):
        """The request's head is read: the connection is serving it. False if
        it was reclaimed or drained meanwhile (see the class docstring)."""
        with self._lock:
            self._in_head.pop(sock, None)
            return sock in self._open and sock not in self._drained

    def counts(self):
        """``(open, idle, in head)`` connections right now."""
        with self._lock:
            return len(self._open), len(self._idle), len(self._in_head)

    def release(self, sock):
        with self._lock:
            self._open.discard(sock)
            self._idle.pop(sock, None)
            self._in_head.pop(sock, None)
            self._drained.discard(sock)
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
                self._all_closed.wait(min(deadline - time.monotonic(), self.RECLAIM_GRACE_SECONDS))
                self._close_idle()
            return len(self._open)

    def _close_idle(self):
        """Shut down connections idle past the grace period with nothing unread (lock held)."""
        now = time.monotonic()
        for sock, since in list(self._idle.items()):
            if now - since >= self.RECLAIM_GRACE_SECONDS and not _has_unread_bytes(sock):
                _stop_reading(sock)
                del self._idle[sock]
                self._drained.add(sock)


def _has_unread_bytes(sock):
    """True if a request has begun to arrive on ``sock`` and its thread has
    yet to read it. The client's close (end-of-file, or a reset) makes a
    socket readable too, but leaves nothing to answer: a blocking socket
    (every one, where kernel timeouts work) is peeked at without waiting to
    tell the two apart, lest connections their clients have closed hold
    slots a newcomer needs until their threads notice. (recv on a socket
    with a timeout would first wait on poll itself: there, readable has to do.)"""
    if sock.gettimeout() is not None or not hasattr(socket, "MSG_DONTWAIT"):
        return _ready(sock, writing=False, seconds=0)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:   # nothing unread (EAGAIN), or reset by the client
        return False


def _ready(sock, writing, seconds):
    """True if ``sock`` can be written (``writing``), else read, within
    ``seconds``: poll, or select where there is none (Windows). A wait beyond
    poll's 24 days (an int of milliseconds) is as good as forever."""
    seconds = min(seconds, (2 ** 31 - 1) / 1000)
    if not hasattr(select, "poll"):
        readers, writers = ([], [sock]) if writing else ([sock], [])
        return any(select.select(readers, writers, [], seconds)[:2])
    poller = select.poll()
    poller.register(sock, select.POLLOUT if writing else select.POLLIN)
    return bool(poller.poll(seconds * 1000))


def _shut_down(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _stop_reading(sock):
    """Shut a connection down for reading: its thread's read, blocked or to
    come, sees end-of-file; what it still has to send can go out."""
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass


class SocketTimeouts:
    """A connection's per-operation timeout, ``seconds``, kept without a
    ``poll`` before every read where it can be.

    ``socket.settimeout`` makes CPython wait in ``poll`` before every ``recv``
    and ``send``: a second system call per operation, and with it a second
    release and re-take of the GIL, which the other connection threads queue
    for. Here (POSIX, ``KERNEL_TIMEOUTS``) the socket blocks, and reads get
    the kernel's SO_RCVTIMEO: one call, which fails with EAGAIN
    (BlockingIOError) once the timeout passes without a byte; the reader
    raises ``socket.timeout`` for it. Sends do not block at all (see
    ResponseWriter), since the kernel's send timeout is one budget for a
    whole call rather than a limit on a pause. Elsewhere (Windows, or where
    a timeval is not two C longs) ``settimeout`` it is. Reads may be given
    less time (``receive``); sends always get ``seconds``."""

    LONGEST = 10 ** 9   # seconds: "never", and still a timeval (a timeval of 0 is "never" too)

    def __init__(self, sock, seconds):
        self.seconds = seconds
        self._sock = sock
        self._receive = None   # the receive timeout the socket has now
        if KERNEL_TIMEOUTS:
            sock.settimeout(None)   # blocking: the kernel times reads out
        self.receive(seconds)

    def receive(self, seconds):
        """The timeout of the receives that follow."""
        if seconds == self._receive:
            return   # no system call
        if KERNEL_TIMEOUTS:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        else:
            self._sock.settimeout(seconds)   # for sends too: see ``sending``
        self._receive = seconds

    def sending(self):
        """Before a send without kernel timeouts: ``settimeout``'s one timeout
        back to ``seconds``, if a read shortened it."""
        if not KERNEL_TIMEOUTS:
            self.receive(self.seconds)

    @contextlib.contextmanager
    def non_blocking(self):
        """The socket made non-blocking for a while (for sendfile), then as it was."""
        self._sock.setblocking(False)
        try:
            yield
        finally:
            if KERNEL_TIMEOUTS:
                self._sock.setblocking(True)
            else:
                self._receive = None
                self.receive(self.seconds)


def _timeval(seconds):
    """``seconds`` as a struct timeval, rounded up to a microsecond (so the
    kernel never waits less), at least one and at most LONGEST seconds' worth."""
    microseconds = max(1, min(math.ceil(seconds * 1e6), SocketTimeouts.LONGEST * 10 ** 6))
    return struct.pack("ll", *divmod(microseconds, 10 ** 6))


def _kernel_timeouts_work():
    """Whether sockets here take SO_RCVTIMEO as ``_timeval`` packs it: POSIX,
    and a timeval of two C longs (not a 32-bit system built with a 64-bit
    time_t, whose timeval is wider than its longs)."""
    if os.name != "posix":
        return False
    try:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(1))
            return probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                    len(_timeval(1))) == _timeval(1)
    except OSError:
        return False


KERNEL_TIMEOUTS = _kernel_timeouts_work()


def _timed_out():
    """What a read that failed with EAGAIN on a blocking socket (its kernel
    timeout), or a wait for room to send that ran out, raises."""
    return socket.timeout("timed out")


class RequestReader(io.RawIOBase):
    """The connection's raw input, with time limits beyond the socket's own
    per-operation timeout (which a client sending one byte just in time
    never trips): a request head must arrive whole within the timeout of its
    first byte, and a body must average MIN_BODY_RATE once it has been
    arriving for the timeout. Each read gets the time left as its timeout."""

    def __init__(self, sock, timeouts, timeout):
        super().__init__()
        self._sock = sock
        self._timeouts = timeouts
        self._timeout = timeout
        self._deadline = None          # for the head: a fixed time
        self._body_started = None      # for the body: the rate's clock
        self._body_bytes = 0

    def readable(self):
        return True

    def head_begins(self):
        self._deadline, self._body_started = time.monotonic() + self._timeout, None

    def body_begins(self):
        self._deadline, self._body_started, self._body_bytes = None, time.monotonic(), 0

    def no_deadline(self):
        """Only the per-operation timeout: between requests, and between a
        head and the first read of its body."""
        self._deadline = self._body_started = None

    def readinto(self, buffer):
        deadline = self._deadline
        if self._body_started is not None:
            deadline = self._body_started + self._timeout + self._body_bytes / MIN_BODY_RATE
        timeout = self._timeout
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("request too slow: its head must arrive within %gs, "
                                     "its body at %d bytes/s" % (self._timeout, MIN_BODY_RATE))
            timeout = min(left, timeout)
        self._timeouts.receive(timeout)
        try:
            count = self._sock.recv_into(buffer)
        except BlockingIOError:
            raise _timed_out() from None
        if self._body_started is not None:
            self._body_bytes += count
        return count


class ResponseWriter(io.BufferedIOBase):
    """The connection's output: every ``write`` sent whole before it returns
    (no buffer to flush). A client that takes nothing for the per-operation
    timeout is given up on with ``socket.timeout``; with kernel timeouts,
    one that keeps taking bytes, however slowly, is not (without them,
    ``sendall``'s timeout bounds each whole write).

    With kernel timeouts a send never blocks (MSG_DONTWAIT; a file's
    sendfile on the socket made non-blocking): what fits in the socket's
    buffer goes at once, in one call, and for the rest the writer waits in
    ``poll`` for room, up to the timeout each time. A blocking send with
    SO_SNDTIMEO would end short once the timeout's worth of time had passed,
    whatever the client took meanwhile, and a sendfile(2) call starts a
    fresh timeout for each piece it sends (a stalled client held one for
    3-4 timeouts).

    The send lets go of the GIL, although it does not wait, so that each
    request lets go of it once while it still has work to do, not only at
    the ``recv`` where its thread then sleeps. CPython gives a released GIL
    to whichever thread asks first: a thread whose ``recv`` has just
    returned, already on a CPU, beats one that is queued for the GIL,
    asleep, and the queued one's switch interval (5 ms) forces a hand-over
    only if no other thread has taken the GIL meanwhile. With the send made
    keeping the GIL (through ctypes), a few connections were served over and
    over while others waited: p99 of 1 KiB GETs from one process 0.4-0.75 s
    against 16-19 ms (README, "Round two", "Fair turns")."""

    def __init__(self, sock, timeouts):
        super().__init__()
        self._sock = sock
        self._timeouts = timeouts

    def writable(self):
        return True

    def write(self, data):
        if not KERNEL_TIMEOUTS:
            self._timeouts.sending()
            self._sock.sendall(data)
            return len(data)
        with memoryview(data) as view, view.cast("B") as left:
            while True:
                try:
                    left = left[self._sock.send(left, socket.MSG_DONTWAIT):]
                except BlockingIOError:
                    pass
                if not left:
                    return len(data)
                self._wait_for_room()

    def sendfile(self, file, offset, count):
        """Send ``count`` bytes of ``file`` from ``offset`` with sendfile(2)
        (fewer if the file ends first); return how many went out. The file is
        left positioned after them, even when the client stalls (socket.timeout)
        or leaves midway, so that the caller can count what was sent."""
        sent = 0
        with self._timeouts.non_blocking():
            try:
                while sent < count:
                    try:
                        done = os.sendfile(self._sock.fileno(), file.fileno(), offset + sent,
                                           count - sent)
                    except BlockingIOError:
                        self._wait_for_room()
                        continue
                    if not done:   # the file ended
                        break
                    sent += done
            finally:
                file.seek(offset + sent)
        return sent

    def _wait_for_room(self):
        """Until the socket can take more bytes; socket.timeout if it cannot
        within the timeout."""
        if not _ready(self._sock, writing=True, seconds=self._timeouts.seconds):
            raise _timed_out()


class Exchange:
    """One request on a connection and its response: read the head, frame the
    body, call the application, send what it returns, deal with what is left
    of the body, and account for it once (access log; metrics if the
    application did not count it)."""

    def __init__(self, connection, request_line):
        self.connection = connection
        self.server = connection.server
        self.raw_request_line = request_line
        self.request_line = request_line.decode("latin-1").rstrip("\r\n")
        self.started = time.monotonic()
        self.method = self.target = None   # from the request line, once it parsed
        self.head = None
        self.body = http11.NO_BODY
        self.keep_alive = False
        self.continue_pending = False
        self.status = None           # once the response head is sent
        self.response = None         # (status line, headers) from start_response
        self.length = None           # the response's Content-Length, if it has one
        self.sent = 0                # response body bytes sent
        self.counted_by_application = False

    def run(self):
        """Serve the exchange; True if the connection may carry another request."""
        try:
            self._serve()
        except (ConnectionError, socket.timeout) as error:
            # The client went away or stalled: nobody is left to answer.
            self.server.log.log("warning", '%s "%s" abandoned: %s' % (
                self.connection.client_address[0], logs.printable(self.request_line[:200]), error))
            self.keep_alive = False
        finally:
            self._account()
        return self.keep_alive

    def _serve(self):
        held = None   # whether the limiter still held the connection once the head was read
        try:
            self.method, self.target, minor = http11.parse_request_line(self.raw_request_line)
            self.head = http11.read_header_section(self.connection.rfile, self.method,
                                                   self.target, minor)
            self.keep_alive = self.head.keep_alive
            self.connection.reader.no_deadline()
            self.body = http11.frame_body(self.head, self.connection.rfile, self._body_begins)
            self.continue_pending = self.head.expects_continue and not self.body.finished
            held = self.server.connections.busy(self.connection.connection)
            if held:
                self._call_application()
            else:
                self._refuse_closing()
        except http11.ProtocolError as error:
            if held is None:   # a fault in the head: was it the limiter's closing that cut it short?
                held = self.server.connections.busy(self.connection.connection)
            if held:
                self.keep_alive = False
                self._send_error(error.status, str(error))
            else:   # the end-of-file may be ours, so the client is not blamed for any fault
                self._refuse_closing()
        except (ConnectionError, socket.timeout):
            raise
        except Exception:
            self.server.log.log("error", "unexpected error in %r:\n%s"
                                % (self.request_line[:200], traceback.format_exc()))
            self.keep_alive = False
            self._send_error(500, "internal server error")
        self._finish_request_body()

    def _refuse_closing(self):
        """Its slot went to a newcomer, or the drain closed it, as the request
        arrived: answer 503 without running it, so that the client retries."""
        self.keep_alive = False
        self._send_error(503, "too many connections; retry shortly", RETRY_AFTER)

    # The application's side ------------------------------------------------

    def _call_application(self):
        result = self.server.application(self._environ(), self._start_response)
        self.counted_by_application = self.server.metrics is not None
        try:
            self._send_result(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    def _environ(self):
        """The WSGI environ of this request (PEP 3333)."""
        head = self.head
        target = head.target
        path, _, query = (target if target[0] == "/" else _origin_form(target)).partition("?")
        environ = self.server.base_environ.copy()
        environ["REQUEST_METHOD"] = head.method
        environ["PATH_INFO"] = (urllib.parse.unquote_to_bytes(path).decode("latin-1")
                                if "%" in path else path)
        environ["QUERY_STRING"] = query
        environ["REQUEST_URI"] = target
        environ["SERVER_PROTOCOL"] = head.version
        environ["REMOTE_ADDR"] = self.connection.client_address[0]
        environ["wsgi.input"] = self.body
        environ[DRAINING_KEY] = self.server.connections.draining
        if self.body.length is not None:
            environ["CONTENT_LENGTH"] = str(self.body.length)
        for name, value in head.headers.items():
            if "_" in name or name == "content-length":
                continue   # "X_A" and "X-A" would both be HTTP_X_A: drop the ambiguous one
            key = name.upper().replace("-", "_")
            environ[key if key == "CONTENT_TYPE" else "HTTP_" + key] = value
        return environ

    def _start_response(self, status_line, headers, exc_info=None):
        if exc_info is not None:
            if self.status is not None:
                raise exc_info[1].with_traceback(exc_info[2])
        elif self.response is not None:
            raise AssertionError("start_response called twice without exc_info")
        kept, self.length = [], None
        for name, value in headers:
            lowered = name.lower()
            if lowered == "content-length":
                self.length = int(value)
            elif lowered not in HOP_BY_HOP:
                kept.append((name, value))
        self.response = (status_line, kept)
        return self._write

    def _write(self, data):
        """The legacy ``write`` callable of PEP 3333: the body so far, unbuffered."""
        self._send_head()
        self._send_bytes(data)

    def _send_result(self, result):
        """Send the response the application returned. PEP 3333: the head goes
        no sooner than the first non-empty block, and an application may call
        start_response as late as that (a generator does)."""
        started = self.response is not None
        if started and self._bodyless():
            self._send_head()
        elif (started and isinstance(result, FileWrapper) and self.length is not None
              and _sendable(result.filelike)):
            self._send_head()
            self._send_file(result.filelike)
        elif (started and self.status is None and isinstance(result, (list, tuple))
              and sum(map(len, result)) <= INLINE_BODY_BYTES):
            body = b"".join(result)
            if self.length is None:
                self.length = len(body)
            self._send_head(body[:self.length])
        else:
            for block in result:
                if block:
                    self._send_head()
                    self._send_bytes(block)
            self._send_head()
        if not self._bodyless() and self.length is not None and self.sent < self.length:
            raise ConnectionError("response body ended before its Content-Length")

    def _send_file(self, file):
        """Send ``self.length`` bytes of ``file`` from its position with sendfile,
        counting what went out even when the client stalls or leaves midway
        (ResponseWriter.sendfile leaves the file positioned after the bytes it sent).
        A file with ``checked_spans()`` gives the ``(offset, count)`` spans
        that may go out, as they may, and raises to cut the response short."""
        if hasattr(file, "checked_spans"):
            spans = file.checked_spans()
        else:
            spans = iter([(file.tell(), self.length)])
        try:
            for offset, count in spans:
                if count:
                    try:
                        self.connection.wfile.sendfile(file, offset, count)
                    finally:
                        self.sent += file.tell() - offset
                    if file.tell() - offset < count:   # the file ended early
                        return
        finally:
            if hasattr(spans, "close"):
                spans.close()

    def _bodyless(self):
        """True for a response that has no body whatever its headers say (RFC 9110 §6.4.1)."""
        code = self.response[0][:3]
        return self.method == "HEAD" or code in ("204", "304") or code[0] == "1"

    def _send_bytes(self, data):
        if self._bodyless():
            return
        if self.length is not None:
            data = data[:max(0, self.length - self.sent)]   # never more than announced
        self.connection.wfile.write(data)
        self.sent += len(data)

    # The gateway's side --------------------------------------------------------

    def _body_begins(self):
        """The application's first read of the body: its rate's clock starts,
        and the 100 Continue a client may wait for goes out."""
        self.connection.reader.body_begins()
        if self.continue_pending:
            self.continue_pending = False
            self.connection.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _send_error(self, status, message, extra_headers=()):
        """Answer with a JSON error, unless a response is already under way, in
        which case the only honest thing left is to close the connection."""
        if self.status is not None:
            self.keep_alive = False
            return
        body = json_error(message)
        self.response, self.length = (http11.status_line(status),
                                      [*JSON_ERROR_HEADERS, *extra_headers]), len(body)
        self._send_head(body)

    def _send_head(self, body=b""):
        """Send the response head (once), with ``body`` in the same send (none
        where the response can have none)."""
        if self.status is not None:
            return
        if self.response is None:
            raise RuntimeError("the application sent a body before calling start_response")
        if self._bodyless():
            body = b""
        status_line, headers = self.response
        if self.length is None or self.server.connections.draining or (
                not self.body.finished and (self.continue_pending or not self._can_drain_body())):
            self.keep_alive = False
        fields = [*self.server.standard_fields(), *headers]
        if self.length is not None:
            fields.append(("Content-Length", str(self.length)))
        self.connection.wfile.write(
            http11.format_response_head(status_line, fields, not self.keep_alive) + body)
        self.status = int(status_line[:3])   # only once it went out: else the client left first
        self.sent += len(body)

    def _can_drain_body(self):
        return self.body.length is not None and self.body.remaining <= DRAIN_BODY_BYTES

    def _finish_request_body(self):
        """Keep an unread body from being parsed as the next request
        (RFC 9112 §9.3): drop a small one, else close the connection."""
        if self.body.finished or not self.keep_alive:
            self._linger_if_unread()
            return
        buffer = bytearray(DRAIN_BODY_BYTES)
        try:
            while self.body.readinto(buffer):
                pass
        except (http11.ProtocolError, OSError):
            self.keep_alive = False

    def _linger_if_unread(self):
        """Before closing with body bytes still unread, read and drop what the
        client sends for a moment, so the close does not reset the connection
        before the client has read the response."""
        if self.body.finished or self.continue_pending:
            return
        sock = self.connection.connection
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_SECONDS
            while time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                if not sock.recv(65536):
                    break
        except OSError:
            pass

    def _account(self):
        """The access-log line and, unless the application counted it, the metrics."""
        seconds = time.monotonic() - self.started
        if self.server.metrics is not None and not self.counted_by_application:
            self.server.metrics.count(self.method, self.status, seconds, self.body.received,
                                      self.sent)
        if self.status is not None:
            self.server.log.access(self.connection.client_address[0], self.method, self.target,
                                   self.request_line, self.status, self.body.received, self.sent,
                                   seconds)


def _sendable(file):
    """True if ``file`` can be sent with sendfile: an operating system file,
    where there is sendfile (not on Windows)."""
    if not hasattr(os, "sendfile"):
        return False
    try:
        file.fileno()
    except (AttributeError, OSError):   # io.UnsupportedOperation is an OSError
        return False
    return True


def _origin_form(target):
    """The path and query of a request target in origin or absolute form (RFC 9112 §3.2)."""
    if target.startswith("/"):
        return target
    _, _, rest = target.partition("://")
    return "/" + rest.partition("/")[2]


class Connection(socketserver.StreamRequestHandler):
    """Serves one connection: a keep-alive sequence of Exchanges."""

    def setup(self):
        self.connection = self.request
        # Small responses must not wait ~40 ms for an ACK (Nagle's algorithm).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        timeouts = SocketTimeouts(self.connection, self.server.request_timeout)
        self.reader = RequestReader(self.connection, timeouts, self.server.request_timeout)
        self.rfile = io.BufferedReader(self.reader)
        self.wfile = ResponseWriter(self.connection, timeouts)

    def handle(self):
        limiter = self.server.connections
        served = 0
        while limiter.idle(self.connection, first_request=not served):
            try:
                if not self.rfile.peek(1):   # idle until a request begins (or the client leaves)
                    return
                self.reader.head_begins()
                limiter.reading_head(self.connection)
                raw = self.rfile.readline(http11.MAX_LINE_BYTES + 1)
                if raw in (b"\r\n", b"\n"):   # RFC 9112 §2.2: ignore an empty line before a request
                    raw = self.rfile.readline(http11.MAX_LINE_BYTES + 1)
            except (ConnectionError, socket.timeout):
                return   # idle too long, too slow, or gone: nothing to answer
            if not raw:
                return
            served += 1
            keep_alive = Exchange(self, raw).run()
            self.reader.no_deadline()
            if not keep_alive:
                return


class GatewayServer(ThreadingHTTPServer):
    """A threaded HTTP/1.1 server for one WSGI application.

    One thread per connection, at most ``max_connections`` of them (see
    ConnectionLimiter); threads are daemons so that a stuck client cannot
    keep the process alive, and ``drain`` gives in-flight requests their
    time at shutdown instead. ``metrics`` (the application's, if it keeps
    any) receives the requests the application never answered.
    """

    request_queue_size = 1024
    daemon_threads = True

    def __init__(self, address, application, *, request_timeout, max_connections,
                 log=None, metrics=None, multiprocess=False):
        self.application = application
        self.request_timeout = request_timeout
        self.connections = ConnectionLimiter(max_connections)
        self.log = log or logs.Log()
        self.error_stream = logs.ErrorStream(self.log)
        self.metrics = metrics
        self.multiprocess = multiprocess
        self._date = (0, "")
        self._next_warning = 0.0
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Connection)

    def server_bind(self):
        # HTTPServer.server_bind would look up the host's FQDN, which can
        # stall start-up on a machine without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        self.base_environ = {   # what every request's environ starts from (PEP 3333)
            "SCRIPT_NAME": "",
            "SERVER_NAME": self.server_name,
            "SERVER_PORT": str(self.server_port),
            "SERVER_SOFTWARE": SERVER_SOFTWARE,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input_terminated": True,   # every body ends where its framing says
            "wsgi.errors": self.error_stream,
            "wsgi.multithread": True,
            "wsgi.multiprocess": self.multiprocess,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper,
            CHECKED_SPANS_KEY: True,
        }

    def service_actions(self):
        """Called by ``serve_forever`` at least every poll interval: write the
        access lines gathered since the last call."""
        self.log.flush()

    def get_request(self):
        """Accept a connection. Out of file descriptors (EMFILE, ENFILE), accept
        fails at once and the listener stays readable, so serve_forever would
        spin: close some idle connections instead, and pause accepting a moment
        (socketserver ignores the OSError)."""
        try:
            return super().get_request()
        except OSError as error:
            if error.errno in (errno.EMFILE, errno.ENFILE):
                reclaimed = self.connections.reclaim_idle()
                self._warn_once_in_a_while(
                    "out of file descriptors (%s): closed %d idle connections; raise the limit "
                    "(ulimit -n) or lower --max-connections" % (error.strerror, reclaimed))
                time.sleep(OUT_OF_DESCRIPTORS_PAUSE)
            raise

    def _warn_once_in_a_while(self, message, every=10.0):
        now = time.monotonic()
        if now >= self._next_warning:
            self._next_warning = now + every
            self.log.log("warning", message)

    def process_request(self, request, client_address):
        if self.connections.admit(request):
            super().process_request(request, client_address)
        else:
            self._refuse(request, client_address)

    def _refuse(self, request, client_address):
        """Answer 503 on the accepting thread, without reading the request."""
        started = time.monotonic()
        body = json_error("too many connections; retry shortly")
        head = http11.format_response_head(
            http11.status_line(503),
            [*self.standard_fields(), *JSON_ERROR_HEADERS, *RETRY_AFTER,
             ("Content-Length", str(len(body)))],
            close=True)
        try:
            request.settimeout(1.0)
            request.sendall(head + body)
            request.setblocking(False)
            request.recv(65536)   # drop what has arrived: closing on unread bytes sends a reset
        except OSError:
            pass
        self.shutdown_request(request)
        seconds = time.monotonic() - started
        if self.metrics is not None:
            self.metrics.count(None, 503, seconds, 0, len(body))
        self.log.access(client_address[0], None, None, "-", 503, 0, len(body), seconds)

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
        left = self.connections.wait_closed(timeout)
        self.log.flush()
        return left

    def handle_error(self, request, client_address):
        """An exception escaped a connection's handler: log it, instead of socketserver's
        traceback on stderr."""
        self.log.log("error", "error serving %s:\n%s" % (client_address[0], traceback.format_exc()))

    def standard_fields(self):
        """``Date`` (formatted at most once a second) and ``Server``: the fields
        every response starts with."""
        now = int(time.time())
        cached = self._date
        if cached[0] != now:
            cached = self._date = (now, (("Date", email.utils.formatdate(now, usegmt=True)),
                                         ("Server", SERVER_SOFTWARE)))
        return cached[1]
