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
  hashed (``spool_dir``), then uploaded with its hash (and retried if need be).
- A PUT sends ``If-None-Match: *``: an existing key already holds these bytes.
- Reads stream in bounded memory; the application checks the bytes against the
  oid as they go (see server.CheckedStream). A range is a ranged GET.
- An engine that cannot be reached, or answers 5xx or "slow down", is retried
  with backoff for idempotent calls, then raised as StoreUnavailable (503 with
  Retry-After); every call has a timeout. Bad credentials or a missing bucket
  raise StoreUnavailable at start (``check``).
- Objects over 5 GiB (S3's limit for one PUT) are refused: multipart uploads
  are not implemented.
"""

import hashlib
import http.client
import io
import os
import re
import tempfile
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ElementTree

import sigv4
import storage

MAX_SINGLE_PUT = 5 << 30
BLOCK_BYTES = 1 << 20
RETRIES = 4
BACKOFF_SECONDS = 0.1   # doubled on each retry: 0.1, 0.2, 0.4, 0.8
RETRY_STATUSES = (500, 502, 503, 504)
DEFAULT_TIMEOUT = 30.0
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
    with timeouts and retries; counts calls, errors and time by operation."""

    def __init__(self, endpoint, region, credentials, timeout=DEFAULT_TIMEOUT):
        parsed = urllib.parse.urlsplit(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError("the S3 endpoint must be an http:// or https:// URL, not %r" % endpoint)
        self._connection_class = (http.client.HTTPSConnection if parsed.scheme == "https"
                                  else http.client.HTTPConnection)
        self.host = parsed.netloc
        self.region = region
        self.credentials = credentials
        self.timeout = timeout
        self._idle = []
        self._lock = threading.Lock()
        self.calls = {}   # operation -> [calls, errors, seconds]

    def request(self, operation, method, path, query=(), headers=None, body=None,
                payload_hash=sigv4.EMPTY_PAYLOAD, retry=True):
        """``(status, headers, body bytes)`` of a call; StoreUnavailable once
        retries are spent. ``body`` is bytes, or a file read from its start
        (rewound for a retry)."""
        started = time.monotonic()
        failed = True
        try:
            for attempt in range(RETRIES + 1 if retry else 1):
                if attempt:
                    time.sleep(BACKOFF_SECONDS * 2 ** (attempt - 1))
                    if hasattr(body, "seek"):
                        body.seek(0)
                try:   # a call that cannot be retried gets a fresh connection: a pooled
                    # one may have been closed by the engine meanwhile
                    response, connection = self.open(method, path, query, headers, body,
                                                     payload_hash, reuse=retry)
                    data = response.read()
                except (OSError, http.client.HTTPException) as error:
                    problem = error
                    continue
                self.release(connection, response)
                if response.status in RETRY_STATUSES or _error_code(data) == "SlowDown":
                    problem = EngineError(response.status, _error_code(data), "")
                    continue
                failed = response.status >= 400 and response.status != 404
                return response.status, response.headers, data
            raise storage.StoreUnavailable("the S3 engine at %s is unavailable (%s); retry later"
                                           % (self.host, problem))
        finally:
            self.count(operation, failed, time.monotonic() - started)

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
            self._idle.append(connection)

    def call_counts(self):
        """``{operation: [calls, errors, seconds]}`` so far."""
        with self._lock:
            return {operation: list(counts) for operation, counts in self.calls.items()}

    def close(self):
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _take(self):
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._new()

    def _new(self):
        return self._connection_class(self.host, timeout=self.timeout, blocksize=BLOCK_BYTES)

    def count(self, operation, failed, seconds):
        """Count a call made with ``open``."""
        with self._lock:
            counts = self.calls.setdefault(operation, [0, 0, 0.0])
            counts[0] += 1
            counts[1] += failed
            counts[2] += seconds


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

    def check(self):
        """Raise StoreUnavailable, in one line, unless the bucket can be read
        and written with these credentials (called at start)."""
        status, _, data = self.client.request("HeadBucket", "HEAD", "/" + self.bucket)
        if status != 200:
            raise storage.StoreUnavailable(
                "cannot use S3 bucket %s at %s: %s" % (self.bucket, self.client.host, {
                    403: "access denied (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
                    404: "no such bucket"}.get(status, "HTTP %d" % status)))

    def _path(self, repository, oid=""):
        return "/%s/%s%s/%s" % (self.bucket, self.prefix, repository, oid)

    # The store contract ------------------------------------------------------------

    def put(self, repository, source, expected_oid=None, length=None):
        """Store the bytes of ``source``; ``(oid, size)`` once the engine has them."""
        storage.check_repository(repository)
        if expected_oid is not None:
            expected_oid = storage.check_expected_oid(expected_oid)
        if length is not None and length > MAX_SINGLE_PUT:
            raise storage.InsufficientStorage("objects over 5 GiB need multipart upload, which "
                                              "this store does not do")
        if expected_oid is not None and length is not None:
            return self._put_streamed(repository, source, expected_oid, length)
        with tempfile.TemporaryFile(dir=self.spool_dir) as spool:
            digest, size = hashlib.sha256(), 0
            block = bytearray(BLOCK_BYTES)
            for count in iter(lambda: source.readinto(block), 0):
                digest.update(memoryview(block)[:count])
                spool.write(memoryview(block)[:count])
                size += count
                if size > MAX_SINGLE_PUT:
                    raise storage.InsufficientStorage("objects over 5 GiB need multipart upload")
            oid = digest.hexdigest()
            storage.check_digest(oid, expected_oid)
            spool.seek(0)
            self._put_object(repository, oid, spool, size, retry=True)
        return oid, size

    def _put_streamed(self, repository, source, oid, length):
        body = _HeldBackBody(source, length, oid)
        try:
            self._put_object(repository, oid, body, length, retry=False)
        except storage.StoreUnavailable:
            if body.mismatch:   # the connection was cut on purpose
                raise storage.DigestMismatch("content hashes to %s, not to the object id %s in "
                                             "the request" % (body.mismatch, oid)) from None
            raise
        return oid, length

    def _put_object(self, repository, oid, body, size, retry):
        status, _, data = self.client.request(
            "PutObject", "PUT", self._path(repository, oid), body=body, payload_hash=oid,
            headers={"content-length": str(size), "if-none-match": "*",
                     "content-type": "application/octet-stream"}, retry=retry)
        if status == 412:   # already stored: the same bytes, by its name
            return
        if status == 400 and _error_code(data) in ("XAmzContentSHA256Mismatch", "BadDigest"):
            raise storage.DigestMismatch("content does not hash to the object id %s" % oid)
        _raise_for(status, data, "PUT")

    def open(self, repository, oid):
        """The object as a StoredObject whose file streams it from the engine:
        its GET is under way already (so a download survives a DELETE that
        comes after it), and a seek elsewhere starts a ranged one."""
        storage.check_repository(repository)
        canonical = storage.canonical_oid(oid)
        if canonical is None:
            raise storage.not_found(repository, oid)
        reader = _ObjectReader(self.client, self._path(repository, canonical))
        if reader.size is None:
            raise storage.not_found(repository, oid)
        return storage.StoredObject(reader, reader.size, may_change_at_rest=True)

    def delete(self, repository, oid):
        """Remove the object; ObjectNotFound if the repository lacks it (a
        HeadObject first: S3's DELETE succeeds either way)."""
        storage.check_repository(repository)
        canonical = storage.canonical_oid(oid)
        path = self._path(repository, canonical or "")
        status, _, data = self.client.request("HeadObject", "HEAD", path) if canonical else (
            404, None, b"")
        if status == 404:
            raise storage.not_found(repository, oid)
        _raise_for(status, data, "HEAD")
        status, _, data = self.client.request("DeleteObject", "DELETE", path)
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
        """True while the bucket answers."""
        try:
            self.check()
        except storage.StoreError:
            return False
        return True

    def quarantine(self, repository, oid, file):
        """Move a damaged object to ``PREFIX@quarantine/<repository>@<oid>``
        (a server-side copy, then a delete); return that key."""
        target = "%s@quarantine/%s@%s" % (self.prefix, repository, oid)
        status, _, data = self.client.request(
            "CopyObject", "PUT", "/%s/%s" % (self.bucket, target), headers={
                "x-amz-copy-source": urllib.parse.quote(self._path(repository, oid))})
        _raise_for(status, data, "quarantine copy")
        self.client.request("DeleteObject", "DELETE", self._path(repository, oid))
        return target

    def close(self):
        self.client.close()


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
    the engine never receives a complete body. ``mismatch`` is then the digest."""

    def __init__(self, source, length, oid):
        self._source = source
        self._left = length
        self._oid = oid
        self._digest = hashlib.sha256()
        self.mismatch = None

    def readable(self):
        return True

    def read(self, size=-1):
        size = self._left if size is None or size < 0 else min(size, self._left)
        if size <= 0:
            return b""
        data = bytearray(size)
        view, count = memoryview(data), 0
        while count < size:
            got = self._source.readinto(view[count:])
            if not got:
                raise OSError("request body ended before its Content-Length")
            count += got
        self._digest.update(data)
        self._left -= count
        if not self._left and self._digest.hexdigest() != self._oid:
            self.mismatch = self._digest.hexdigest()
            raise OSError("upload does not hash to its oid: not sending its last block")
        return bytes(data)


class _ObjectReader(io.RawIOBase):
    """An object's bytes from the engine, streamed in bounded memory by a GET
    that starts at once (``size`` is None if there is no such object); a seek
    elsewhere drops it, and the next read starts a ranged GET there. A GET
    that fails after retries raises StoreUnavailable."""

    def __init__(self, client, path):
        self._client = client
        self._path = path
        self._position = 0
        self._response = self._connection = None
        self.size = self._get("GetObject", {})
        self._size = self.size or 0

    def _get(self, operation, headers):
        """Start a GET; the object's size, or None if it is not there."""
        started = time.monotonic()
        for attempt in range(RETRIES + 1):
            if attempt:
                time.sleep(BACKOFF_SECONDS * 2 ** (attempt - 1))
            try:
                response, connection = self._client.open("GET", self._path, headers=headers)
            except (OSError, http.client.HTTPException) as error:
                problem = error
                continue
            if response.status in (200, 206):
                self._response, self._connection = response, connection
                self._client.count(operation, False, time.monotonic() - started)
                length = response.getheader("Content-Range", "").rpartition("/")[2]
                return int(length or response.getheader("Content-Length"))
            data = response.read()
            self._client.release(connection, response)
            if response.status == 404:
                self._client.count(operation, False, time.monotonic() - started)
                return None
            problem = EngineError(response.status, _error_code(data), "")
            if response.status not in RETRY_STATUSES:
                break
        self._client.count(operation, True, time.monotonic() - started)
        raise storage.StoreUnavailable("the S3 engine at %s is unavailable (%s); retry later"
                                       % (self._client.host, problem))

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._position

    def seek(self, position, whence=0):
        position = {0: position, 1: self._position + position, 2: self._size + position}[whence]
        if position != self._position:
            self._drop()
            self._position = position
        return position

    def read(self, size=-1):
        """Up to ``size`` bytes (all that is left if negative), in one copy."""
        left = self._size - self._position
        size = left if size is None or size < 0 else min(size, left)
        if size <= 0:
            return b""
        self._start()
        data = self._response.read(size)
        self._advance(len(data))
        return data

    def readinto(self, buffer):
        if self._position >= self._size:
            return 0
        self._start()
        count = self._response.readinto(buffer)
        self._advance(count)
        return count

    def _start(self):
        if self._response is None and self._get(
                "GetObject", {"range": "bytes=%d-" % self._position}) is None:
            raise OSError("the object was deleted while it was read")

    def _advance(self, count):
        if not count:
            raise OSError("the S3 engine ended the object early")
        self._position += count
        if self._position >= self._size:
            self._response.read()   # the end, so the connection can be reused
            self._client.release(self._connection, self._response)
            self._response = self._connection = None

    def close(self):
        self._drop()
        super().close()

    def _drop(self):
        if self._connection is not None:
            self._connection.close()   # mid-body: not reusable
        self._response = self._connection = None
