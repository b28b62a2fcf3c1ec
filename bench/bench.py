"""Benchmark of the data storage service, each figure beside a baseline from the same run.

    python bench/bench.py                 # everything, a table (about 2 minutes)
    python bench/bench.py --json          # the same figures as JSON
    python bench/bench.py --quick         # short runs and a 256 MiB large object

The machine is shared and noisy, so absolute numbers mean little: every
figure is compared with a baseline measured minutes apart, as a ratio.

Small objects: 1 KiB GET and PUT over keep-alive connections, for our server
(in-memory store) and for bench/baseline_server.py, which only parses, hashes
and replies. Load comes from wrk when it is installed, else from a stdlib
client in several processes. Then the same for the disk store with 1 and 2
workers (the load generator shares the machine's cores with the workers).
Then durable PUTs of new objects: the disk store, with group commit (its
default where syncfs can be trusted) and with an fsync each
(--no-group-commit), against the in-memory store, with the disk's cache
flushes per PUT.

Large objects: a PUT and a GET of one large object (1 GiB by default) over
loopback to the disk store, against SHA-256 throughput, the data directory's
write+fsync throughput and loopback sendfile throughput; the server's peak RSS
growth (VmHWM); and the in-memory store's peak RSS growth for the same PUT.

Git LFS: ``git lfs push`` of the same size of object against ``curl -T`` of
the file to the plain API, each into a fresh disk store (needs git, git-lfs
and curl; left out with a note without them).

S3 (``--store s3``, alone): the service on SeaweedFS against the engine
itself (needs DATA_STORAGE_TEST_SEAWEEDFS).
"""

import argparse
import concurrent.futures
import datetime
import hashlib
import http.client
import io
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, os.pardir, "server.py")
BASELINE = os.path.join(HERE, "baseline_server.py")
SMALL_BODY = b"x" * 1024
BLOCK = 1 << 20
MIB = 1 << 20


# Servers -------------------------------------------------------------------

class Process:
    """A server in a subprocess; the port comes from its first line of output."""

    def __init__(self, command):
        self.popen = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        line = self.popen.stdout.readline().decode()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not match:
            self.stop()
            raise RuntimeError("server did not start: %r" % line)
        self.port = int(match.group(1))

    def memory_kib(self, field):
        with open("/proc/%d/status" % self.popen.pid) as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def stop(self):
        self.popen.terminate()
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self.popen.stdout.close()


def our_server(*args):
    return Process([sys.executable, SERVER, "--port", "0", *args])


def baseline_server():
    return Process([sys.executable, BASELINE, "0"])


def request(port, method, path, body=b""):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"%s %s HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % (method.encode(), path.encode(), len(body)) + body)
        return b"".join(iter(lambda: sock.recv(65536), b""))


# Small-object load ---------------------------------------------------------------

# Each request a new object of SMALL_BODY's size: "<run>-<thread>-<count>-xxx..."
_DISTINCT_PUTS_LUA = """
wrk.method = "PUT"
local threads = 0
function setup(thread) threads = threads + 1; thread:set("id", threads) end
function init(args) count = 0 end
function request()
  count = count + 1
  local head = "%s-" .. id .. "-" .. count .. "-"
  return wrk.format(nil, nil, nil, head .. string.rep("x", %d - #head))
end
"""


def wrk_load(port, method, path, connections, duration, distinct=False):
    """``distinct``: every PUT a new object (else all the same bytes)."""
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    with script:
        if method == "PUT" and distinct:
            script.write(_DISTINCT_PUTS_LUA % (os.urandom(8).hex(), len(SMALL_BODY)))
        elif method == "PUT":
            script.write('wrk.method = "PUT"\nwrk.body = string.rep("x", %d)\n' % len(SMALL_BODY))
    try:
        output = subprocess.run(
            ["wrk", "-t2", "-c%d" % connections, "-d%ds" % duration, "--latency",
             "-s", script.name, "http://127.0.0.1:%d%s" % (port, path)],
            capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)", output)

    def latency(percent):
        value, unit = re.search(r"\s%s%%\s+([\d.]+)(us|ms|s)\b" % percent, output).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    return {"requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
            "p50_ms": latency(50), "p99_ms": latency(99),
            "errors": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}


