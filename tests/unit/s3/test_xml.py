"""S3 XML documents: rendering escapes everything, parsing refuses what is malformed."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appendfs.s3 import xml
from appendfs.s3.errors import S3Error

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def test_listing_escapes_keys_and_url_encodes_them() -> None:
    objects = [(b"a<&>\"'.txt", 3, 10**18, "e" * 32), ("€/x y".encode(), 1, 10**18, "f" * 32)]
    doc = ET.fromstring(xml.list_objects_v2(
        bucket="b", prefix=b"", delimiter=b"/", max_keys=1000, url=False, objects=objects, prefixes=[b"p/"],
        truncated=True, token=None, next_token="tok", start_after=None, owner=None))
    keys = [c.findtext(f"{NS}Key") for c in doc.findall(f"{NS}Contents")]
    assert keys == ["a<&>\"'.txt", "€/x y"]
    assert doc.findtext(f"{NS}NextContinuationToken") == "tok"
    assert doc.findtext(f"{NS}IsTruncated") == "true"
    assert doc.findtext(f"{NS}KeyCount") == "3"
    url = ET.fromstring(xml.list_objects_v2(
        bucket="b", prefix=b"", delimiter=None, max_keys=1000, url=True, objects=objects, prefixes=[],
        truncated=False, token=None, next_token=None, start_after=None, owner=None))
    assert [c.findtext(f"{NS}Key") for c in url.findall(f"{NS}Contents")][1] == "%E2%82%AC/x%20y"


@given(st.binary(min_size=1, max_size=50))
def test_url_encoded_keys_round_trip(key: bytes) -> None:
    import urllib.parse

    assert urllib.parse.unquote_to_bytes(xml.key_text(key, True)) == key


def test_parse_complete() -> None:
    body = (b'<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            b'<Part><ETag>"abc"</ETag><PartNumber>1</PartNumber></Part>'
            b"<Part><PartNumber>2</PartNumber><ETag>def</ETag></Part></CompleteMultipartUpload>")
    assert xml.parse_complete(body) == [(1, "abc"), (2, "def")]


@pytest.mark.parametrize("body", [
    b"", b"<CompleteMultipartUpload>", b"<Other/>", b"<CompleteMultipartUpload></CompleteMultipartUpload>",
    b"<CompleteMultipartUpload><Part><PartNumber>x</PartNumber><ETag>a</ETag></Part></CompleteMultipartUpload>",
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">]><CompleteMultipartUpload/>',
    b"\xff\xfe garbage",
])
def test_malformed_complete(body: bytes) -> None:
    with pytest.raises(S3Error) as e:
        xml.parse_complete(body)
    assert e.value.code == "MalformedXML"


def test_parse_delete() -> None:
    body = b"<Delete><Quiet>true</Quiet><Object><Key>a</Key></Object><Object><Key>b/c</Key></Object></Delete>"
    assert xml.parse_delete(body) == (True, ["a", "b/c"])
    with pytest.raises(S3Error):
        xml.parse_delete(b"<Delete>" + b"<Object><Key>k</Key></Object>" * 1001 + b"</Delete>")


@given(st.binary(max_size=200))
def test_parsers_raise_only_malformed_xml(body: bytes) -> None:
    for parse in (xml.parse_complete, xml.parse_delete, xml.parse_create_bucket):
        try:
            parse(body)
        except S3Error as e:
            assert e.code == "MalformedXML"


def test_error_document() -> None:
    doc = ET.fromstring(xml.error("NoSuchKey", "no <such> key", "/b/k", "RID"))
    assert doc.findtext("Code") == "NoSuchKey" and doc.findtext("Message") == "no <such> key"
