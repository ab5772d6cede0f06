"""S3's XML documents: responses rendered, request bodies parsed. Pure code, no I/O.

Responses are built as strings (a 1,000-key listing renders in about a millisecond);
every text node goes through :func:`_t`. Request bodies (CompleteMultipartUpload,
Delete, CreateBucketConfiguration) are parsed with the standard library's expat after
refusing DOCTYPE declarations (no entity tricks reach the parser) and anything larger
than the caller's bound; malformed or unexpected documents raise ``MalformedXML``.

Keys are bytes in the namespace (names written through the mount need not be UTF-8).
With ``encoding-type=url`` they are percent-encoded byte for byte; otherwise they are
decoded as UTF-8 with replacement characters.
"""

from __future__ import annotations

import email.utils
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from xml.sax.saxutils import escape

from appendfs.s3.errors import S3Error

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
_HEAD = '<?xml version="1.0" encoding="UTF-8"?>\n'


def _t(value: str) -> str:
    return escape(value)


def key_text(key: bytes, url: bool) -> str:
    """A key (or prefix) as it appears in a listing."""
    if url:
        return urllib.parse.quote(key, safe="/")
    return _t(key.decode("utf-8", "replace"))


def iso_time(ns: int) -> str:
    """``2026-11-22T10:00:00.000Z`` (listings, CopyObjectResult)."""
    s, rem = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{rem // 1_000_000:03d}Z"


def http_time(ns: int) -> str:
    """``Sun, 22 Nov 2026 10:00:00 GMT`` (Last-Modified)."""
    return email.utils.formatdate(ns / 1e9, usegmt=True)


def error(code: str, message: str, resource: str, request_id: str) -> bytes:
    return (f"{_HEAD}<Error><Code>{_t(code)}</Code><Message>{_t(message)}</Message>"
            f"<Resource>{_t(resource)}</Resource><RequestId>{request_id}</RequestId></Error>").encode()


def _doc(root: str, body: str) -> bytes:
    return f'{_HEAD}<{root} xmlns="{NS}">{body}</{root}>'.encode()


def _owner(owner: str) -> str:
    return f"<Owner><ID>{_t(owner)}</ID><DisplayName>{_t(owner)}</DisplayName></Owner>"


def list_buckets(owner: str, buckets: Iterable[tuple[str, int]]) -> bytes:
    items = "".join(f"<Bucket><Name>{_t(n)}</Name><CreationDate>{iso_time(c)}</CreationDate></Bucket>"
                    for n, c in buckets)
    return _doc("ListAllMyBucketsResult", f"{_owner(owner)}<Buckets>{items}</Buckets>")


def _contents(objects: Iterable[tuple[bytes, int, int, str]], url: bool, owner: str | None) -> str:
    own = _owner(owner) if owner is not None else ""
    return "".join(
        f"<Contents><Key>{key_text(k, url)}</Key><LastModified>{iso_time(m)}</LastModified>"
        f"<ETag>&quot;{_t(e)}&quot;</ETag><Size>{s}</Size>{own}<StorageClass>STANDARD</StorageClass></Contents>"
        for k, s, m, e in objects)


def _prefixes(prefixes: Iterable[bytes], url: bool) -> str:
    return "".join(f"<CommonPrefixes><Prefix>{key_text(p, url)}</Prefix></CommonPrefixes>" for p in prefixes)


def list_objects_v2(*, bucket: str, prefix: bytes, delimiter: bytes | None, max_keys: int, url: bool,
                    objects: Sequence[tuple[bytes, int, int, str]], prefixes: Sequence[bytes], truncated: bool,
                    token: str | None, next_token: str | None, start_after: bytes | None,
                    owner: str | None) -> bytes:
    parts = [f"<Name>{_t(bucket)}</Name><Prefix>{key_text(prefix, url)}</Prefix>",
             f"<KeyCount>{len(objects) + len(prefixes)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>"]
    if delimiter:
        parts.append(f"<Delimiter>{key_text(delimiter, url)}</Delimiter>")
    if url:
        parts.append("<EncodingType>url</EncodingType>")
    parts.append(f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>")
    if token is not None:
        parts.append(f"<ContinuationToken>{_t(token)}</ContinuationToken>")
    if next_token is not None:
        parts.append(f"<NextContinuationToken>{_t(next_token)}</NextContinuationToken>")
    if start_after:
        parts.append(f"<StartAfter>{key_text(start_after, url)}</StartAfter>")
    parts.append(_contents(objects, url, owner))
    parts.append(_prefixes(prefixes, url))
    return _doc("ListBucketResult", "".join(parts))


def list_objects_v1(*, bucket: str, prefix: bytes, delimiter: bytes | None, max_keys: int, url: bool,
                    objects: Sequence[tuple[bytes, int, int, str]], prefixes: Sequence[bytes], truncated: bool,
                    marker: bytes, next_marker: bytes | None, owner: str) -> bytes:
    parts = [f"<Name>{_t(bucket)}</Name><Prefix>{key_text(prefix, url)}</Prefix>",
             f"<Marker>{key_text(marker, url)}</Marker><MaxKeys>{max_keys}</MaxKeys>"]
    if delimiter:
        parts.append(f"<Delimiter>{key_text(delimiter, url)}</Delimiter>")
    if url:
        parts.append("<EncodingType>url</EncodingType>")
    parts.append(f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>")
    if truncated and next_marker is not None:
        parts.append(f"<NextMarker>{key_text(next_marker, url)}</NextMarker>")
    parts.append(_contents(objects, url, owner))
    parts.append(_prefixes(prefixes, url))
    return _doc("ListBucketResult", "".join(parts))


def initiate_multipart(bucket: str, key: bytes, upload_id: str) -> bytes:
    return _doc("InitiateMultipartUploadResult",
                f"<Bucket>{_t(bucket)}</Bucket><Key>{key_text(key, False)}</Key><UploadId>{upload_id}</UploadId>")


def complete_multipart(location: str, bucket: str, key: bytes, etag: str) -> bytes:
    return _doc("CompleteMultipartUploadResult",
                f"<Location>{_t(location)}</Location><Bucket>{_t(bucket)}</Bucket>"
                f"<Key>{key_text(key, False)}</Key><ETag>&quot;{_t(etag)}&quot;</ETag>")


def list_parts(*, bucket: str, key: bytes, upload_id: str, marker: int, next_marker: int, max_parts: int,
               truncated: bool, parts: Iterable[tuple[int, int, int, str]], owner: str) -> bytes:
    items = "".join(f"<Part><PartNumber>{n}</PartNumber><LastModified>{iso_time(m)}</LastModified>"
                    f"<ETag>&quot;{_t(e)}&quot;</ETag><Size>{s}</Size></Part>" for n, s, m, e in parts)
    return _doc("ListPartsResult",
                f"<Bucket>{_t(bucket)}</Bucket><Key>{key_text(key, False)}</Key><UploadId>{upload_id}</UploadId>"
                f"<Initiator><ID>{_t(owner)}</ID><DisplayName>{_t(owner)}</DisplayName></Initiator>{_owner(owner)}"
                f"<StorageClass>STANDARD</StorageClass><PartNumberMarker>{marker}</PartNumberMarker>"
                f"<NextPartNumberMarker>{next_marker}</NextPartNumberMarker><MaxParts>{max_parts}</MaxParts>"
                f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>{items}")


def list_uploads(*, bucket: str, prefix: bytes, key_marker: bytes, upload_id_marker: str, max_uploads: int,
                 truncated: bool, uploads: Sequence[tuple[bytes, str, int]], owner: str, url: bool) -> bytes:
    items = "".join(f"<Upload><Key>{key_text(k, url)}</Key><UploadId>{u}</UploadId>"
                    f"<Initiator><ID>{_t(owner)}</ID><DisplayName>{_t(owner)}</DisplayName></Initiator>"
                    f"{_owner(owner)}<StorageClass>STANDARD</StorageClass><Initiated>{iso_time(t)}</Initiated></Upload>"
                    for k, u, t in uploads)
    nxt = ""
    if truncated and uploads:
        nxt = (f"<NextKeyMarker>{key_text(uploads[-1][0], url)}</NextKeyMarker>"
               f"<NextUploadIdMarker>{uploads[-1][1]}</NextUploadIdMarker>")
    return _doc("ListMultipartUploadsResult",
                f"<Bucket>{_t(bucket)}</Bucket><KeyMarker>{key_text(key_marker, url)}</KeyMarker>"
                f"<UploadIdMarker>{_t(upload_id_marker)}</UploadIdMarker>{nxt}<Prefix>{key_text(prefix, url)}</Prefix>"
                f"<MaxUploads>{max_uploads}</MaxUploads><IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
                f"{'<EncodingType>url</EncodingType>' if url else ''}{items}")


def copy_result(root: str, etag: str, mtime_ns: int) -> bytes:
    """CopyObjectResult or CopyPartResult."""
    return _doc(root, f"<LastModified>{iso_time(mtime_ns)}</LastModified><ETag>&quot;{_t(etag)}&quot;</ETag>")


def delete_result(deleted: Iterable[str], errors: Iterable[tuple[str, str, str]], quiet: bool) -> bytes:
    ok = "" if quiet else "".join(f"<Deleted><Key>{_t(k)}</Key></Deleted>" for k in deleted)
    bad = "".join(f"<Error><Key>{_t(k)}</Key><Code>{_t(c)}</Code><Message>{_t(m)}</Message></Error>"
                  for k, c, m in errors)
    return _doc("DeleteResult", ok + bad)


def location(region: str) -> bytes:
    # us-east-1 is reported as an empty constraint, as AWS does.
    return _doc("LocationConstraint", "" if region == "us-east-1" else _t(region))


def versioning() -> bytes:
    return _doc("VersioningConfiguration", "")


# ---- request bodies -----------------------------------------------------------------------


def _parse(body: bytes, root: str) -> ET.Element:
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise S3Error("MalformedXML", "DOCTYPE and ENTITY declarations are not accepted")
    try:
        el = ET.fromstring(body)
    except ET.ParseError as exc:
        raise S3Error("MalformedXML", f"the XML is not well-formed: {exc}") from None
    if _local(el.tag) != root:
        raise S3Error("MalformedXML", f"expected a <{root}> document, got <{_local(el.tag)}>")
    return el


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el if _local(c.tag) == name]


def _text(el: ET.Element, name: str, required: bool = True) -> str | None:
    found = _children(el, name)
    if not found:
        if required:
            raise S3Error("MalformedXML", f"<{_local(el.tag)}> lacks <{name}>")
        return None
    return found[0].text or ""


def parse_complete(body: bytes) -> list[tuple[int, str]]:
    """CompleteMultipartUpload → [(part number, etag without quotes)] in document order."""
    el = _parse(body, "CompleteMultipartUpload")
    parts = []
    for p in _children(el, "Part"):
        num = _text(p, "PartNumber") or ""
        etag = (_text(p, "ETag") or "").strip().strip('"')
        if not num.strip().isdigit():
            raise S3Error("MalformedXML", f"bad PartNumber {num!r}")
        parts.append((int(num), etag))
    if not parts:
        raise S3Error("MalformedXML", "CompleteMultipartUpload lists no parts")
    return parts


def parse_delete(body: bytes, max_keys: int = 1000) -> tuple[bool, list[str]]:
    """Delete → (quiet, keys)."""
    el = _parse(body, "Delete")
    quiet = (_text(el, "Quiet", required=False) or "false").strip().lower() == "true"
    keys = [_text(o, "Key") or "" for o in _children(el, "Object")]
    if not keys:
        raise S3Error("MalformedXML", "Delete lists no objects")
    if len(keys) > max_keys:
        raise S3Error("MalformedXML", f"Delete lists {len(keys)} objects; at most {max_keys} are allowed")
    return quiet, keys


def parse_create_bucket(body: bytes) -> str | None:
    """CreateBucketConfiguration → its LocationConstraint (None when the body is empty)."""
    if not body.strip():
        return None
    el = _parse(body, "CreateBucketConfiguration")
    return _text(el, "LocationConstraint", required=False)
