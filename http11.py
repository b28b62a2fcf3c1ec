"""HTTP/1.1 wire protocol on byte streams (RFC 9112): request heads, body framing, response heads.

Nothing here touches a socket: every function takes a binary file (a socket's
``makefile`` in the gateway, ``io.BytesIO`` in tests). A fault in what the
client sent is raised as a ``ProtocolError`` subclass carrying the status to
answer; after any of them the connection's framing cannot be trusted, so the
gateway closes it. A client that goes away mid-body raises ``ClientDisconnected``.
"""

import http
import re

MAX_LINE_BYTES = 8192        # request line, each header line, each chunk-size line
MAX_HEADER_FIELDS = 100
MAX_HEADER_BYTES = 64 * 1024
LARGEST_LENGTH = 1 << 62     # stands for a Content-Length too long to be worth converting

TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
REQUEST_LINE = re.compile(r"(%s) (\S+) HTTP/(\d)\.(\d)" % TOKEN)
FIELD_NAME = re.compile(TOKEN)
# Leading zeros are any number (the line's length bounds them); the rest at most 16 digits.
CHUNK_SIZE_LINE = re.compile(rb"0*([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r\n")
REASONS = {status.value: status.phrase for status in http.HTTPStatus}
# uri-host [ ":" port ] (RFC 3986 §3.2.2): an IP literal in brackets, or a
# reg-name (unreserved, pct-encoded, sub-delims: a comma is one), which may be empty.
# An IPv6 literal may carry a zone, "%25eth0" (RFC 6874) or the bare "%eth0"
# that Python's http.client up to 3.10 sends.
HOST_VALUE = re.compile(r"(?:\[[0-9A-Za-z.:_~!$&'()*+,;=-]+(?:%[0-9A-Za-z._~%-]+)?\]|[0-9A-Za-z._~!$&'()*+,;=%-]*)(?::[0-9]*)?")
WHITESPACE = " \t"   # the only whitespace in HTTP (RFC 9110 §5.6.3); str.strip() takes more


# Protocol faults, one class each (the gateway answers ``status`` in JSON) -----

class ProtocolError(Exception):
    """The request cannot be read as HTTP/1.1; answer ``status`` and close."""
    status = 400


class RequestLineTooLong(ProtocolError):
    status = 414


class MalformedRequestLine(ProtocolError):
    """Not ``METHOD SP target SP HTTP/1.x`` (RFC 9112 §3); HTTP/0.9 included."""


class UnsupportedVersion(ProtocolError):
    status = 505


class HeaderSectionTooLarge(ProtocolError):
    status = 431


class MalformedHeaderField(ProtocolError):
    """Includes obsolete line folding and whitespace before the colon (RFC 9112 §5)."""


class MissingHost(ProtocolError):
    """No Host field, or more than one, in an HTTP/1.1 request (RFC 9112 §3.2)."""


class InvalidHost(ProtocolError):
    """A Host field that is not ``uri-host [ ":" port ]`` (RFC 9112 §3.2)."""


class UnsupportedExpectation(ProtocolError):
    """An Expect other than 100-continue (RFC 9110 §10.1.1)."""
    status = 417


class IncompleteHeaderSection(ProtocolError):
    """The connection ended inside the header section."""


class InvalidFraming(ProtocolError):
    """Content-Length and Transfer-Encoding do not say one thing (RFC 9112 §6.1, §6.3)."""


class UnsupportedTransferCoding(ProtocolError):
    status = 501


class MalformedChunk(ProtocolError):
    """A chunk-size line, chunk data or trailer that breaks RFC 9112 §7.1."""


class ClientDisconnected(ConnectionError):
    """The client closed the connection before the end of the request body."""


# The request head ------------------------------------------------------------

