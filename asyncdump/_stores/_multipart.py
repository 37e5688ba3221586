"""One S3 object from a local file, in multipart parts: visible whole or not at all.

    CreateMultipartUpload -> UploadPart x N (each retried) -> CompleteMultipartUpload

The key shows nothing until Complete succeeds. A failure aborts the upload (best effort); an
upload abandoned by a killed process is aborted when its dataset resumes or closes
(``abort_uploads``). Parts are read with ``os.pread`` one at a time, so at most one part's bytes
are in memory, whatever the object's size. Imported by the uploader process: never torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any

from ._retry import error_details, with_retries

PART_BYTES = 8 << 20  # S3's smallest part is 5 MiB (the last excepted)
MAX_PARTS = 10_000  # S3's limit: larger objects get larger parts


def part_bytes(size: int) -> int:
    """The part size for an object of ``size`` bytes."""
    return max(PART_BYTES, -(-size // MAX_PARTS))


def _read(fd: int, size: int, offset: int) -> bytes:
    chunks = []
    while size:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            raise OSError(f"the spool file ended {size} bytes early")
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def upload_file(store: Any, url: str, fd: int, size: int) -> None:
    """Store the first ``size`` bytes of the file ``fd`` at ``url`` (an ``FsspecStore``'s
    S3 key), every request retried on transient errors for ``store.retry_seconds``."""
    step = part_bytes(size)
    if size <= step:  # one PUT: atomic by itself
        store.put(url, _read(fd, size, 0), True)
        return
    fs = store.fs
    bucket, _, key = fs._strip_protocol(url).partition("/")

    def retried(operation: Any) -> Any:
        return with_retries(url, operation, store.retry_seconds)

    upload_id = retried(lambda: fs.call_s3("create_multipart_upload", Bucket=bucket,
                                            Key=key))["UploadId"]
    try:
        parts = []
        for number, start in enumerate(range(0, size, step), 1):
            data = _read(fd, min(step, size - start), start)
            answer = retried(lambda n=number, d=data: fs.call_s3(
                "upload_part", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=d))
            parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        etag = _multipart_etag([p["ETag"] for p in parts])

        def complete() -> None:
            try:
                fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=key,
                           UploadId=upload_id, MultipartUpload={"Parts": parts})
            except Exception as exc:
                # A retry after a lost answer finds the upload completed: check the object.
                if error_details(exc)[0] != "NoSuchUpload" or not _holds(fs, bucket, key, size, etag):
                    raise
        retried(complete)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        raise


def _multipart_etag(part_etags: list[str]) -> str:
    """S3's ETag of a completed multipart object: MD5 of the parts' MD5s, "-", their count."""
    digests = b"".join(bytes.fromhex(e.strip('"')) for e in part_etags)
    return f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(part_etags)}"


def _holds(fs: Any, bucket: str, key: str, size: int, etag: str) -> bool:
    try:
        head = fs.call_s3("head_object", Bucket=bucket, Key=key)
    except Exception:
        return False
    return int(head.get("ContentLength", -1)) == size and head.get("ETag", "").strip('"') == etag


def _abort(fs: Any, bucket: str, key: str, upload_id: str) -> None:
    try:
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception as exc:
        if error_details(exc)[0] != "NoSuchUpload":  # a retry after a lost answer: done
            raise


def abort_uploads(fs: Any, url: str, retry_seconds: float) -> int:
    """Abort every unfinished multipart upload under ``url`` (S3; a prefix whose writers are
    all stopped); the number aborted. Their parts cost storage but were never visible."""
    bucket, _, prefix = fs._strip_protocol(url).partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    aborted = 0
    marker: dict[str, str] = {}
    for _ in range(10_000):  # bounded: 1,000 uploads per page
        def list_page(marker: dict[str, str] = marker) -> Any:
            return fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **marker)
        page = with_retries(url, list_page, retry_seconds)
        for upload in page.get("Uploads", []):
            def abort(upload: dict[str, Any] = upload) -> None:
                _abort(fs, bucket, upload["Key"], upload["UploadId"])
            with_retries(url, abort, retry_seconds)
            aborted += 1
        if not page.get("IsTruncated"):
            break
        marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
    return aborted