def _python_client(port, raw_request, duration, distinct=False):
    """One keep-alive connection sending ``raw_request`` until ``duration`` is
    up; ``distinct``: each with its body's first bytes made unique."""
    latencies, errors = [], 0
    unique = ("%s-%%d-" % os.urandom(8).hex()).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        deadline = time.perf_counter() + duration
        while True:
            started = time.perf_counter()
            if started > deadline:
                break
            if distinct:
                head = unique % len(latencies)
                raw_request = raw_request[:-len(SMALL_BODY)] + head + SMALL_BODY[len(head):]
            sock.sendall(raw_request)
            status = reader.readline()
            length = 0
            for line in iter(reader.readline, b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            reader.read(length)
            latencies.append(time.perf_counter() - started)
            errors += not status.startswith((b"HTTP/1.1 2", b"HTTP/1.1 3"))
    return latencies, errors


def python_load(port, method, path, connections, duration, distinct=False):
    body = SMALL_BODY if method == "PUT" else b""
    raw_request = (b"%s %s HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n"
                   % (method.encode(), path.encode(), len(body)) + body)
    with concurrent.futures.ProcessPoolExecutor(connections) as pool:
        results = list(pool.map(_python_client, [port] * connections, [raw_request] * connections,
                                [duration] * connections, [distinct] * connections))
    latencies = sorted(latency for result in results for latency in result[0])
    return {"requests_per_second": len(latencies) / duration,
            "p50_ms": latencies[len(latencies) // 2] * 1e3,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
            "errors": sum(result[1] for result in results), "socket_errors": ""}


def small_object_load(port, method, path, options, distinct=False):
    load = wrk_load if options.client == "wrk" else python_load
    return load(port, method, path, options.connections, options.duration, distinct)


def best_of(rounds, measure):
    """The best of several runs: noise on a shared machine only ever slows a run down."""
    return max((measure() for _ in range(rounds)), key=lambda r: r["requests_per_second"])


def best_interleaved(rounds, first, second):
    """The best run of each of two measurements, taken in turns (first, second,
    first, ...), so that the machine's drift falls on both alike."""
    runs = [(first(), second()) for _ in range(rounds)]
    return tuple(max(column, key=lambda r: r["requests_per_second"]) for column in zip(*runs))


def prepare_small_object(port):
    response = request(port, "PUT", "/data/bench", SMALL_BODY)
    assert b" 201 " in response.split(b"\r\n", 1)[0], response
    return "/data/bench/" + hashlib.sha256(SMALL_BODY).hexdigest()


def bench_small_objects(options, report):
    ours, baseline = our_server(), baseline_server()
    try:
        get_path = prepare_small_object(ours.port)
        for method, path in (("GET", get_path), ("PUT", "/data/bench")):
            base, mine = best_interleaved(
                options.rounds, lambda: small_object_load(baseline.port, method, path, options),
                lambda: small_object_load(ours.port, method, path, options))
            report.add("1 KiB %s req/s (memory store)" % method, mine["requests_per_second"],
                       base["requests_per_second"], "baseline server", target=0.9, unit="req/s",
                       details={"ours": mine, "baseline": base})
            limit = max(20.0, 2 * base["p99_ms"])
            report.add("1 KiB %s p99 latency" % method, mine["p99_ms"], limit,
                       "max(20 ms, 2x baseline p99 %.2f ms)" % base["p99_ms"], unit="ms",
                       at_most=1.0, details={"p50_ms": mine["p50_ms"],
                                             "baseline_p50_ms": base["p50_ms"]})
    finally:
        ours.stop()
        baseline.stop()


def bench_workers(options, report, data_root):
    """1 KiB GETs and PUTs on the disk store with 1 and 2 workers, and the
    2-worker GET against one stdlib process, in turns. GETs go first, after
    an ``os.sync()``: the writeback of the uploads before (the previous
    server's PUTs, or another part's) would take CPU from either side."""
    rates = {}
    for workers in (1, 2):
        directory = tempfile.mkdtemp(dir=data_root)
        server = our_server("--data-dir", directory, "--workers", str(workers))
        try:
            get_path = prepare_small_object(server.port)
            os.sync()
            rates[workers, "GET"] = best_of(
                options.rounds, lambda: small_object_load(server.port, "GET", get_path, options))
            if workers == 2:   # against one stdlib process, in turns
                baseline = baseline_server()
                try:
                    prepare_small_object(baseline.port)
                    base, mine = best_interleaved(
                        options.rounds,
                        lambda: small_object_load(baseline.port, "GET", get_path, options),
                        lambda: small_object_load(server.port, "GET", get_path, options))
                finally:
                    baseline.stop()
            rates[workers, "PUT"] = best_of(
                options.rounds, lambda: small_object_load(server.port, "PUT", "/data/bench", options))
        finally:
            server.stop()
            remove_at_end(directory)
    for method in ("GET", "PUT"):
        report.add("1 KiB %s req/s, disk store, 2 workers" % method,
                   rates[2, method]["requests_per_second"], rates[1, method]["requests_per_second"],
                   "1 worker", unit="req/s")
    report.add("1 KiB GET req/s, disk store, 2 workers, against the stdlib",
               mine["requests_per_second"], base["requests_per_second"],
               "baseline server (one process)", unit="req/s", target=1.6)


# Directories to remove once every part has run. On ext4 without a journal,
# files created within about 30 s of many deletions cost up to 1 ms of CPU each
# (the kernel passes over recently freed inodes, `recently_deleted`): removing
# one part's files would slow the next part's uploads.
_TO_REMOVE = []


def remove_at_end(directory):
    _TO_REMOVE.append(directory)


def device_flushes(path):
    """Cache flushes the block device holding ``path`` has done so far (Linux
    4.18+: /sys/dev/block/MAJ:MIN/stat), or None where that is not known."""
    device = os.stat(path).st_dev
    try:
        with open("/sys/dev/block/%d:%d/stat" % (os.major(device), os.minor(device))) as stat:
            fields = stat.read().split()
    except OSError:
        return None
    return int(fields[15]) if len(fields) > 15 else None


def bench_durable_puts(options, report, data_root):
    """1 KiB PUTs of new objects (each request other bytes), each acknowledged
    only once durable, on the disk store (an fsync per file and directory,
    then group commit) beside the same on the in-memory store, in turns;
    with the device's cache flushes per PUT where the kernel tells them."""
    runs = {}
    directories = [tempfile.mkdtemp(dir=data_root) for _ in range(2)]
    servers = {"memory": our_server(),
               "disk": our_server("--data-dir", directories[0], "--workers", "1",
                                  "--no-group-commit"),
               "group": our_server("--data-dir", directories[1], "--workers", "1",
                                   "--group-commit")}
    try:
        for _ in range(options.rounds):
            for name, server in servers.items():
                flushes = device_flushes(data_root)
                run = small_object_load(server.port, "PUT", "/data/bench", options, distinct=True)
                if flushes is not None:
                    run["flushes_per_put"] = round((device_flushes(data_root) - flushes) / (
                        run["requests_per_second"] * options.duration), 2)
                runs.setdefault(name, []).append(run)
    finally:
        for server in servers.values():
            server.stop()
        for directory in directories:
            remove_at_end(directory)
    best = {name: max(column, key=lambda run: run["requests_per_second"])
            for name, column in runs.items()}
    for name, label in (("group", "group commit"), ("disk", "--no-group-commit: fsync each")):
        report.add("durable 1 KiB PUT req/s, new objects (disk store, %s)" % label,
                   best[name]["requests_per_second"], best["memory"]["requests_per_second"],
                   "memory store", unit="req/s", target=0.6 if name == "group" else None,
                   details={"flushes_per_put": best[name].get("flushes_per_put"),
                            "p99_ms": best[name]["p99_ms"]})
    if best["group"].get("flushes_per_put") and best["disk"].get("flushes_per_put"):
        report.add("disk cache flushes per durable 1 KiB PUT (group commit)",
                   best["group"]["flushes_per_put"], best["disk"]["flushes_per_put"],
                   "fsync per file", unit="flushes")


def bench_listing(options, report, data_root):
    """The time of one listing page (1,000 objects, from the middle of the
    repository) of a repository of 500,000 objects against the same page of
    one of 10,000, for the memory and the disk store, called in-process (the
    store's own cost; HTTP adds the same to both). The disk store's objects
    are written as files straight into place, as a store would have left them."""
    sys.path.insert(0, os.path.join(HERE, os.pardir))
    import storage
    sizes = (10_000, 500_000)
    for kind in ("memory", "disk"):
        seconds = {}
        for count in sizes:
            oids = sorted(hashlib.sha256(b"%d" % number).hexdigest() for number in range(count))
            directory = tempfile.mkdtemp(dir=data_root)
            try:
                if kind == "memory":
                    store = storage.MemoryStore()
                    for number in range(count):
                        store.put("repo", io.BytesIO(b"%d" % number))
                else:
                    for number in range(count):
                        oid = hashlib.sha256(b"%d" % number).hexdigest()
                        shard = os.path.join(directory, "repo", oid[:2])
                        os.makedirs(shard, exist_ok=True)
                        with open(os.path.join(shard, oid), "wb") as file:
                            file.write(b"%d" % number)
                    store = storage.DiskStore(directory)
                after = oids[count // 2]
                timings = []
                for _ in range(max(options.rounds, 5)):
                    started = time.perf_counter()
                    page = store.list_objects("repo", after=after, limit=1000)
                    timings.append(time.perf_counter() - started)
                assert [oid for oid, _ in page] == oids[count // 2 + 1:count // 2 + 1001]
                seconds[count] = min(timings)
                store.close()
            finally:
                remove_at_end(directory)
        report.add("listing page of 1,000 from 500,000 objects (%s store)" % kind,
                   seconds[sizes[1]] * 1e3, seconds[sizes[0]] * 1e3, "the same from 10,000",
                   unit="ms", at_most=2.0)


# Large objects ----------------------------------------------------------------

def make_large_file(directory, size):
    path = os.path.join(directory, "large-object")
    with open(path, "wb") as file:
        for _ in range(size // BLOCK):
            file.write(os.urandom(BLOCK))
    return path


def sha256_throughput(path):
    started = time.perf_counter()
    digest = hashlib.sha256()
    block = bytearray(BLOCK)
    with open(path, "rb", buffering=0) as file:
        for count in iter(lambda: file.readinto(block), 0):
            digest.update(memoryview(block)[:count])
    return os.path.getsize(path) / (time.perf_counter() - started), digest.hexdigest()


def write_fsync_throughput(directory, size):
    block = os.urandom(BLOCK)
    path = os.path.join(directory, "write-test")
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as file:
        for _ in range(size // BLOCK):
            file.write(block)
        os.fsync(file.fileno())
    elapsed = time.perf_counter() - started
    os.unlink(path)
    return size / elapsed


def _drain_socket(sock, total):
    block = bytearray(BLOCK)
    received = 0
    while received < total:
        count = sock.recv_into(block)
        if not count:
            raise ConnectionError("peer closed after %d of %d bytes" % (received, total))
        received += count


def sendfile_throughput(path):
    """Loopback socket.sendfile into a reader that drops the bytes: the ceiling for a GET."""
    size = os.path.getsize(path)
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = {}

    def receive():
        connection, _ = listener.accept()
        with connection:
            _drain_socket(connection, size)
        accepted["done"] = time.perf_counter()

    thread = threading.Thread(target=receive)
    thread.start()
    with socket.create_connection(listener.getsockname()) as sock, open(path, "rb") as file:
        started = time.perf_counter()
        sock.sendfile(file)
        thread.join()
    listener.close()
    return size / (accepted["done"] - started)


def timed_put(port, path, repository):
    size = os.path.getsize(path)
    with socket.create_connection(("127.0.0.1", port)) as sock, open(path, "rb") as file:
        started = time.perf_counter()
        sock.sendall(b"PUT /data/%s HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n"
                     % (repository.encode(), size))
        sock.sendfile(file)
        response = sock.recv(65536)
        elapsed = time.perf_counter() - started
    assert b" 201 " in response.split(b"\r\n", 1)[0], response
    return size / elapsed, json.loads(response.split(b"\r\n\r\n", 1)[1])["oid"]


def timed_get(port, repository, oid, size):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.perf_counter()
        sock.sendall(b"GET /data/%s/%s HTTP/1.1\r\nHost: bench\r\n\r\n" % (repository.encode(), oid.encode()))
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        head, body_start = head.split(b"\r\n\r\n", 1)
        assert b" 200 " in head.split(b"\r\n", 1)[0], head
        _drain_socket(sock, size - len(body_start))
        return size / (time.perf_counter() - started)


def bench_large_objects(options, report, data_root):
    size = options.large_size
    work = tempfile.mkdtemp(dir=data_root)
    try:
        path = make_large_file(work, size)
        hash_rate, expected_oid = sha256_throughput(path)
        write_rate = write_fsync_throughput(work, size)
        sendfile_rate = sendfile_throughput(path)

        server = our_server("--data-dir", os.path.join(work, "store"), "--workers", "1",
                            "--max-object-size", str(size))   # one process: its RSS is the figure
        try:
            rss_before = server.memory_kib("VmRSS")
            os.sync()   # the test file's and earlier runs' dirty pages must not compete
            put_rate, oid = timed_put(server.port, path, "large")
            assert oid == expected_oid, (oid, expected_oid)
            get_rate = timed_get(server.port, "large", oid, size)
            rss_growth = (server.memory_kib("VmHWM") - rss_before) * 1024
        finally:
            server.stop()
        floor = min(hash_rate, write_rate)
        label = "%d MiB" % (size // MIB)
        report.add("%s PUT MB/s (disk store)" % label, put_rate / 1e6, floor / 1e6,
                   "min(sha256 %.0f, write+fsync %.0f)" % (hash_rate / 1e6, write_rate / 1e6),
                   target=0.7, unit="MB/s")
        # Hashing is sequential, so one core's SHA-256 is the ceiling of a PUT.
        report.add("%s PUT MB/s (disk store), against hashing alone" % label, put_rate / 1e6,
                   hash_rate / 1e6, "one core's SHA-256", target=0.8, unit="MB/s")
        # Every block is checked against the CRC-32 recorded when it was
        # written before it goes out (checksums.py), beside sendfile.
        report.add("%s GET MB/s (disk store, checked)" % label, get_rate / 1e6,
                   sendfile_rate / 1e6, "loopback sendfile", target=0.6, unit="MB/s")
        report.add("%s PUT+GET peak RSS growth (disk store)" % label, rss_growth / MIB, 64,
                   "64 MiB limit", unit="MiB", at_most=1.0)

        server = our_server("--max-object-size", str(size))
        try:
            rss_before = server.memory_kib("VmRSS")
            put_rate, _ = timed_put(server.port, path, "large")
            rss_growth = (server.memory_kib("VmHWM") - rss_before) * 1024
        finally:
            server.stop()
        report.add("%s PUT peak RSS growth (memory store)" % label, rss_growth / MIB, size / MIB,
                   "the object's size", unit="MiB", at_most=1.25,
                   details={"put_mb_per_second": put_rate / 1e6})
    finally:
        remove_at_end(work)


# Report -------------------------------------------------------------------------

def bench_lfs_push(options, report, data_root):
    """``git lfs push`` of one large object against ``curl -T`` of the same file,
    each to a fresh server on the disk store, timed from outside (so the
    push's batch and verify calls count against it)."""
    missing = [tool for tool in ("git", "git-lfs", "curl") if not shutil.which(tool)]
    if missing:
        print("git lfs push: skipped, %s not installed" % " and ".join(missing), file=sys.stderr)
        return
    size = options.large_size
    work = tempfile.mkdtemp(dir=data_root)
    environment = {**os.environ, "HOME": work, "GIT_CONFIG_NOSYSTEM": "1",
                   "GIT_TERMINAL_PROMPT": "0"}

    def git(*args):
        subprocess.run(["git", *args], cwd=os.path.join(work, "repo"), env=environment, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    try:
        os.mkdir(os.path.join(work, "repo"))
        git("init", "-q")
        git("config", "user.name", "bench")
        git("config", "user.email", "bench@example.com")
        git("lfs", "install", "--local")
        git("lfs", "track", "*.bin")
        path = make_large_file(os.path.join(work, "repo"), size)
        os.rename(path, os.path.join(work, "repo", "large.bin"))
        git("add", ".")
        git("commit", "-q", "-m", "large")   # the clean filter hashes it into .git/lfs
        path = os.path.join(work, "repo", "large.bin")
        _, oid = sha256_throughput(path)

        server = our_server("--data-dir", os.path.join(work, "curl-store"),
                            "--max-object-size", str(size))
        try:
            started = time.perf_counter()
            subprocess.run(["curl", "-sSf", "-o", os.devnull, "-T", path,
                            "http://127.0.0.1:%d/data/lfs/%s" % (server.port, oid)], check=True)
            curl_rate = size / (time.perf_counter() - started)
        finally:
            server.stop()
        server = our_server("--data-dir", os.path.join(work, "lfs-store"),
                            "--max-object-size", str(size))
        try:
            git("config", "lfs.url", "http://127.0.0.1:%d/lfs/lfs" % server.port)
            git("remote", "add", "origin", os.path.join(work, "unused-remote"))
            started = time.perf_counter()
            git("lfs", "push", "--object-id", "origin", oid)
            push_rate = size / (time.perf_counter() - started)
            assert b'"%s"' % oid.encode() in request(server.port, "GET", "/data/lfs")
        finally:
            server.stop()
    finally:
        remove_at_end(work)
    report.add("%d MiB git lfs push MB/s (disk store)" % (size // MIB), push_rate / 1e6,
               curl_rate / 1e6, "curl -T PUT", target=0.7, unit="MB/s")


def threaded_rate(call, threads, duration):
    """Calls per second of ``call()`` made by ``threads`` threads for ``duration`` s."""
    deadline = time.perf_counter() + duration
    counts = [0] * threads

    def run(index):
        while time.perf_counter() < deadline:
            call()
            counts[index] += 1

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - started)


def bench_s3(options, report, data_root):
    """The service on an S3 engine against the engine itself: 1 KiB GET and
    PUT req/s from 16 client threads in this process (the same Python client
    load for both: plain HTTP to the service, SigV4-signed calls to the
    engine), then, for an object of a quarter of the large size, a plain PUT
    (spooled to a file while hashed, then uploaded), a verified PUT (streamed
    to its key) and a GET (checked as it streams, against the block checksums
    recorded at upload), each beside the same transfer made straight to the
    engine with the service's own S3 client: the best of the rounds, and for
    the GET also the round with the median ratio.
    The engine comes from DATA_STORAGE_TEST_SEAWEEDFS
    (tools/s3engines/seaweedfs.sh start DIR prints it)."""
    line = os.environ.get("DATA_STORAGE_TEST_SEAWEEDFS")
    if not line:
        print("S3: skipped, set DATA_STORAGE_TEST_SEAWEEDFS (tools/s3engines/seaweedfs.sh)",
              file=sys.stderr)
        return
    sys.path.insert(0, os.path.join(HERE, os.pardir))
    import s3
    import sigv4
    engine = dict(field.split("=", 1) for field in line.split())
    os.environ.update(AWS_ACCESS_KEY_ID=engine["access_key"], AWS_REGION=engine["region"],
                      AWS_SECRET_ACCESS_KEY=engine["secret_key"])
    client = s3.Client(engine["endpoint"], engine["region"],
                       sigv4.Credentials(engine["access_key"], engine["secret_key"]))
    bucket = "bench-%d" % os.getpid()
    assert client.request("CreateBucket", "PUT", "/" + bucket)[0] == 200
    size = options.large_size // 4
    work = tempfile.mkdtemp(dir=data_root)
    try:
        path = make_large_file(work, size)
        _, oid = sha256_throughput(path)

        def direct_transfers():
            with open(path, "rb") as file:
                started = time.perf_counter()
                status = client.request("PutObject", "PUT", "/%s/direct" % bucket, body=file,
                                        payload_hash=oid, headers={"content-length": str(size)})[0]
                put_rate = size / (time.perf_counter() - started)
            assert status == 200, status
            started = time.perf_counter()
            response, connection = client.open("GET", "/%s/direct" % bucket)
            while response.read(BLOCK):
                pass
            connection.close()
            get_rate = size / (time.perf_counter() - started)
            assert client.request("DeleteObject", "DELETE", "/%s/direct" % bucket)[0] == 204
            return put_rate, get_rate

        server = our_server("--store", "s3://%s/service" % bucket, "--s3-endpoint",
                            engine["endpoint"], "--workers", "1", "--max-object-size", str(size),
                            "--spool-dir", options.spool_dir or work)
        try:
            small_oid = hashlib.sha256(SMALL_BODY).hexdigest()
            assert client.request("PutObject", "PUT", "/%s/small" % bucket, body=SMALL_BODY,
                                  payload_hash=small_oid)[0] == 200
            assert b" 201 " in request(server.port, "PUT", "/data/small", SMALL_BODY)
            local = threading.local()

            def service(method, path, body=None):
                if not hasattr(local, "connection"):
                    local.connection = http.client.HTTPConnection("127.0.0.1", server.port)
                local.connection.request(method, path, body=body)
                response = local.connection.getresponse()
                response.read()
                assert response.status in (200, 201), response.status

            def direct(method, path, body=None):
                status, _, _ = client.request(method + "Object", method, path, body=body,
                                              payload_hash=small_oid if body else sigv4.EMPTY_PAYLOAD)
                assert status == 200, status

            for method, body in (("GET", None), ("PUT", SMALL_BODY)):
                ours = threaded_rate(lambda: service(method, "/data/small/" + small_oid, body),
                                     options.connections, options.duration)
                theirs = threaded_rate(lambda: direct(method, "/%s/small" % bucket, body),
                                       options.connections, options.duration)
                report.add("1 KiB %s req/s (S3 store, SeaweedFS)" % method, ours, theirs,
                           "%s on the engine" % method, unit="req/s")
            rates = []   # rounds in turns, the best of each counts: the machine is noisy
            for _ in range(options.rounds):
                direct_put, direct_get = direct_transfers()
                plain_put, _ = timed_put(server.port, path, "plain")
                get = timed_get(server.port, "plain", oid, size)
                assert b" 200 " in request(server.port, "DELETE", "/data/plain/" + oid)
                verified_put, _ = timed_put(server.port, path, "verified/" + oid)
                assert b" 200 " in request(server.port, "DELETE", "/data/verified/" + oid)
                rates.append((direct_put, direct_get, plain_put, verified_put, get))
            direct_put, direct_get, plain_put, verified_put, get = map(max, zip(*rates))
        finally:
            server.stop()
    finally:
        remove_at_end(work)
        client.close()
    label = "%d MiB" % (size // MIB)
    report.add("%s plain PUT MB/s (S3 store, SeaweedFS)" % label, plain_put / 1e6,
               direct_put / 1e6, "PUT to the engine", unit="MB/s", target=0.7)
    report.add("%s verified PUT MB/s (S3 store, SeaweedFS)" % label, verified_put / 1e6,
               direct_put / 1e6, "PUT to the engine", unit="MB/s", target=0.7)
    report.add("%s GET MB/s (S3 store, SeaweedFS, checked)" % label, get / 1e6,
               direct_get / 1e6, "GET from the engine", unit="MB/s", target=0.7)
    # The same GETs paired by round (each beside the engine's GET made just
    # before it): the best of each side can come from different moments of a
    # shared machine's load; the round with the median ratio cannot.
    by_ratio = sorted(rates, key=lambda rate: rate[4] / rate[1])
    _, direct_get, _, _, get = by_ratio[len(by_ratio) // 2]
    report.add("%s GET MB/s (S3 store, SeaweedFS, checked), median round" % label, get / 1e6,
               direct_get / 1e6, "GET from the engine", unit="MB/s", target=0.7)


class Report:
    def __init__(self):
        self.rows = []

    def add(self, figure, value, baseline, baseline_name, unit, target=None, at_most=None,
            details=None):
        """A figure and its baseline. ``target``: the ratio must be at least this;
        ``at_most``: at most this."""
        ratio = value / baseline if baseline else float("inf")
        met = None
        if target is not None:
            met = ratio >= target
        elif at_most is not None:
            met = ratio <= at_most
        self.rows.append({"figure": figure, "value": round(value, 2), "unit": unit,
                          "baseline": round(baseline, 2), "baseline_name": baseline_name,
                          "ratio": round(ratio, 3),
                          "target": (">= %s" % target if target is not None else
                                     "<= %s" % at_most if at_most is not None else None),
                          "met": met, "details": details or {}})
        print("  %s: %.2f %s vs %.2f (%s) = %.2fx" % (figure, value, unit, baseline,
                                                      baseline_name, ratio), file=sys.stderr)

    def table(self):
        lines = ["| figure | ours | baseline | ratio | target |", "|---|---|---|---|---|"]
        for row in self.rows:
            verdict = "" if row["met"] is None else (" met" if row["met"] else " **missed**")
            lines.append("| %s | %.2f %s | %.2f (%s) | %.2fx | %s%s |" % (
                row["figure"], row["value"], row["unit"], row["baseline"], row["baseline_name"],
                row["ratio"], row["target"] or "(report)", verdict))
        return "\n".join(lines)


def run_parts(options, report):
    if options.store == "s3":
        options.skip = ["small", "workers", "durable", "listing", "large", "lfs"]
        bench_s3(options, report, options.data_dir)
    if "small" not in options.skip:
        bench_small_objects(options, report)
    if "workers" not in options.skip:
        bench_workers(options, report, options.data_dir)
    if "durable" not in options.skip:
        bench_durable_puts(options, report, options.data_dir)
    if "listing" not in options.skip:
        bench_listing(options, report, options.data_dir)
    if "large" not in options.skip:
        bench_large_objects(options, report, options.data_dir)
    if "lfs" not in options.skip:
        bench_lfs_push(options, report, options.data_dir)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--quick", action="store_true",
                        help="1 s runs, one round, a 256 MiB large object")
    parser.add_argument("--duration", type=int, default=3, help="seconds per small-object run")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs per figure, ours and the baseline in turns; the best counts")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--large-size", type=int, default=1 << 30, metavar="BYTES")
    parser.add_argument("--data-dir", default=tempfile.gettempdir(),
                        help="where the disk store and test files go (default: %(default)s)")
    parser.add_argument("--client", choices=("wrk", "python"),
                        default="wrk" if shutil.which("wrk") else "python",
                        help="load generator (default: wrk if installed)")
    parser.add_argument("--skip", action="append", default=[],
                        choices=("small", "workers", "durable", "listing", "large", "lfs"),
                        help="leave out a part")
    parser.add_argument("--spool-dir", help="with --store s3: the service's --spool-dir "
                                            "(default: under --data-dir)")
    parser.add_argument("--store", choices=("local", "s3"), default="local",
                        help="s3: only the service on an S3 engine against the engine itself "
                             "(needs DATA_STORAGE_TEST_SEAWEEDFS); local: the rest")
    options = parser.parse_args()
    if options.quick:
        options.duration, options.rounds, options.large_size = 1, 1, 256 * MIB

    report = Report()
    started = time.time()
    try:
        run_parts(options, report)
    finally:
        for directory in _TO_REMOVE:
            shutil.rmtree(directory, ignore_errors=True)
    context = {"date": datetime.date.today().isoformat(), "client": options.client,
               "connections": options.connections, "duration_s": options.duration,
               "rounds": options.rounds, "python": platform.python_version(),
               "cpus": os.cpu_count(), "machine": platform.machine(),
               "seconds": round(time.time() - started)}
    if options.json:
        print(json.dumps({"context": context, "figures": report.rows}, indent=2))
    else:
        print("%s, Python %s, %d CPUs, load from %s (%d connections, %d s x %d rounds, best)"
              % (context["date"], context["python"], context["cpus"], context["client"],
                 options.connections, options.duration, options.rounds))
        print(report.table())
    return 0 if all(row["met"] is not False for row in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