class Headers:
    """Request header fields: ``{lowercase name: [values in order]}``."""

    def __init__(self, fields):
        self._fields = fields

    def values(self, name):
        """Every value of the field ``name`` (in lowercase), in order."""
        return self._fields.get(name, [])

    def get(self, name, default=None):
        """The value of the field ``name`` (in lowercase), repeated fields joined
        by ", " (RFC 9110 §5.3)."""
        values = self._fields.get(name)
        if values is None:
            return default
        return values[0] if len(values) == 1 else ", ".join(values)

    def items(self):
        """``(lowercase name, combined value)`` for each field name."""
        return [(name, values[0] if len(values) == 1 else ", ".join(values))
                for name, values in self._fields.items()]


class RequestHead:
    """A parsed request line and header section."""

    def __init__(self, method, target, minor_version, headers):
        self.method = method
        self.target = target
        self.version = "HTTP/1.%d" % minor_version
        self.headers = headers
        connection = headers.get("connection")
        self.keep_alive = minor_version >= 1 and (
            connection is None or "close" not in split_list(connection.lower()))
        expect = headers.get("expect")
        self.expects_continue = (minor_version >= 1 and expect is not None
                                 and expect.lower() == "100-continue")


def split_list(value):
    """The members of a comma-separated field value, without empty ones."""
    members = (item.strip(WHITESPACE) for item in value.split(","))
    return [item for item in members if item]


def read_line(rfile, error_class):
    """One line of at most MAX_LINE_BYTES; b"" at the end of the stream."""
    line = rfile.readline(MAX_LINE_BYTES + 1)
    if len(line) > MAX_LINE_BYTES:
        raise error_class("line longer than %d bytes" % MAX_LINE_BYTES)
    return line


def parse_request_line(raw):
    """``(method, target, minor_version)`` from a request line with its line end."""
    if len(raw) > MAX_LINE_BYTES:
        raise RequestLineTooLong("request line longer than %d bytes" % MAX_LINE_BYTES)
    line = raw.decode("latin-1")
    line = line[:-2] if line.endswith("\r\n") else line.rstrip("\n")
    match = REQUEST_LINE.fullmatch(line)
    if not match:
        raise MalformedRequestLine("malformed request line %r (HTTP/1.x required)" % line[:200])
    method, target, major, minor = match.groups()
    if major != "1":
        raise UnsupportedVersion("HTTP version %s.%s not supported; use HTTP/1.1" % (major, minor))
    return method, target, int(minor)


def read_header_fields(rfile):
    """Read header lines up to the empty line; a linear-time split of each."""
    fields = {}
    total = 0
    for _ in range(MAX_HEADER_FIELDS + 1):
        raw = rfile.readline(MAX_LINE_BYTES + 1)
        total += len(raw)
        if len(raw) > MAX_LINE_BYTES:
            raise HeaderSectionTooLarge("header line longer than %d bytes" % MAX_LINE_BYTES)
        if total > MAX_HEADER_BYTES:
            raise HeaderSectionTooLarge("header section larger than %d bytes" % MAX_HEADER_BYTES)
        if raw in (b"\r\n", b"\n"):
            return Headers(fields)
        if not raw:
            raise IncompleteHeaderSection("connection closed inside the header section")
        name, value = parse_field_line(raw, MalformedHeaderField)
        fields.setdefault(name.lower(), []).append(value)
    raise HeaderSectionTooLarge("more than %d header fields" % MAX_HEADER_FIELDS)


def parse_field_line(raw, error_class):
    """``(name, value)`` of one header or trailer line, in linear time: the name a
    token right before the colon (no whitespace: RFC 9112 §5.1, which also rules
    out obsolete line folding), the value without the spaces and tabs around it.
    A CR anywhere but just before the final LF, and NUL, are refused (§2.2)."""
    line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    name, colon, value = line.decode("latin-1").partition(":")
    if not colon or not FIELD_NAME.fullmatch(name) or "\r" in value or "\0" in value:
        raise error_class("malformed field line %r" % raw[:100])
    return name, value.strip(WHITESPACE)


def read_request_head(rfile, request_line):
    """Parse ``request_line`` (already read) and the header section after it."""
    return read_header_section(rfile, *parse_request_line(request_line))


