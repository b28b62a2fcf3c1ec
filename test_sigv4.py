"""AWS Signature Version 4 (sigv4.py) against AWS's published vectors."""

import hashlib
import unittest

import sigv4

SUITE = sigv4.Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
SUITE_HEADERS = {"host": "example.amazonaws.com", "x-amz-date": "20150830T123600Z"}


class SignatureTestSuiteTest(unittest.TestCase):
    """AWS's signature test suite (aws-sig-v4-test-suite): region us-east-1, service "service"."""

    def authorization(self, method, query=()):
        return sigv4.authorization(SUITE, "us-east-1", "service", method, "/", list(query),
                                   dict(SUITE_HEADERS), sigv4.EMPTY_PAYLOAD)

    def test_get_vanilla(self):
        request = sigv4.canonical_request("GET", "/", [], dict(SUITE_HEADERS), sigv4.EMPTY_PAYLOAD)
        self.assertEqual(request, "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n"
                                  "\nhost;x-amz-date\n" + sigv4.EMPTY_PAYLOAD)   # get-vanilla.creq
        self.assertEqual(self.authorization("GET"),
                         "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/"
                         "aws4_request, SignedHeaders=host;x-amz-date, Signature="
                         "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31")

    def test_get_vanilla_query_order_key_case(self):
        self.assertTrue(self.authorization("GET", [("Param2", "value2"), ("Param1", "value1")])
                        .endswith("b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"))

    def test_post_vanilla(self):
        self.assertTrue(self.authorization("POST").endswith(
            "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"))


class S3DocumentationExampleTest(unittest.TestCase):
    """The S3 API reference's worked example: GET Object with a Range (examplebucket)."""

    def test_get_object(self):
        credentials = sigv4.Credentials("AKIAIOSFODNN7EXAMPLE",
                                        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
        headers = {"host": "examplebucket.s3.amazonaws.com", "range": "bytes=0-9",
                   "x-amz-content-sha256": sigv4.EMPTY_PAYLOAD, "x-amz-date": "20130524T000000Z"}
        request = sigv4.canonical_request("GET", "/test.txt", [], headers, sigv4.EMPTY_PAYLOAD)
        scope = "20130524/us-east-1/s3/aws4_request"
        self.assertEqual(hashlib.sha256(sigv4.string_to_sign("20130524T000000Z", scope, request)
                                        .encode()).hexdigest(),
                         hashlib.sha256(("AWS4-HMAC-SHA256\n20130524T000000Z\n" + scope + "\n"
                                         "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972")
                                        .encode()).hexdigest())
        self.assertEqual(
            sigv4.authorization(credentials, "us-east-1", "s3", "GET", "/test.txt", [], headers,
                                sigv4.EMPTY_PAYLOAD),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
            "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
            "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")

    def test_keys_and_query_values_are_encoded(self):
        request = sigv4.canonical_request("GET", "/bucket/a b+c", [("prefix", "p/r "), ("list-type", "2")],
                                          {"host": "h"}, sigv4.EMPTY_PAYLOAD)
        self.assertEqual(request.split("\n")[1:3], ["/bucket/a%20b%2Bc", "list-type=2&prefix=p%2Fr%20"])


if __name__ == "__main__":
    unittest.main()
