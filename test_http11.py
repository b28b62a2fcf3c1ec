"""The wire protocol (``http11.py``) as tables: raw bytes in, a parsed result
or a protocol fault out. No sockets: every stream is an ``io.BytesIO``."""

import io
import time
import unittest

import http11


def parse_head(data):
    """Parse a whole request head from ``data``; returns the RequestHead and the rest of the stream."""
    stream = io.BytesIO(data)
    head = http11.read_request_head(stream, stream.readline(http11.MAX_LINE_BYTES + 1))
    return head, stream


def read_body(data, head_fields=b""):
    """Frame and read the body after a PUT head with ``head_fields``; ``(body, what follows)``."""
    head, stream = parse_head(b"PUT /data/r HTTP/1.1\r\nHost: x\r\n" + head_fields + b"\r\n" + data)
    body = http11.frame_body(head, stream, lambda: None)
    return body.read(), stream.read()


class RequestHeadTest(unittest.TestCase):
    def test_request_lines(self):
        for raw, expected in ((b"GET /data/r HTTP/1.1\r\n", ("GET", "/data/r", "HTTP/1.1")),
                              (b"PUT http://h/data/r?q HTTP/1.0\n", ("PUT", "http://h/data/r?q",
                                                                     "HTTP/1.0")),
                              (b"BREW /x HTTP/1.9\r\n", ("BREW", "/x", "HTTP/1.9"))):
            with self.subTest(raw=raw):
                head, _ = parse_head(raw + b"Host: x\r\n\r\n")
                self.assertEqual((head.method, head.target, head.version), expected)

    def test_malformed_request_lines(self):
        for raw, error in ((b"GARBAGE\r\n", http11.MalformedRequestLine),
                           (b"GET /\r\n", http11.MalformedRequestLine),          # HTTP/0.9
                           (b"GET / HTTP/1\r\n", http11.MalformedRequestLine),
                           (b"GET  / HTTP/1.1\r\n", http11.MalformedRequestLine),
                           (b"GET / HTTP/1.1 \r\n", http11.MalformedRequestLine),
                           (b"G\x00T / HTTP/1.1\r\n", http11.MalformedRequestLine),
                           (b"GET / HTTP/2.0\r\n", http11.UnsupportedVersion),
                           (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n", http11.RequestLineTooLong)):
            with self.subTest(raw=raw[:30]):
                with self.assertRaises(error) as caught:
                    http11.parse_request_line(raw)
                self.assertIn(caught.exception.status, (400, 414, 505))

    def test_header_fields(self):
        head, _ = parse_head(b"GET / HTTP/1.1\r\nHost: x\r\nX-A:\t padded \t\r\nx-a: again\r\n"
                             b"Empty:\r\n\r\n")
        self.assertEqual(head.headers.get("host"), "x")
        self.assertEqual(head.headers.get("x-a"), "padded, again")   # RFC 9110 §5.3
        self.assertEqual(head.headers.get("empty"), "")
        self.assertIsNone(head.headers.get("missing"))

    def test_malformed_header_sections(self):
        many = b"".join(b"X-%d: y\r\n" % i for i in range(101))
        for fields, error in ((b"X-Long: " + b"a" * 9000 + b"\r\n", http11.HeaderSectionTooLarge),
                              (many, http11.HeaderSectionTooLarge),
                              (b"X: " + b"a" * 8000 + b"\r\n" * 1 + (b"Y: " + b"b" * 8000 + b"\r\n") * 8,
                               http11.HeaderSectionTooLarge),
                              (b"Bad Name: x\r\n", http11.MalformedHeaderField),
                              (b"X-Fold: a\r\n  folded\r\n", http11.MalformedHeaderField),
                              (b"Host : x\r\n", http11.MalformedHeaderField),
                              (b": x\r\n", http11.MalformedHeaderField),
                              (b"NoColon\r\n", http11.MalformedHeaderField),
                              (b"X: a\x00b\r\n", http11.MalformedHeaderField),
                              (b"X: a\rb\r\n", http11.MalformedHeaderField)):
            with self.subTest(fields=fields[:30]):
                with self.assertRaises(error):
                    parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        with self.assertRaises(http11.IncompleteHeaderSection):
            parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n")

    def test_line_ends_and_bare_cr(self):
        head, _ = parse_head(b"GET / HTTP/1.1\nHost: x\nX: a\n\n")   # bare LF ends lines
        self.assertEqual(head.headers.get("x"), "a")
        for raw in (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\r\n\r\n",
                    b"GET / HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n",
                    b"GET / HTTP/1.1\r\nHost: x\r\nX\r: a\r\n\r\n"):
            with self.subTest(raw=raw):
                with self.assertRaises(http11.MalformedHeaderField):
                    parse_head(raw)
        with self.assertRaises(http11.MalformedRequestLine):
            parse_head(b"GET / HTTP/1.1\r\r\nHost: x\r\n\r\n")

    def test_host(self):
        for fields, error in ((b"", True), (b"Host: a\r\nHost: a\r\n", True),
                              (b"Host: a\r\n", False), (b"Host:\r\n", False)):
            with self.subTest(fields=fields):
                raw = b"GET / HTTP/1.1\r\n" + fields + b"\r\n"
                if error:
                    with self.assertRaises(http11.MissingHost) as caught:
                        parse_head(raw)
                    self.assertEqual(caught.exception.status, 400)
                else:
                    parse_head(raw)
        parse_head(b"GET / HTTP/1.0\r\n\r\n")   # optional before 1.1

    def test_host_values(self):
        for value, valid in ((b"example.com:8080", True), (b"127.0.0.1", True), (b"[::1]:80", True),
                             (b"a,b", True), (b"x%41:", True),   # a reg-name may hold both
                             (b"[fe80::1%25eth0]", True), (b"[fe80::1%eth0]:8080", True),
                             (b"a b", False), (b"x/y", False), (b"[::1", False), (b"@@@", False),
                             (b"x:8a", False), (b"\xc3\xa9", False)):
            for version in (b"1.1", b"1.0"):
                with self.subTest(value=value, version=version):
                    raw = b"GET / HTTP/" + version + b"\r\nHost: " + value + b"\r\n\r\n"
                    if valid:
                        parse_head(raw)
                    else:
                        with self.assertRaises(http11.InvalidHost) as caught:
                            parse_head(raw)
                        self.assertEqual(caught.exception.status, 400)

    def test_only_space_and_tab_are_whitespace(self):
        for fields, error in ((b"Transfer-Encoding: \x0bchunked\r\n", http11.InvalidFraming),
                              (b"Transfer-Encoding: chunked\x85\r\n", http11.InvalidFraming),
                              (b"Content-Length: \xa03\r\n", http11.InvalidFraming),
                              (b"Content-Length: \x0c3\r\n", http11.InvalidFraming),
                              (b"Content-Length: 3\x1c\r\n", http11.InvalidFraming)):
            with self.subTest(fields=fields):
                with self.assertRaises(error):
                    read_body(b"abc0\r\n\r\n", fields)
        self.assertEqual(read_body(b"abc", b"Content-Length: \t 3 \t\r\n"), (b"abc", b""))

    def test_header_parsing_is_linear(self):
        spaces = b"X:" + b" " * 8000 + b"a" + b" " * 180 + b"\r\n"
        head = b"GET / HTTP/1.1\r\nHost: x\r\n" + spaces * 7 + b"\r\n"
        started = time.process_time()
        parse_head(head)
        self.assertLess(time.process_time() - started, 0.05)

    def test_unknown_expectation_is_417(self):
        for expect in (b"100-continue, x", b"200-ok", b""):
            with self.subTest(expect=expect):
                with self.assertRaises(http11.UnsupportedExpectation) as caught:
                    parse_head(b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: " + expect + b"\r\n\r\n")
                self.assertEqual(caught.exception.status, 417)
        parse_head(b"PUT / HTTP/1.0\r\nExpect: 200-ok\r\n\r\n")   # 1.0 ignores Expect

    def test_keep_alive_and_expect(self):
        for raw, keep_alive, expects_continue in (
                (b"GET / HTTP/1.1\r\nHost: x\r\n", True, False),
                (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Close\r\n", False, False),
                (b"GET / HTTP/1.0\r\n", False, False),
                (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n", False, False),
                (b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-Continue\r\n", True, True),
                (b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\n", False, False)):   # never to 1.0
            with self.subTest(raw=raw):
                head, _ = parse_head(raw + b"\r\n")
                self.assertEqual((head.keep_alive, head.expects_continue),
                                 (keep_alive, expects_continue))


class BodyFramingTest(unittest.TestCase):
    def test_bodies(self):
        for fields, data, body, rest in (
                (b"", b"GET / HTTP/1.1\r\nHost: x\r\n", b"", b"GET / HTTP/1.1\r\nHost: x\r\n"),
                (b"Content-Length: 5\r\n", b"helloNEXT", b"hello", b"NEXT"),
                (b"Content-Length: 005\r\n", b"hello", b"hello", b""),
                (b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello", b"hello", b""),
                (b"Content-Length: 5, 5\r\n", b"hello", b"hello", b""),
                (b"Content-Length: 0\r\n", b"NEXT", b"", b"NEXT"),
                (b"Transfer-Encoding: chunked\r\n",
                 b"5;ext=1\r\nhello\r\n1\r\n \r\n000005\r\nworld\r\n0\r\nX-T: 1\r\n\r\nNEXT",
                 b"hello world", b"NEXT"),
                (b"Transfer-Encoding: Chunked\r\n", b"0\r\n\r\n", b"", b""),
                (b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n", b"abc", b""),
                (b"Transfer-Encoding: chunked\r\n", b"0" * 20 + b"3\r\nabc\r\n" + b"0" * 20 + b"\r\n\r\n",
                 b"abc", b"")):
            with self.subTest(fields=fields, data=data):
                self.assertEqual(read_body(data, fields), (body, rest))

    def test_refused_framing(self):
        for fields, error in (
                (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", http11.InvalidFraming),
                (b"Content-Length: 5\r\nContent-Length: 6\r\n", http11.InvalidFraming),
                (b"Content-Length: 5, 6\r\n", http11.InvalidFraming),
                (b"Content-Length: +5\r\n", http11.InvalidFraming),
                (b"Content-Length: -5\r\n", http11.InvalidFraming),
                (b"Content-Length: 1_0\r\n", http11.InvalidFraming),
                (b"Content-Length: 5x\r\n", http11.InvalidFraming),
                (b"Content-Length: \xd9\xa5\r\n", http11.InvalidFraming),   # an Arabic-Indic 5
                (b"Transfer-Encoding: chunked, chunked\r\n", http11.InvalidFraming),
                (b"Transfer-Encoding: chunked, gzip\r\n", http11.InvalidFraming),
                (b"Transfer-Encoding: gzip, chunked\r\n", http11.UnsupportedTransferCoding)):
            with self.subTest(fields=fields):
                with self.assertRaises(error):
                    read_body(b"hello", fields)
        head, stream = parse_head(b"PUT / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n")
        with self.assertRaises(http11.InvalidFraming):
            http11.frame_body(head, stream, lambda: None)

    def test_huge_content_length_is_not_converted(self):
        head, stream = parse_head(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n")
        self.assertEqual(http11.frame_body(head, stream, lambda: None).length,
                         http11.LARGEST_LENGTH)

    def test_malformed_chunks(self):
        for data, error in ((b"zz\r\nhello\r\n0\r\n\r\n", http11.MalformedChunk),
                            (b"5\r\nhelloXX0\r\n\r\n", http11.MalformedChunk),
                            (b"5\nhello\r\n0\r\n\r\n", http11.MalformedChunk),
                            (b"-5\r\nhello\r\n0\r\n\r\n", http11.MalformedChunk),
                            (b"1" * 20 + b"\r\n", http11.MalformedChunk),
                            (b"F" * 9000 + b"\r\n", http11.MalformedChunk),
                            (b"0\r\n" + b"T: 1\r\n" * 101 + b"\r\n", http11.MalformedChunk),
                            (b"0\r\nnot a field\r\n\r\n", http11.MalformedChunk),
                            (b"0\r\nT : 1\r\n\r\n", http11.MalformedChunk),
                            (b"5\r\nhel", http11.ClientDisconnected),
                            (b"5\r\nhello\r\n", http11.ClientDisconnected)):
            with self.subTest(data=data[:30]):
                with self.assertRaises(error):
                    read_body(data, b"Transfer-Encoding: chunked\r\n")

    def test_cut_off_fixed_length_body(self):
        with self.assertRaises(http11.ClientDisconnected):
            read_body(b"half", b"Content-Length: 10\r\n")

    def test_first_read_announces_itself_once(self):
        head, stream = parse_head(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabcdef")
        reads = []
        body = http11.frame_body(head, stream, lambda: reads.append("continue"))
        self.assertEqual(reads, [])   # framing alone sends no 100 Continue
        buffer = bytearray(4)
        self.assertEqual((body.readinto(buffer), body.read(), body.received), (4, b"ef", 6))
        self.assertEqual((reads, body.finished), (["continue"], True))

    def test_reading_nothing_reads_nothing(self):
        for fields, data in ((b"Content-Length: 3\r\n", b"abc"),
                             (b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n")):
            with self.subTest(fields=fields):
                head, stream = parse_head(b"PUT / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n" + data)
                body = http11.frame_body(head, stream, lambda: None)
                self.assertEqual((body.read(0), body.readinto(bytearray())), (b"", 0))
                self.assertEqual(body.read(), b"abc")

    def test_body_is_a_readable_stream(self):
        head, stream = parse_head(b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"6\r\nline1\n\r\n6\r\nline2\n\r\n0\r\n\r\n")
        body = http11.frame_body(head, stream, lambda: None)
        self.assertEqual(list(body), [b"line1\n", b"line2\n"])   # readline and iteration (PEP 3333)


class ResponseHeadTest(unittest.TestCase):
    def test_format(self):
        self.assertEqual(
            http11.format_response_head(http11.status_line(404), [("Content-Length", "2")], False),
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n")
        self.assertEqual(
            http11.format_response_head("201 Created", [], True),
            b"HTTP/1.1 201 Created\r\nConnection: close\r\n\r\n")


if __name__ == "__main__":
    unittest.main()