def read_header_section(rfile, method, target, minor):
    """The RequestHead of a parsed request line, reading its header section.
    An HTTP/1.1 request needs exactly one Host field, a valid one (RFC 9112 §3.2)."""
    headers = read_header_fields(rfile)
    hosts = headers.values("host")
    if minor >= 1 and len(hosts) != 1:
        raise MissingHost("an HTTP/1.1 request needs exactly one Host header field")
    if hosts and not HOST_VALUE.fullmatch(hosts[0]):
        raise InvalidHost("invalid Host %r" % hosts[0][:100])
    head = RequestHead(method, target, minor, headers)
    expect = headers.get("expect")
    if minor >= 1 and expect is not None and not head.expects_continue:
        raise UnsupportedExpectation("the only expectation supported is 100-continue, not %r"
                                     % expect[:100])
    return head


# Request bodies ----------------------------------------------------------------

class RequestBody:
    """A request body being read from the connection: a binary stream (the
    ``wsgi.input`` of PEP 3333) that ends where the framing says, whatever
    follows on the connection. Subclasses frame it in ``readinto``.

    Its first read calls ``on_first_read`` (the gateway sends the ``100
    Continue`` a client may wait for, RFC 9110 §10.1.1), so a request refused
    before its body is read gets its final status instead. (Not an
    ``io.RawIOBase``: its construction and finalizer cost more than a small
    request's parsing.)
    """

    length = None   # total length when known in advance

    def __init__(self, rfile, on_first_read):
        self._rfile = rfile
        self._on_first_read = on_first_read
        self.started = False
        self.finished = False
        self.received = 0   # body bytes read so far

    def read(self, size=-1):
        """Up to ``size`` bytes, or all that is left if ``size`` is negative or None."""
        if size is not None and size >= 0:
            buffer = bytearray(size)
            return bytes(memoryview(buffer)[:self.readinto(buffer)])
        parts = bytearray()
        buffer = bytearray(256 * 1024)
        while True:
            count = self.readinto(buffer)
            if not count:
                return bytes(parts)
            parts += memoryview(buffer)[:count]

    def readline(self, size=-1):
        """Up to and including the next b"\n", at most ``size`` bytes."""
        line = bytearray()
        byte = bytearray(1)
        while (size is None or size < 0 or len(line) < size) and self.readinto(byte):
            line += byte
            if byte == b"\n":
                break
        return bytes(line)

    def readlines(self, hint=-1):
        lines = []
        for line in self:
            lines.append(line)
            if 0 < hint <= sum(map(len, lines)):
                break
        return lines

    def __iter__(self):
        return iter(self.readline, b"")

    def _start(self):
        if not self.started:
            self.started = True
            self._on_first_read()

    def _read_some(self, buffer, limit):
        """Read up to ``limit`` bytes into ``buffer``; the stream ending here is a cut-off."""
        count = self._rfile.readinto(memoryview(buffer)[:limit])
        if not count:
            raise cut_off()
        self.received += count
        return count


def cut_off():
    return ClientDisconnected("connection closed before the end of the request body")


class EmptyBody(RequestBody):
    """No body: neither Content-Length nor Transfer-Encoding (RFC 9112 §6.3).
    It has no state to change, so one instance, ``NO_BODY``, serves every request."""

    length = 0

    def __init__(self):
        super().__init__(None, None)
        self.started = self.finished = True

    def readinto(self, buffer):
        return 0

    def read(self, size=-1):
        return b""


class FixedLengthBody(RequestBody):
    """A body framed by Content-Length."""

    def __init__(self, rfile, length, on_first_read):
        super().__init__(rfile, on_first_read)
        self.length = self.remaining = length
        self.finished = length == 0

    def readinto(self, buffer):
        if not len(buffer):
            return 0
        self._start()
        if not self.remaining:
            return 0
        count = self._read_some(buffer, min(len(buffer), self.remaining))
        self.remaining -= count
        self.finished = not self.remaining
        return count

    def read(self, size=-1):
        """Up to ``size`` bytes (all that is left if negative), in one allocation:
        a whole body read at once is filled in place, never gathered and copied."""
        self._start()
        wanted = self.remaining if size is None or size < 0 else min(size, self.remaining)
        data = self._rfile.read(wanted)
        if len(data) != wanted:
            raise cut_off()
        self.received += wanted
        self.remaining -= wanted
        self.finished = not self.remaining
        return data


