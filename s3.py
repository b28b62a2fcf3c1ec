"""The S3 store: objects in an S3-compatible bucket (AWS S3, Ceph RGW,
SeaweedFS, ...), through the S3 REST API, standard library only.

Layout: the object ``oid`` of repository ``R`` is the key ``PREFIX/R/<oid>``,
so a repository is one key prefix and a listing page is one ``ListObjectsV2``
with ``prefix`` and ``start-after``. Requests use path-style addresses
(``ENDPOINT/BUCKET/KEY``, what self-hosted engines need), are signed with
SigV4 (``sigv4.py``), and go over a small pool of keep-alive connections.

Guarantees, the same as the other stores' where S3 allows:
- Never a partial or wrong object under ``R/<oid>``: S3 makes an object
  visible only once its PUT completes. A PUT whose oid is known (the verified
  ``PUT /data/R/<oid>`` with a length) streams to its final key signed with
  ``x-amz-content-sha256: <oid>``, so engines that check the payload (AWS,
  Ceph) refuse wrong bytes themselves; and the store hashes as it sends and
  holds back the last block until the digest matches, cutting the connection
  otherwise, so an engine that checks nothing never receives a complete body.
  A PUT whose oid is not known yet is spooled to a temporary file while it is
  hashed (``spool_dir``), then uploaded with its hash (and retried if need be);
  a body of known length up to storage.HANDED_OVER_BYTES is read into memory
  instead (no file, no 1 MiB buffer for a few bytes).
- A PUT sends ``If-None-Match: *``: an existing key already holds these bytes.
- Reads stream in bounded memory; the application checks the bytes as they
  go (see server.CheckedStream). An object of CHECKSUMS_FROM_BYTES or more
  gets block checksums (checksums.py: a CRC-32 per MiB, computed as it is
  uploaded, from bytes that hash to its oid), stored as the small object
  ``PREFIX@checksums/R/<oid>``: reads check each block against them, at a
  quarter of the cost of SHA-256, and ranges can be checked too. Smaller
  objects, and any without intact checksums, are checked against the oid.
  Checksums are keyed by oid, so they are right for whatever upload of that
  oid comes later. An object whose checksums are lost costs more to check,
  and then only whole: its ranges go out unchecked. A range is a ranged GET.
- An engine that cannot be reached, or answers 5xx or "slow down", is retried
  with backoff for idempotent calls, then raised as StoreUnavailable (503 with
  Retry-After); every call has a timeout. Bad credentials or a missing bucket
  raise StoreUnavailable at start (``check``).
- Objects over 5 GiB (S3's limit for one PUT) are refused: multipart uploads
  are not implemented.
"""

import contextlib
import hashlib
import http.client
import io
import os
import re
import socket
import tempfile
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ElementTree

import checksums
import sigv4
import storage

MAX_SINGLE_PUT = 5 << 30
BLOCK_BYTES = 1 << 20
RETRIES = 4
BACKOFF_SECONDS = 0.1   # doubled on each retry: 0.1, 0.2, 0.4, 0.8
RETRY_BUDGET_SECONDS = 3.0   # no retry starts later than this into a call
RETRY_STATUSES = (429, 500, 502, 503, 504)
DEFAULT_TIMEOUT = 10.0   # for each connect, send and receive
IDLE_SECONDS = 15.0   # a pooled connection idle longer is closed: engines close theirs at 60 s+
# Smaller objects are checked against their oid: hashing 8 MiB (5 ms) costs
# about what fetching their checksums would.
CHECKSUMS_FROM_BYTES = 8 << 20
_NAMESPACE = re.compile(r"^\{[^}]*\}")


class EngineError(Exception):
    """An S3 error response: status, S3 error code and message."""

    def __init__(self, status, code, message):
        super().__init__("%d %s: %s" % (status, code, message))
        self.status = status
        self.code = code


