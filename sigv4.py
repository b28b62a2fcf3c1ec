"""AWS Signature Version 4 for S3 requests, with ``hmac`` and ``hashlib``.

The algorithm is AWS's "Signature Version 4 signing process": a canonical
request (method, URI, query, the signed header fields, the payload's SHA-256)
is hashed into a string to sign, which is signed with a key derived from the
secret by four HMACs (date, region, service, ``aws4_request``). The tests hold
it to AWS's published vectors (the signature test suite's ``get-vanilla``
cases and the S3 documentation's examples), so a signature is right by
construction, not merely accepted by one lenient engine.
"""

import hashlib
import hmac
import urllib.parse

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_PAYLOAD = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


class Credentials:
    """An access key, its secret, and the session token of temporary credentials."""

    def __init__(self, access_key, secret_key, session_token=None):
        self.access_key = access_key
        self.secret_key = secret_key
        self.session_token = session_token


def uri_encode(text, safe="-_.~"):
    """Percent-encode all but the unreserved characters (and ``safe``), as SigV4 asks."""
    return urllib.parse.quote(text, safe=safe)


def canonical_request(method, path, query, headers, payload_hash):
    """The canonical request: ``path`` is the raw (unencoded) object path,
    ``query`` a list of ``(name, value)`` pairs, ``headers`` a dict of the
    header fields to sign, by lowercase name."""
    names = sorted(headers)
    return "\n".join([
        method,
        uri_encode(path, safe="/-_.~"),
        "&".join("%s=%s" % pair for pair in sorted(
            (uri_encode(name), uri_encode(value)) for name, value in query)),
        "".join("%s:%s\n" % (name, " ".join(headers[name].split())) for name in names),
        ";".join(names),
        payload_hash,
    ])


def string_to_sign(amz_date, scope, request):
    return "\n".join([ALGORITHM, amz_date, scope,
                      hashlib.sha256(request.encode("utf-8")).hexdigest()])


def signing_key(secret_key, date, region, service):
    key = ("AWS4" + secret_key).encode("utf-8")
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def authorization(credentials, region, service, method, path, query, headers, payload_hash):
    """The Authorization value for a request whose ``headers`` (lowercase names)
    hold every field to sign, ``x-amz-date`` among them."""
    amz_date = headers["x-amz-date"]
    scope = "%s/%s/%s/aws4_request" % (amz_date[:8], region, service)
    request = canonical_request(method, path, query, headers, payload_hash)
    signature = hmac.new(signing_key(credentials.secret_key, amz_date[:8], region, service),
                         string_to_sign(amz_date, scope, request).encode("utf-8"),
                         hashlib.sha256).hexdigest()
    return "%s Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
        ALGORITHM, credentials.access_key, scope, ";".join(sorted(headers)), signature)
