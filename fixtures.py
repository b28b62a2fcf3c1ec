"""Test helpers shared by the test modules (none of which imports another).

- waiting on conditions, temporary directories and stores, a small real filesystem;
- ``WSGIClientMixin``: requests to an application in-process, through ``wsgiref.validate``;
- ``HTTPClientMixin`` and ``RunningServer``: requests over loopback to a real gateway;
- ``ServerProcess``: ``python server.py`` in a subprocess.
Both clients return a ``Response`` and share ``ResponseAssertions``.
"""

import contextlib
import hashlib
import http.client
import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
import uuid
import wsgiref.util
import wsgiref.validate

import gateway
import logs
import s3
import sigv4
import storage

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER_SCRIPT = os.path.join(HERE, "server.py")


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def wait_until(condition, timeout=10.0):
    """Poll ``condition`` until it holds; fail the test if it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within %s s" % timeout)
        time.sleep(0.005)


def run_concurrently(calls):
    """Run each callable on a thread of its own, all at once, and wait for them
    all; then raise the first exception any of them raised (a thread's
    exception would otherwise vanish, and its test pass having done less)."""
    failures = []

    def run(call):
        try:
            call()
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def temporary_directory(test):
    """A fresh directory removed when ``test`` ends."""
    directory = tempfile.TemporaryDirectory()
    test.addCleanup(directory.cleanup)
    return directory.name


def open_disk_store(test, root, **options):
    store = storage.DiskStore(root, **options)
    test.addCleanup(store.close)
    return store


@contextlib.contextmanager
def small_filesystem(test, size="1m", inodes=None, read_only=False):
    """A tmpfs of ``size`` (and at most ``inodes`` files and directories) for
    real ENOSPC, or EROFS if ``read_only``; skips the test where mounting is
    not allowed."""
    mount_point = temporary_directory(test)
    options = "size=" + size + (",nr_inodes=%d" % inodes if inodes else "") + (
        ",ro" if read_only else "")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", mount_point],
                            capture_output=True)
    if result.returncode != 0:
        test.skipTest("cannot mount a tmpfs here: %s" % result.stderr.decode().strip())
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", mount_point], check=True)


S3_ENGINES = {"seaweedfs": "SeaweedFS", "ceph-rgw": "Ceph RGW"}


def s3_engine(engine):
    """The running S3 engine ``engine`` (a key of S3_ENGINES) as a dict with
    ``endpoint``, ``access_key``, ``secret_key`` and ``region``, from the
    variable DATA_STORAGE_TEST_<ENGINE>, which holds the line that
    ``tools/s3engines/<engine>.sh start DIR`` prints; SkipTest without it."""
    variable = "DATA_STORAGE_TEST_" + engine.upper().replace("-", "_")
    line = os.environ.get(variable)
    if not line:
        raise unittest.SkipTest("no %s engine: run tools/s3engines/%s.sh start DIR and set %s "
                                "to the line it prints (.ci/run does)"
                                % (S3_ENGINES[engine], engine, variable))
    return dict(field.split("=", 1) for field in line.split())


def new_bucket(test, engine, endpoint=None):
    """``(client, bucket)``: an S3 client of ``engine`` (from s3_engine) and a
    new, empty bucket of its own, emptied and removed when the test ends (Ceph
    RGW's test OSD keeps everything in memory, and is full at 2 GiB)."""
    client = s3.Client(endpoint or engine["endpoint"], engine["region"],
                       sigv4.Credentials(engine["access_key"], engine["secret_key"]))
    test.addCleanup(client.close)
    bucket = "test-" + uuid.uuid4().hex[:20]
    status, _, body = client.request("CreateBucket", "PUT", "/" + bucket)
    test.assertEqual(status, 200, body)
    test.addCleanup(_remove_bucket, client, bucket)
    return client, bucket


def _remove_bucket(client, bucket):
    while True:
        status, _, body = client.request("ListObjectsV2", "GET", "/" + bucket, [("list-type", "2")])
        keys = re.findall(rb"<Key>([^<]*)</Key>", body) if status == 200 else []
        if not keys:
            break
        for key in keys:
            client.request("DeleteObject", "DELETE", "/%s/%s" % (
                bucket, key.decode().replace("&amp;", "&")))
    client.request("DeleteBucket", "DELETE", "/" + bucket)


def files_under(root):
    return sorted(os.path.relpath(os.path.join(top, name), root)
                  for top, _, names in os.walk(root) for name in names)


def descriptors_under(root):
    """The paths under ``root`` that this process holds open, sorted (one per
    descriptor). Only these: a count of all its descriptors also moves with
    the sockets that other tests' server threads are still closing."""
    root = os.path.realpath(root)
    paths = []
    for number in os.listdir("/proc/self/fd"):
        try:
            path = os.readlink(os.path.join("/proc/self/fd", number))
        except OSError:   # closed since the listing (the listing's own, for one)
            continue
        if path == root or path.startswith(root + os.sep):
            paths.append(path)
    return sorted(paths)


def in_forked_child(function):
    """What ``function()`` returns (bytes) when run in a forked child process;
    b"" if it raised or the child died."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, function())
        finally:
            os._exit(0)
    os.close(write)
    try:
        return b"".join(iter(lambda: os.read(read, 65536), b""))
    finally:
        os.close(read)
        os.waitpid(pid, 0)


def child_pids(pid):
    with open("/proc/%d/task/%d/children" % (pid, pid)) as file:
        return [int(child) for child in file.read().split()]


def running(pid):
    """True while process ``pid`` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def closed_by_server(sock):
    """True once the server has closed ``sock`` (without waiting if it has not)."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def read_line(pipe, timeout=10.0):
    """The next line from an unbuffered subprocess pipe (``bufsize=0``, so that
    select sees every byte not yet read), failing instead of hanging."""
    ready, _, _ = select.select([pipe], [], [], timeout)
    if not ready:
        raise AssertionError("no output within %s s" % timeout)
    return pipe.readline()


def metric_samples(text):
    """``{sample name with labels: value}`` from a Prometheus text exposition."""
    return {name: float(value) for name, _, value in
            (line.rpartition(" ") for line in text.splitlines() if not line.startswith("#"))}


class Response:
    """A response: status, headers (case-insensitive), body."""

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    @classmethod
    def read(cls, response):
        """From an ``http.client.HTTPResponse``."""
        return cls(response.status, response.msg, response.read())

    def json(self):
        return json.loads(self.body)


class ResponseAssertions:
    """Assertions and shortcuts on top of ``self.request(method, path, body, headers)``."""

    def put(self, repository, data):
        response = self.request("PUT", "/data/%s" % repository, data)
        self.assertEqual(response.status, 201, response.body)
        return response.json()["oid"]

    def assertJSONError(self, response, status):
        self.assertEqual(response.status, status, response.body)
        self.assertEqual(response.headers["Content-Type"], "application/json")
        self.assertEqual(response.headers["Cache-Control"], "no-store")   # an answer of the moment
        self.assertIsInstance(response.json()["error"], str)

    def assertNotStored(self, repository, data):
        self.assertEqual(self.request("GET", "/data/%s/%s" % (repository, sha256(data))).status,
                         404)


class WSGIClientMixin(ResponseAssertions):
    """Calls ``self.app`` in-process through ``wsgiref.validate``, as a WSGI
    server would: REQUEST_URI carries the raw target (as gunicorn's RAW_URI and
    uWSGI's REQUEST_URI do); ``chunked`` sends the body without CONTENT_LENGTH,
    with ``wsgi.input_terminated``; ``file_wrapper`` offers ``wsgi.file_wrapper``."""

    def environ(self, method, path, body=b"", headers=None, chunked=False, file_wrapper=False):
        environ = {}
        wsgiref.util.setup_testing_defaults(environ)
        origin_form = path if path.startswith("/") else "/" + path.partition("://")[2].partition("/")[2]
        raw_path, _, query = origin_form.partition("?")
        environ.update(REQUEST_METHOD=method, REQUEST_URI=path, QUERY_STRING=query,
                       PATH_INFO=urllib.parse.unquote_to_bytes(raw_path).decode("latin-1"))
        environ["wsgi.input"] = io.BytesIO(body or b"")
        if chunked:
            environ["wsgi.input_terminated"] = True
        else:
            environ["CONTENT_LENGTH"] = str(len(body or b""))
        if file_wrapper:
            environ["wsgi.file_wrapper"] = wsgiref.util.FileWrapper
        for name, value in (headers or {}).items():
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        return environ

    def request(self, method, path, body=None, headers=None, **options):
        return self.call(self.environ(method, path, body, headers, **options))

    def call(self, environ):
        """Run the application on ``environ``; the Response it gives."""
        started = {}

        def start_response(status, headers, exc_info=None):
            started["status"], started["headers"] = status, headers

        result = wsgiref.validate.validator(self.app)(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            result.close()
        headers = http.client.HTTPMessage()
        for name, value in started["headers"]:
            headers[name] = value
        return Response(int(started["status"][:3]), headers, body)


class _KeptOpenReader(io.BufferedReader):
    """A socket reader that http.client cannot close between responses."""

    def close(self):
        pass


class SharedFile:
    """Lets several http.client responses read from one buffered socket file."""

    def __init__(self, sock=None, file=None):
        self.file = file or _KeptOpenReader(socket.SocketIO(sock, "rb"))

    def makefile(self, *args, **kwargs):
        return self.file


class RunningServer:
    """A GatewayServer for ``application`` on 127.0.0.1:0, serving from a
    background thread, its logs in ``log`` (a StringIO)."""

    def __init__(self, application, log_format="text", log_level="info",
                 request_timeout=gateway.DEFAULT_REQUEST_TIMEOUT,
                 max_connections=gateway.DEFAULT_MAX_CONNECTIONS):
        self.application = application
        self.log = io.StringIO()
        self.httpd = gateway.GatewayServer(
            ("127.0.0.1", 0), application, request_timeout=request_timeout,
            max_connections=max_connections, log=logs.Log(self.log, log_format, log_level),
            metrics=getattr(application, "metrics", None))
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,))
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


class HTTPClientMixin(ResponseAssertions):
    """Requests over loopback to ``self.running`` (a RunningServer)."""

    def connect(self):
        connection = http.client.HTTPConnection("127.0.0.1", self.running.port, timeout=10)
        self.addCleanup(connection.close)
        return connection

    def request(self, method, path, body=None, headers=None, connection=None):
        connection = connection or self.connect()
        connection.request(method, path, body=body, headers=headers or {})
        return Response.read(connection.getresponse())

    def raw_socket(self):
        sock = socket.create_connection(("127.0.0.1", self.running.port), timeout=10)
        self.addCleanup(sock.close)
        return sock

    def raw(self, data, responses=1, methods=None, sock=None):
        """Send raw bytes; parse and return ``responses`` responses from the connection."""
        sock = sock or self.raw_socket()
        sock.sendall(data)
        shared = SharedFile(sock)
        parsed = []
        for method in (methods or ["GET"] * responses):
            response = http.client.HTTPResponse(shared, method=method)
            response.begin()
            parsed.append(Response.read(response))
        return parsed if responses > 1 else parsed[0]

    def assertClosed(self, sock):
        sock.settimeout(5)
        try:
            self.assertEqual(sock.recv(1), b"")
        except ConnectionResetError:
            pass


class ServerProcess:
    """A server in a subprocess, started from this directory: by default
    ``python server.py --port 0 ARGS``. ``port`` comes from the first line of
    ``stream`` ("stdout" or "stderr") that ``listening`` (a pattern whose
    group 1 is the port) matches. ``new_session``: in a process group of its
    own (with its workers), for ``kill``. Stopped when the test ends, if still running."""

    def __init__(self, test, *args, command=None, listening=r"listening on http://127\.0\.0\.1:(\d+)",
                 stream="stdout", env=None, new_session=False):
        command = command or [sys.executable, SERVER_SCRIPT, "--port", "0", *args]
        pipes = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, stream: subprocess.PIPE}
        self.process = subprocess.Popen(command, cwd=HERE, bufsize=0, env=env,
                                        start_new_session=new_session, **pipes)
        self.new_session = new_session
        self.output = getattr(self.process, stream)
        test.addCleanup(self.stop)
        while True:
            line = read_line(self.output, timeout=30).decode()
            test.assertTrue(line, "the server exited before it listened")
            match = re.search(listening, line)
            if match:
                self.port = int(match.group(1))
                return

    def request(self, method, path, body=None, headers=None, encode_chunked=False):
        """One request on a new connection (with several workers, any may take it)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {},
                               encode_chunked=encode_chunked)
            return Response.read(connection.getresponse())
        finally:
            connection.close()

    def kill(self):
        """SIGKILL to the server and its workers at once, as a power cut would
        stop them (needs ``new_session``: killing the parent alone leaves its
        workers to drain)."""
        assert self.new_session, "kill() needs ServerProcess(..., new_session=True)"
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self):
        """SIGTERM (gunicorn's workers go with their master only then), SIGKILL if that is slow."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()
        self.output.close()