def parse_store_url(url):
    """``(bucket, prefix)`` from ``s3://BUCKET[/PREFIX]``; ValueError if it is not one."""
    parsed = urllib.parse.urlsplit(url)
    bucket = parsed.netloc
    if parsed.scheme != "s3" or not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket) \
            or parsed.query or parsed.fragment:
        raise ValueError("expected s3://BUCKET[/PREFIX] with a valid bucket name, not %r" % url)
    prefix = parsed.path.strip("/")
    if prefix and any(segment in ("", ".", "..") for segment in prefix.split("/")):
        raise ValueError("the prefix of %r has an empty, . or .. segment" % url)
    return bucket, prefix + "/" if prefix else ""


def credentials_from_environment(environ=os.environ):
    """Credentials and region from AWS's usual variables; ValueError if missing."""
    access_key, secret_key = environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY")
    if not access_key or not secret_key:
        raise ValueError("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for the S3 store")
    region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return sigv4.Credentials(access_key, secret_key, environ.get("AWS_SESSION_TOKEN")), region


class Client:
    """Signed requests to one S3 endpoint over pooled keep-alive connections,
    with timeouts and retries. Each call, its retries included, is reported
    to ``on_call(operation, failed, seconds)`` if given (the application's
    metrics, which worker processes share)."""

    def __init__(self, endpoint, region, credentials, timeout=DEFAULT_TIMEOUT, on_call=None):
        parsed = urllib.parse.urlsplit(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError("the S3 endpoint must be an http:// or https:// URL, not %r" % endpoint)
        self._connection_class = (http.client.HTTPSConnection if parsed.scheme == "https"
                                  else http.client.HTTPConnection)
        self.host = parsed.netloc
        self.region = region
        self.credentials = credentials
        self.timeout = timeout
        self._idle = []   # (connection, when it was released)
        self._pid = os.getpid()   # a forked child must not share its parent's sockets
        self._lock = threading.Lock()
        self.on_call = on_call

    def request(self, operation, method, path, query=(), headers=None, body=None,
                payload_hash=sigv4.EMPTY_PAYLOAD, retry=True):
        """``(status, headers, body bytes)`` of a call; StoreUnavailable once
        retries are spent. ``body`` is bytes, or a file read from its start
        (rewound for a retry). Retried, with backoff, while RETRY_BUDGET_SECONDS
        last: refused or reset connections and 5xx, 429 or SlowDown answers,
        never a timeout (the engine is there but stuck: waiting again would
        only double the wait). ``retry=False``: one attempt, on a new
        connection (a pooled one may have been closed by the engine)."""
        def attempt(number):
            if number and hasattr(body, "seek"):
                body.seek(0)
            response, connection = self.open(method, path, query, headers, body, payload_hash,
                                             reuse=retry)
            try:
                data = response.read()
            except BaseException:
                connection.close()
                raise
            self.release(connection, response)
            if response.status in RETRY_STATUSES or _error_code(data) == "SlowDown":
                raise _Faltered(EngineError(response.status, _error_code(data), ""))
            failed = response.status >= 400 and response.status not in (404, 412)
            return (response.status, response.headers, data), failed

        return self.with_retries(operation, attempt, retry)

    def with_retries(self, operation, attempt, retry=True):
        """The result of ``attempt(number)``, which makes one request and
        returns ``(result, failed)``, tried again (see ``attempts``) when it
        fails with a refused or reset connection or raises _Faltered, never
        after a timeout; StoreUnavailable once the attempts are spent. A store
        error it raises (an object not found) passes through. Counts the call."""
        started = time.monotonic()
        problem = None
        try:
            for number in attempts(started, retry):
                try:
                    result, failed = attempt(number)
                except socket.timeout as error:   # the engine is there but stuck
                    problem = error
                    break
                except (OSError, http.client.HTTPException) as error:
                    problem = error
                    continue
                except _Faltered as faltered:
                    problem = faltered.problem
                    if faltered.retry:
                        continue
                    break
                self.count(operation, failed, time.monotonic() - started)
                return result
        except storage.StoreError:
            self.count(operation, False, time.monotonic() - started)
            raise
        self.count(operation, True, time.monotonic() - started)
        raise storage.StoreUnavailable("the S3 engine at %s is unavailable (%s); retry later"
                                       % (self.host, problem))

    def open(self, method, path, query=(), headers=None, body=None,
             payload_hash=sigv4.EMPTY_PAYLOAD, reuse=True):
        """Send a signed request and return ``(response, connection)`` with the
        body unread: give them to ``release`` once it is read, or close the
        connection. No retry; ``reuse=False`` opens a new connection."""
        fields = {"host": self.host, "x-amz-content-sha256": payload_hash,
                  "x-amz-date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())}
        if self.credentials.session_token:
            fields["x-amz-security-token"] = self.credentials.session_token
        fields.update({name.lower(): value for name, value in (headers or {}).items()})
        fields["authorization"] = sigv4.authorization(
            self.credentials, self.region, "s3", method, path, list(query),
            {name: value for name, value in fields.items()
             if name in ("host", "content-length", "content-type", "range", "if-none-match")
             or name.startswith("x-amz-")}, payload_hash)
        target = sigv4.uri_encode(path, safe="/-_.~")
        if query:
            target += "?" + urllib.parse.urlencode(list(query), quote_via=urllib.parse.quote)
        connection = self._take() if reuse else self._new()
        try:
            connection.request(method, target, body=body, headers=fields)
            return connection.getresponse(), connection
        except BaseException:
            connection.close()
            raise

    def release(self, connection, response):
        """Return a connection whose response has been read to its end to the pool."""
        if response.will_close:
            connection.close()
            return
        with self._lock:
            self._idle.append((connection, time.monotonic()))

    def close(self):
        with self._lock:
            idle, self._idle = self._idle, []
        for connection, _ in idle:
            connection.close()

    def _take(self):
        """A pooled connection used within IDLE_SECONDS, else a new one."""
        stale = []
        with self._lock:
            if self._pid != os.getpid():   # forked: those sockets are the parent's
                self._idle, self._pid = [], os.getpid()
            while self._idle:
                connection, released = self._idle.pop()
                if time.monotonic() - released < IDLE_SECONDS:
                    break
                stale.append(connection)
            else:
                connection = None
        for old in stale:
            old.close()
        return connection or self._new()

    def _new(self):
        return self._connection_class(self.host, timeout=self.timeout, blocksize=BLOCK_BYTES)

    def count(self, operation, failed, seconds):
        """Report a call made with ``open`` to ``on_call``."""
        if self.on_call is not None:
            self.on_call(operation, failed, seconds)


class _Faltered(Exception):
    """An attempt at a call that the engine answered with ``problem``; another
    may succeed if ``retry``."""

    def __init__(self, problem, retry=True):
        super().__init__(str(problem))
        self.problem = problem
        self.retry = retry


def attempts(started, retry=True):
    """The attempts at a call begun at ``started`` (monotonic): one, or with
    ``retry`` up to RETRIES more, after a backoff of BACKOFF_SECONDS doubling
    each time, none starting later than RETRY_BUDGET_SECONDS in."""
    for attempt in range(RETRIES + 1 if retry else 1):
        if attempt:
            if time.monotonic() - started > RETRY_BUDGET_SECONDS:
                return
            time.sleep(BACKOFF_SECONDS * 2 ** (attempt - 1))
        yield attempt


def _error_code(data):
    """The ``Code`` of an S3 XML error body, or ""."""
    if not data.lstrip().startswith(b"<"):
        return ""
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError:
        return ""
    return next((element.text or "" for element in root.iter()
                 if _NAMESPACE.sub("", element.tag) == "Code"), "")


class S3Store:
    """A store in an S3 bucket (see the module's docstring). ``spool_dir``
    holds uploads whose oid is not known until they end (default: the
    system's temporary directory)."""

    def __init__(self, bucket, prefix, client, spool_dir=None):
        self.bucket = bucket
        self.prefix = prefix
        self.client = client
        self.spool_dir = spool_dir

    def check(self, retry=True):
        """Raise StoreUnavailable, in one line, unless the bucket answers to
        these credentials (called at start)."""
        status, _, data = self.client.request("HeadBucket", "HEAD", "/" + self.bucket,
                                              retry=retry)
        if status != 200:
            raise storage.StoreUnavailable(
                "cannot use S3 bucket %s at %s: %s" % (self.bucket, self.client.host, {
                    403: "access denied (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
                    404: "no such bucket"}.get(status, "HTTP %d" % status)))

    def _path(self, repository, oid=""):
        return "/%s/%s%s/%s" % (self.bucket, self.prefix, repository, oid)

    def _checksums_path(self, repository, oid):
        return "/%s/%s@checksums/%s/%s" % (self.bucket, self.prefix, repository, oid)

    # The store contract ------------------------------------------------------------

    def put(self, repository, source, expected_oid=None, length=None):
        """Store the bytes of ``source``; ``(oid, size)`` once the engine has them."""
        storage.check_repository(repository)
        if expected_oid is not None:
            expected_oid = storage.check_expected_oid(expected_oid)
        if length is not None and length > MAX_SINGLE_PUT:
            raise storage.InsufficientStorage("objects over 5 GiB need multipart upload, which "
                                              "this store does not do")
        recorder = _checksums_recorder()
        if expected_oid is not None and self._size(repository, expected_oid) is not None:
            # Stored already: the body is still read and checked, as the disk store does.
            oid, size = _digest_of(source, recorder=recorder)
            storage.check_digest(oid, expected_oid)
        elif expected_oid is not None and length is not None:
            oid, size = self._put_streamed(repository, source, expected_oid, length, recorder)
        else:
            # A body said to be small is read into memory: one byte more than
            # its length, since a source may hold more than it says (then it
            # is spooled, those bytes first).
            small = length is not None and length <= storage.HANDED_OVER_BYTES
            head = bytearray(length + 1 if small else 0)
            count = storage.fill(source, head)
            if count < len(head):   # the whole body: uploaded from memory
                body = memoryview(head)[:count]
                recorder.update(body)
                oid, size = hashlib.sha256(body).hexdigest(), count
                self._put_object(repository, oid, body, size, retry=True)
            else:
                with storage.write_errors_as_store_errors():   # the spool's disk full: 507
                    with tempfile.TemporaryFile(dir=self.spool_dir) as spool:
                        oid, size = _digest_of(_Prefixed(head, source), spool, recorder)
                        storage.check_digest(oid, expected_oid)
                        spool.seek(0)
                        self._put_object(repository, oid, spool, size, retry=True)
        self._record_checksums(repository, oid, recorder.finish())
        return oid, size

    def _put_streamed(self, repository, source, oid, length, recorder):
        if length == 0:   # no byte to hold back: the empty object has one oid
            storage.check_digest(hashlib.sha256(b"").hexdigest(), oid)
        body = _HeldBackBody(source, length, oid, recorder)
        try:
            self._put_object(repository, oid, body, length, retry=False)
        except storage.StoreUnavailable:
            if body.source_error is not None:   # the client's, not the engine's
                raise body.source_error from None
            if body.mismatch:   # the connection was cut on purpose
                raise storage.DigestMismatch("content hashes to %s, not to the object id %s in "
                                             "the request" % (body.mismatch, oid)) from None
            raise
        if not body.complete:   # answered before the body was read: not known to match
            raise storage.StoreUnavailable("the S3 engine answered the PUT of %s before reading "
                                           "it; retry" % oid)
        return oid, length

    def _size(self, repository, oid):
        """The stored object's size, or None if there is none (a HeadObject)."""
        status, headers, data = self.client.request("HeadObject", "HEAD",
                                                    self._path(repository, oid))
        if status == 404:
            return None
        _raise_for(status, data, "HEAD")
        return int(headers["Content-Length"])

    def _put_object(self, repository, oid, body, size, retry):
        status, _, data = self.client.request(
            "PutObject", "PUT", self._path(repository, oid), body=body, payload_hash=oid,
            headers={"content-length": str(size), "if-none-match": "*",
                     "content-type": "application/octet-stream"}, retry=retry)
        if status == 412:   # stored meanwhile by another: the same bytes, by their name
            return
        if status == 400 and _error_code(data) in ("XAmzContentSHA256Mismatch", "BadDigest"):
            raise storage.DigestMismatch("content does not hash to the object id %s" % oid)
        _raise_for(status, data, "PUT")

    def _record_checksums(self, repository, oid, recorded):
        """Store the block checksums of an object of CHECKSUMS_FROM_BYTES or
        more beside it. If that fails (counted in the store's metrics), reads
        check the object against its oid instead."""
        if recorded.size < CHECKSUMS_FROM_BYTES:
            return
        data = recorded.to_bytes()
        try:
            status, _, _ = self.client.request(
                "PutObject", "PUT", self._checksums_path(repository, oid), body=data,
                payload_hash=hashlib.sha256(data).hexdigest(),
                headers={"content-length": str(len(data)),
                         "content-type": "application/octet-stream"})
        except storage.StoreUnavailable:
            return
        if status >= 300:   # refused: wrong ones left in place would fail every read
            self._forget_checksums(repository, oid)

    def _forget_checksums(self, repository, oid):
        """Delete the object's checksums; if the engine fails, they stay
        (right for the oid, if they were)."""
        try:
            self.client.request("DeleteObject", "DELETE", self._checksums_path(repository, oid))
        except storage.StoreUnavailable:
            pass

    def _recorded_checksums(self, repository, oid, size):
        """The object's intact block checksums, or None (none recorded, or
        damaged, or not to be had now)."""
        if size < CHECKSUMS_FROM_BYTES:
            return None
        try:   # at most what 5 GiB take (20 KiB), whatever the key holds
            status, _, data = self.client.request("GetObject", "GET",
                                                  self._checksums_path(repository, oid),
                                                  headers={"range": "bytes=0-65535"})
        except storage.StoreUnavailable:
            return None
        found = checksums.BlockChecksums.from_bytes(data) if status in (200, 206) else None
        # Only the block size they are recorded in: a reader holds a block in memory.
        return found if found and found.block_size == checksums.MIN_BLOCK_BYTES else None

    def open(self, repository, oid, whole=False):
        """The object as a StoredObject (a HeadObject) whose file streams it
        from the engine with a GET made by ``start(end)`` or the first read,
        and whose block checksums are fetched if they are asked for. To be
        read ``whole``: the GET of it all, made now, in place of the HeadObject
        (its Content-Length is the size), so a download is one call."""
        storage.check_repository(repository)
        canonical = storage.canonical_oid(oid)
        if canonical is None:
            raise storage.not_found(repository, oid)
        path = self._path(repository, canonical)
        if whole:
            reader = _ObjectReader(self.client, path, None)
            try:
                reader.start()
            except storage.ObjectNotFound:
                raise storage.not_found(repository, oid) from None
            size = reader.size
        else:
            size = self._size(repository, canonical)
            if size is None:
                raise storage.not_found(repository, oid)
            reader = _ObjectReader(self.client, path, size)
        return storage.StoredObject(
            reader, size, may_change_at_rest=True,
            checksums=lambda: self._recorded_checksums(repository, canonical, size))

    def delete(self, repository, oid):
        """Remove the object's checksums, then the object: in this order, a
        PUT of the same oid through another instance meanwhile leaves its
        checksums beside it, or at worst checksums without an object (right
        for the oid, whenever it is stored again). ObjectNotFound if the
        repository lacks it (a HeadObject first: S3's DELETE succeeds either way)."""
        storage.check_repository(repository)
        canonical = storage.canonical_oid(oid)
        size = self._size(repository, canonical) if canonical else None
        if size is None:
            raise storage.not_found(repository, oid)
        if size >= CHECKSUMS_FROM_BYTES:   # first: a PUT racing this one records them after
            self._forget_checksums(repository, canonical)
        status, _, data = self.client.request("DeleteObject", "DELETE",
                                              self._path(repository, canonical))
        if status != 404:
            _raise_for(status, data, "DELETE")

    def list_objects(self, repository, after=None, limit=1000):
        """Up to ``limit`` ``(oid, size)`` sorted by oid, after ``after``."""
        storage.check_repository(repository)
        prefix = "%s%s/" % (self.prefix, repository)
        found = []
        start_after = prefix + after if after else None
        token = None
        while len(found) < limit:
            query = [("list-type", "2"), ("prefix", prefix), ("max-keys", str(limit - len(found)))]
            if token:
                query.append(("continuation-token", token))
            elif start_after:
                query.append(("start-after", start_after))
            status, _, data = self.client.request("ListObjectsV2", "GET", "/" + self.bucket,
                                                  query)
            _raise_for(status, data, "list")
            root = ElementTree.fromstring(data)
            for contents in _children(root, "Contents"):
                oid = _child_text(contents, "Key")[len(prefix):]
                if storage.OID_PATTERN.fullmatch(oid):
                    found.append((oid, int(_child_text(contents, "Size"))))
            token = _child_text(root, "NextContinuationToken")
            if _child_text(root, "IsTruncated") != "true" or not token:
                break
        return found[:limit]

    def usage(self):
        """Not counted: a bucket's contents change under many processes, and
        counting them would take a listing of the whole bucket."""
        return None

    def writable(self):
        """True while the bucket answers (one quick attempt: for /healthz)."""
        try:
            self.check(retry=False)
        except storage.StoreError:
            return False
        return True

    def quarantine(self, repository, oid, file):
        """Take an object whose bytes failed their check out of service: read
        it once more, and if it hashes to its oid after all (the first read
        was damaged on its way, or its checksums were wrong), record its
        checksums anew, keep it and return None; else move the very
        object that was read again (``x-amz-copy-source-if-match`` its ETag,
        so a sound one uploaded meanwhile stays) to
        ``PREFIX@quarantine/<repository>@<oid>@<time>`` and return that key.
        StoreUnavailable if it cannot be read again: it stays, unjudged.
        ``file``, the reader that found it bad, lets go of its GET first: an
        engine may cut one left waiting through a reread of gigabytes."""
        reader = _ObjectReader(self.client, self._path(repository, oid), None)
        recorder = _checksums_recorder()
        if isinstance(file, _ObjectReader):   # its GET would wait, unread, through the reread
            file.let_go()
        try:
            with reader:
                reread, _ = _digest_of(reader, recorder=recorder)
        except (OSError, storage.StoreUnavailable) as error:   # the engine's trouble, not the object's
            raise storage.StoreUnavailable("could not read %s again to check it: %s"
                                           % (oid, error)) from None
        except storage.StoreError:   # over 5 GiB now: not what was stored
            reread = None
        if reread == oid:
            self._record_checksums(repository, oid, recorder.finish())
            return None
        target = "%s@quarantine/%s@%s@%d" % (self.prefix, repository, oid, time.time() * 1000)
        headers = {"x-amz-copy-source": urllib.parse.quote(self._path(repository, oid))}
        etag = reader.etag or getattr(file, "etag", None)   # the bytes just found bad
        if etag:
            headers["x-amz-copy-source-if-match"] = etag
        status, _, data = self.client.request("CopyObject", "PUT",
                                              "/%s/%s" % (self.bucket, target), headers=headers)
        if status in (404, 412):
            raise storage.not_found(repository, oid)   # gone, or replaced by another upload
        if _error_code(data):   # a copy can fail after its 200
            status = 500
        _raise_for(status, data, "quarantine copy")
        status, _, data = self.client.request("DeleteObject", "DELETE",
                                              self._path(repository, oid))
        _raise_for(status, data, "quarantine delete")
        return target

    def close(self):
        self.client.close()


def _checksums_recorder():
    """A checksums.Recorder for an S3 object: 1 MiB blocks, however large."""
    return checksums.Recorder(block_size=checksums.MIN_BLOCK_BYTES, max_blocks=None)


def _digest_of(source, copy=None, recorder=None):
    """``(sha256 hex, size)`` of what is left in ``source``, written to ``copy``
    and given to ``recorder`` (a checksums.Recorder) too if given."""
    digest, size = hashlib.sha256(), 0
    block = bytearray(BLOCK_BYTES)
    for count in iter(lambda: source.readinto(block), 0):
        digest.update(memoryview(block)[:count])
        if copy is not None:
            copy.write(memoryview(block)[:count])
        if recorder is not None:
            recorder.update(memoryview(block)[:count])
        size += count
        if size > MAX_SINGLE_PUT:
            raise storage.InsufficientStorage("objects over 5 GiB need multipart upload, which "
                                              "this store does not do")
    return digest.hexdigest(), size


class _Prefixed:
    """``prefix`` (bytes already read from ``source``), then the rest of ``source``."""

    def __init__(self, prefix, source):
        self._prefix, self._source = memoryview(prefix), source

    def readinto(self, buffer):
        if self._prefix:
            count = min(len(buffer), len(self._prefix))
            buffer[:count] = self._prefix[:count]
            self._prefix = self._prefix[count:]
            return count
        return self._source.readinto(buffer)


def _raise_for(status, data, what):
    if status < 300:
        return
    code = _error_code(data)
    if status in (401, 403):
        raise storage.StoreUnavailable("the S3 engine refused the %s (%d %s): check the "
                                       "credentials" % (what, status, code))
    raise storage.StoreUnavailable("the S3 engine failed the %s: %d %s" % (what, status, code))


def _children(element, name):
    return [child for child in element if _NAMESPACE.sub("", child.tag) == name]


def _child_text(element, name):
    children = _children(element, name)
    return (children[0].text or "") if children else ""


class _HeldBackBody(io.RawIOBase):
    """The body of a streamed PUT for http.client: ``length`` bytes of
    ``source``, hashed as they go; the last block is given only if the whole
    hashes to ``oid``; otherwise reading fails, http.client stops sending and
    the engine never receives a complete body. ``mismatch`` is then the
    digest; ``source_error`` what reading the source raised (the client's
    fault, not the engine's); ``complete`` whether all of it went, checked.
    The block checksums of what is read go to ``recorder``."""

    def __init__(self, source, length, oid, recorder):
        self._source = source
        self._left = length
        self._oid = oid
        self._digest = hashlib.sha256()
        self._recorder = recorder
        self.mismatch = None
        self.source_error = None
        self.complete = length == 0

    def readable(self):
        return True

    def read(self, size=-1):
        size = self._left if size is None or size < 0 else min(size, self._left)
        if size <= 0:
            return b""
        data = bytearray(size)
        view, count = memoryview(data), 0
        try:
            while count < size:
                got = self._source.readinto(view[count:])
                if not got:
                    raise OSError("request body ended before its Content-Length")
                count += got
        except BaseException as error:
            self.source_error = error
            raise
        self._digest.update(data)
        self._recorder.update(data)
        self._left -= count
        if not self._left:
            if self._digest.hexdigest() != self._oid:
                self.mismatch = self._digest.hexdigest()
                raise OSError("upload does not hash to its oid: not sending its last block")
            self.complete = True
        return data   # http.client sends a bytearray as it is: no copy


@contextlib.contextmanager
def _broken_off_as_os_error():
    """http.client's IncompleteRead (an HTTPException) as the OSError a file raises."""
    try:
        yield
    except http.client.HTTPException as error:
        raise OSError("the S3 engine's response broke off: %r" % error) from None


class _ObjectReader(io.RawIOBase):
    """An object's bytes from the engine, streamed in bounded memory by a GET
    from the current position, made by ``start(end)`` or by the first read
    (a seek elsewhere drops it). ``size`` None: not known yet (the GET says).
    ``etag`` is the object's as the GET found it. A GET that fails after
    retries raises StoreUnavailable; an object gone meanwhile, ObjectNotFound."""

    def __init__(self, client, path, size):
        self._client = client
        self._path = path
        self._size = size
        self._position = 0
        self._end = size
        self._response = self._connection = None
        self.etag = None

    def start(self, end=None):
        """Make the GET now, of the bytes from the current position to ``end``
        (the object's end by default), so that a failure is known before a
        response is sent."""
        if self._response is not None:
            return
        self._end = self._size if end is None else end
        if self._position >= (self._end if self._end is not None else 1):
            return
        ranged = self._position or end is not None
        headers = {"range": "bytes=%d-%s" % (
            self._position, "" if self._end is None else self._end - 1)} if ranged else {}
        def attempt(number):
            response, connection = self._client.open("GET", self._path, headers=headers)
            if response.status in (200, 206):
                if self._accept(response, ranged):
                    return (response, connection), False
                connection.close()   # not the bytes asked for, unread
                data = b""
            else:   # an error's body, read whole: the connection can serve again
                try:
                    data = response.read()
                except BaseException:
                    connection.close()
                    raise
                self._client.release(connection, response)
            if response.status == 404:
                raise storage.ObjectNotFound("object %s was deleted meanwhile" % self._path)
            raise _Faltered(EngineError(response.status, _error_code(data), ""),
                            retry=response.status in RETRY_STATUSES)

        self._response, self._connection = self._client.with_retries("GetObject", attempt)
        if self._position >= self._end:   # an empty object: nothing to read
            self._finish()

    @property
    def size(self):
        """The object's size; None until a GET has said it, if it was not known."""
        return self._size

    def _accept(self, response, ranged):
        """Whether the response holds the bytes asked for (an engine that
        ignores a Range answers 200 with the whole); learns the size if need be."""
        length = response.getheader("Content-Length")
        if length is None or not length.isdigit() or not length.isascii():
            return False
        if ranged and (response.status != 206 or not response.getheader(
                "Content-Range", "").startswith("bytes %d-" % self._position)):
            return False
        if self._size is None:
            self._size = self._end = int(length)
        self.etag = response.getheader("ETag")
        return True

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._position

    def seek(self, position, whence=0):
        position = {0: position, 1: self._position + position, 2: self._size + position}[whence]
        if position != self._position:
            self.let_go()
            self._position = position
        return position

    def read(self, size=-1):
        """Up to ``size`` bytes (all that is left if negative), in one copy."""
        self.start()
        left = self._end - self._position
        size = left if size is None or size < 0 else min(size, left)
        if size <= 0:
            return b""
        with _broken_off_as_os_error():
            data = self._response.read(size)
        self._advance(len(data))
        return data

    def readinto(self, buffer):
        self.start()
        left = self._end - self._position
        if left <= 0:
            return 0
        with _broken_off_as_os_error():
            count = self._response.readinto(memoryview(buffer)[:left])
        self._advance(count)
        return count

    def _advance(self, count):
        if not count:
            raise OSError("the S3 engine ended the object early")
        self._position += count
        if self._position >= self._end:
            self._finish()

    def _finish(self):
        """All the bytes asked for are read: the connection goes back to the pool."""
        self._response.read()   # the end, so the connection can be reused
        self._client.release(self._connection, self._response)
        self._response = self._connection = None

    def close(self):
        self.let_go()
        super().close()

    def let_go(self):
        """Close the GET made so far; a read from here makes another."""
        if self._connection is not None:
            self._connection.close()   # mid-body: not reusable
        self._response = self._connection = None