class ChunkedBody(RequestBody):
    """A body in the chunked transfer coding (RFC 9112 §7.1). Extensions are
    ignored; trailer fields are read and dropped."""

    def __init__(self, rfile, on_first_read):
        super().__init__(rfile, on_first_read)
        self._chunk_left = 0

    def readinto(self, buffer):
        if not len(buffer):
            return 0
        self._start()
        if self.finished:
            return 0
        if not self._chunk_left:
            self._chunk_left = self._read_chunk_size()
            if not self._chunk_left:
                self._read_trailers()
                self.finished = True
                return 0
        count = self._read_some(buffer, min(len(buffer), self._chunk_left))
        self._chunk_left -= count
        if not self._chunk_left and self._rfile.read(2) != b"\r\n":
            raise MalformedChunk("chunk data not followed by CRLF")
        return count

    def _read_line(self):
        line = read_line(self._rfile, MalformedChunk)
        if not line:
            raise cut_off()
        return line

    def _read_chunk_size(self):
        match = CHUNK_SIZE_LINE.fullmatch(self._read_line())
        if not match:
            raise MalformedChunk("malformed chunk size line")
        return int(match.group(1), 16)

    def _read_trailers(self):
        """Read the trailer section and drop it; each line must be a field line."""
        for _ in range(MAX_HEADER_FIELDS + 1):
            line = self._read_line()
            if line in (b"\r\n", b"\n"):
                return
            parse_field_line(line, MalformedChunk)
        raise MalformedChunk("too many trailer fields")


NO_BODY = EmptyBody()


def frame_body(head, rfile, on_first_read):
    """The body of the request ``head`` announces, as a RequestBody on ``rfile``
    (RFC 9112 §6.1, §6.3). Conflicting or unclear framing is refused: a proxy
    in front might read it differently (request smuggling)."""
    transfer_encoding = head.headers.get("transfer-encoding")
    content_length = head.headers.get("content-length")
    if transfer_encoding is not None:
        if content_length is not None:
            raise InvalidFraming("both Transfer-Encoding and Content-Length given")
        if head.version == "HTTP/1.0":
            raise InvalidFraming("Transfer-Encoding is not allowed in HTTP/1.0")
        codings = [coding.lower() for coding in split_list(transfer_encoding)]
        if codings[-1:] != ["chunked"] or codings.count("chunked") > 1:
            raise InvalidFraming("chunked must be the final transfer coding, applied once")
        if len(codings) > 1:
            raise UnsupportedTransferCoding("transfer coding %r not supported" % codings[0])
        return ChunkedBody(rfile, on_first_read)
    if content_length is not None:
        length = parse_content_length(content_length)
        if length:
            return FixedLengthBody(rfile, length, on_first_read)
    return NO_BODY


def parse_content_length(value):
    """The length a Content-Length value states: digits only (``int()`` would take
    "+5", " 5 " and "1_0"); identical repeated values count as one."""
    if value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    values = set(split_list(value))
    if len(values) != 1 or not all(item.isascii() and item.isdigit() for item in values):
        raise InvalidFraming("invalid Content-Length %r" % value[:100])
    digits = values.pop().lstrip("0")
    return int(digits or "0") if len(digits) <= 18 else LARGEST_LENGTH


# Responses ---------------------------------------------------------------------

def format_response_head(status_line, headers, close):
    """The bytes of a response's status line and header section; ``headers``
    are ``(name, value)`` pairs, ``close`` adds ``Connection: close``."""
    fields = "".join(["%s: %s\r\n" % field for field in headers])
    return ("HTTP/1.1 %s\r\n%s%s\r\n" % (status_line, fields, "Connection: close\r\n" if close else "")
            ).encode("latin-1")


def status_line(status):
    """``"404 Not Found"`` for 404."""
    return "%d %s" % (status, REASONS.get(status, ""))
