"""The small-object baseline for bench.py: the least an HTTP/1.1 server must do.

Parses each request with the standard library, hashes a PUT body with
SHA-256, and replies; it stores nothing and logs nothing. Same settings as the
service: HTTP/1.1 keep-alive, TCP_NODELAY, a thread per connection.

    python bench/baseline_server.py PORT
"""

import hashlib
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class BaselineHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    object_body = b"x" * 1024

    def do_PUT(self):
        data = self.rfile.read(int(self.headers["Content-Length"]))
        oid = hashlib.sha256(data).hexdigest()
        self.reply(201, b'{"oid": "%s", "size": %d}' % (oid.encode(), len(data)))

    def do_GET(self):
        self.reply(200, self.object_body)

    def reply(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


class BaselineServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024


if __name__ == "__main__":
    server = BaselineServer(("127.0.0.1", int(sys.argv[1])), BaselineHandler)
    print("baseline listening on http://127.0.0.1:%d" % server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
