"""An S3-compatible bucket (AWS S3, SeaweedFS, MinIO, ...) under one key prefix, through boto3.

There is no rename on S3, so a save writes its files straight under their final keys
(`PREFIX/snapshots/step_N/...`) and the commit point is the manifest object, written last with a
conditional PUT (`If-None-Match: *`): a snapshot is committed if and only if its manifest exists,
and a second writer's commit of the same step fails with 412 instead of replacing the first's.
Until then the files are an uncommitted remainder that readers never look at (they start from the
manifest) and that rank 0 deletes at the next start, with every unfinished multipart upload.
Deleting a snapshot deletes its manifest first.

Endpoint, region and credentials come from the standard AWS chain (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, instance roles, ...); nothing of them is
logged. Transient failures (5xx, SlowDown, throttling, a reset connection) are retried by botocore's
`standard` mode, exponential backoff with jitter (`AWS_MAX_ATTEMPTS`, `AWS_RETRY_MODE` override it).

Throughput with bounded memory: a file larger than one part goes up as a multipart upload whose
parts (`part_bytes` each) are uploaded `concurrency` at a time from a copy of at most that many
parts; reads are parallel ranged GETs straight into the caller's buffers.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from dtrain.storage.base import CommitConflictError

PART_BYTES = 16 << 20
"""Multipart part and ranged-GET size: large enough to amortize a request, small enough to bound memory."""
CONCURRENCY = 8
"""Parts uploaded, or ranges read, at a time per file."""
_READ_CHUNK = 1 << 20
_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys


class S3Storage:
    """Storage in `s3://bucket/prefix`; every path argument is relative to the prefix.

        storage = S3Storage("runs", "exp1")          # s3://runs/exp1
        with_handle = storage.open_write("snapshots/step_000000400/replicated-00000.bin")
        storage.commit(save_dir, final, "manifest.json", manifest_bytes)   # the commit point
    """

    def __init__(self, bucket: str, prefix: str, part_bytes: int = PART_BYTES, concurrency: int = CONCURRENCY) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_bytes = part_bytes
        self.concurrency = concurrency
        self._client: Any = None
        self._client_pid = -1
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (to hand to spawned ranks): the client and its connections stay behind."""
        return {**self.__dict__, "_client": None, "_client_pid": -1, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    @property
    def client(self) -> Any:
        """The boto3 client, made once per process: a forked writer child must not share the parent's connections."""
        with self._lock:
            if self._client is None or self._client_pid != os.getpid():
                self._client, self._client_pid = make_client(self.concurrency * 2), os.getpid()
            return self._client

    def key(self, path: str) -> str:
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise OSError(f"{path}: not inside the run dir (climbs out with '..')")
        return "/".join([self.prefix, *parts]) if self.prefix else "/".join(parts)

    def describe(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(path)}".rstrip("/")

    # -- writing -------------------------------------------------------------------------------

    def open_write(self, path: str) -> S3WriteHandle:
        return S3WriteHandle(self, self.key(path))

    def write_atomic(self, path: str, data: bytes) -> None:
        """One PUT: S3 shows the old object or the new one, never a mix."""
        self.client.put_object(Bucket=self.bucket, Key=self.key(path), Body=data)

    def makedirs(self, path: str) -> None:
        """Prefixes need no creating; the bucket must exist (checked by `check_bucket`)."""

    def save_dir(self, pending: str, final: str) -> str:
        return final  # no rename: the files go under their final keys; the manifest commits them

    def commit(self, save_dir: str, final: str, manifest_name: str, manifest: bytes) -> None:
        """The manifest's PUT with `If-None-Match: *`: 412 when one exists. A retried PUT whose first
        attempt did land (its response lost) also meets 412: the manifest there is then ours."""
        from botocore.exceptions import ClientError

        path = f"{final}/{manifest_name}"
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(path), Body=manifest, IfNoneMatch="*")
        except ClientError as e:
            if _code(e) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise _os_error(e, self.describe(final)) from None
            if self._holds(path, manifest):
                return
            raise CommitConflictError(f"{self.describe(final)} is committed already ({_code(e)}); "
                                      "this save was not") from None

    def _holds(self, path: str, data: bytes) -> bool:
        try:
            return self.read_bytes(path, len(data)) == data
        except (OSError, ValueError):
            return False

    def uncommit(self, final: str, aside: str, manifest_name: str) -> str:
        """Delete the manifest: from then on the snapshot's files are an uncommitted remainder."""
        self.client.delete_object(Bucket=self.bucket, Key=self.key(f"{final}/{manifest_name}"))
        return final

    def remove_tree(self, path: str) -> None:
        """Delete every object below `path`, JSON (a manifest) in a request of its own before the
        rest: a crash in between leaves files without a manifest, never a manifest without its files.
        Errors are ignored (the next start deletes what is left)."""
        try:
            keys = self._keys(path)
            for batch in ([k for k in keys if k.endswith(".json")], [k for k in keys if not k.endswith(".json")]):
                for start in range(0, len(batch), _DELETE_BATCH):
                    objects = [{"Key": k} for k in batch[start:start + _DELETE_BATCH]]
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
        except Exception:
            pass

    def remove_temp_files(self, path: str) -> list[str]:
        """Abort every unfinished multipart upload below `path` (their parts cost storage but are invisible)."""
        prefix = self.key(path) + "/"
        aborted = []
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted.append(upload["Key"].removeprefix(prefix))
        return sorted(aborted)

    # -- reading -------------------------------------------------------------------------------

    def read_into(self, path: str, outs: list[memoryview], on_read: Callable[[memoryview], None] | None = None,
                  offset: int = 0) -> None:
        """Parallel ranged GETs, each straight into the part of `outs` it covers; `on_read` in order."""
        outs = [o.cast("B") for o in outs]
        wanted, size = offset + sum(len(o) for o in outs), self.size(path)
        if size < wanted:
            raise EOFError(f"{self.describe(path)} is {size} bytes, expected at least {wanted}")
        target = _Scatter(outs, on_read, offset)
        ranges = [(start, min(wanted, start + self.part_bytes)) for start in range(offset, wanted, self.part_bytes)]
        if len(ranges) <= 1:
            for start, end in ranges:
                self._read_range(path, start, end, target)
        else:
            with ThreadPoolExecutor(min(self.concurrency, len(ranges)), thread_name_prefix="dtrain-s3-get") as pool:
                for f in [pool.submit(self._read_range, path, start, end, target) for start, end in ranges]:
                    f.result()
        target.put(wanted, b"")  # reports empty outs at the end, if any

    def _read_range(self, path: str, start: int, end: int, target: _Scatter) -> None:
        body = self._get(path, f"bytes={start}-{end - 1}")["Body"]
        try:
            offset = start
            while offset < end:
                chunk = body.read(min(_READ_CHUNK, end - offset))
                if not chunk:
                    raise EOFError(f"{self.describe(path)} ends at byte {offset}, expected {end}")
                target.put(offset, chunk)
                offset += len(chunk)
        finally:
            body.close()

    def read_bytes(self, path: str, limit: int) -> bytes:
        response = self._get(path, None)
        body = response["Body"]
        try:
            if response["ContentLength"] > limit:
                raise ValueError(f"{self.describe(path)} is over the {limit}-byte limit for this kind of file")
            return body.read(limit + 1)
        finally:
            body.close()

    def size(self, path: str) -> int:
        return self._head(path)["ContentLength"]

    def exists(self, path: str) -> bool:
        return self.is_regular_file(path) or bool(self._list(self.key(path) + "/", max_keys=1))

    def is_regular_file(self, path: str) -> bool:
        try:
            self._head(path)
        except FileNotFoundError:
            return False
        return True

    def listdir(self, path: str) -> list[str]:
        """Names of the objects and non-empty prefixes right below `path`. Some servers (SeaweedFS)
        keep listing a prefix whose objects were all deleted; S3 has no such empty "directories"."""
        prefix = self.key(path) + "/" if self.key(path) else ""
        names, prefixes = set(), []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix,
                                                                          Delimiter="/"):
            prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
            names.update(o["Key"][len(prefix):] for o in page.get("Contents", []))
        names.update(p[len(prefix):].rstrip("/") for p in prefixes if self._list(p, max_keys=1))
        return sorted(n for n in names if n)

    def check_bucket(self) -> None:
        """Raise `OSError` naming the bucket and the fix if it cannot be reached or does not exist."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            raise OSError(f"s3://{self.bucket}: {_code(e)} ({_describe(e)}); create the bucket, or check "
                          "AWS_ENDPOINT_URL and the credentials") from None
        except BotoCoreError as e:
            raise OSError(f"s3://{self.bucket}: cannot reach the endpoint ({e}); check AWS_ENDPOINT_URL") from None

    # -- requests ------------------------------------------------------------------------------

    def _get(self, path: str, byte_range: str | None) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        extra = {"Range": byte_range} if byte_range else {}
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(path), **extra)
        except (ClientError, BotoCoreError) as e:
            raise _os_error(e, self.describe(path)) from None

    def _head(self, path: str) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key(path))
        except (ClientError, BotoCoreError) as e:
            raise _os_error(e, self.describe(path)) from None

    def _keys(self, path: str) -> list[str]:
        key = self.key(path)
        return [k for k in self._list(key) if k == key or k.startswith(key + "/")]

    def _list(self, prefix: str, max_keys: int | None = None) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, **({"PaginationConfig": {"MaxItems": max_keys}} if max_keys else {}))
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


class S3WriteHandle:
    """A streamed upload. Bytes collect into one part; a file that stays under one part is a single
    PUT at `close`, a larger one a multipart upload with at most `concurrency` parts in flight (the
    writer waits for a slot), completed at `close`. The parts are copies: the caller may reuse or
    release its buffers (fork staging gives the pages up) as soon as `write` returns."""

    def __init__(self, storage: S3Storage, key: str) -> None:
        self._storage = storage
        self._key = key
        self._part = bytearray()
        self._filled = 0
        self._upload_id: str | None = None
        self._parts: list[Future] = []
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(storage.concurrency)
        self._closed = False

    def write(self, data: memoryview) -> None:
        data = data.cast("B")
        size = self._storage.part_bytes
        while len(data):
            if not self._part:
                self._part = bytearray(size)  # one copy of the bytes: the part is handed over as it is
            take = min(len(data), size - self._filled)
            self._part[self._filled:self._filled + take] = data[:take]
            self._filled += take
            data = data[take:]
            if self._filled == size:
                self._send_part()

    def _send_part(self) -> None:
        client, bucket = self._storage.client, self._storage.bucket
        if self._upload_id is None:
            self._upload_id = client.create_multipart_upload(Bucket=bucket, Key=self._key)["UploadId"]
            self._pool = ThreadPoolExecutor(self._storage.concurrency, thread_name_prefix="dtrain-s3-put")
        for done in [f for f in self._parts if f.done()]:
            done.result()  # an upload error stops the write at once
        self._slots.acquire()
        body = self._part if self._filled == len(self._part) else memoryview(self._part)[:self._filled].tobytes()
        self._part, self._filled = bytearray(), 0
        number = len(self._parts) + 1
        self._parts.append(self._pool.submit(self._upload_part, number, body))

    def _upload_part(self, number: int, body: bytes | bytearray) -> dict[str, Any]:
        try:
            response = self._storage.client.upload_part(Bucket=self._storage.bucket, Key=self._key,
                                                        UploadId=self._upload_id, PartNumber=number, Body=body)
            return {"PartNumber": number, "ETag": response["ETag"]}
        finally:
            self._slots.release()

    def close(self) -> None:
        if self._closed:
            raise OSError(f"{self._key}: closed twice")
        self._closed = True
        client, bucket = self._storage.client, self._storage.bucket
        if self._upload_id is None:
            client.put_object(Bucket=bucket, Key=self._key, Body=memoryview(self._part)[:self._filled].tobytes())
            return
        if self._filled:
            self._send_part()
        try:
            parts = [f.result() for f in self._parts]
            client.complete_multipart_upload(Bucket=bucket, Key=self._key, UploadId=self._upload_id,
                                             MultipartUpload={"Parts": parts})
        except BaseException:
            self._abort_upload()
            raise
        finally:
            self._pool.shutdown(wait=True)

    def abort(self) -> None:
        self._closed = True
        self._part, self._filled = bytearray(), 0
        if self._upload_id is not None:
            for f in self._parts:
                f.cancel()
            self._pool.shutdown(wait=True)
            self._abort_upload()

    def _abort_upload(self) -> None:
        try:
            self._storage.client.abort_multipart_upload(Bucket=self._storage.bucket, Key=self._key,
                                                        UploadId=self._upload_id)
        except Exception:
            pass  # the next start aborts what is left
        self._upload_id = None


class _Scatter:
    """Bytes arriving at file offsets, in any order, copied into `outs` (which tile the file from
    byte `start`); `on_read(out)` is called for each out once it is full, in file order."""

    def __init__(self, outs: list[memoryview], on_read: Callable[[memoryview], None] | None, start: int = 0) -> None:
        self._outs = outs
        self._starts = [start]
        for o in outs:
            self._starts.append(self._starts[-1] + len(o))
        self._missing = [len(o) for o in outs]
        self._next = 0
        self._on_read = on_read
        self._lock = threading.Lock()

    def put(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        filled = []
        for index, start, piece in self._pieces(offset, view):
            self._outs[index][start:start + len(piece)] = piece
            filled.append((index, len(piece)))
        with self._lock:
            for index, n in filled:
                self._missing[index] -= n
            while self._next < len(self._outs) and self._missing[self._next] == 0:
                if self._on_read is not None:
                    self._on_read(self._outs[self._next])
                self._next += 1

    def _pieces(self, offset: int, view: memoryview) -> Iterator[tuple[int, int, memoryview]]:
        index = 0
        while len(view):
            while self._starts[index + 1] <= offset:
                index += 1
            take = min(len(view), self._starts[index + 1] - offset)
            yield index, offset - self._starts[index], view[:take]
            view, offset = view[take:], offset + take


def make_client(max_connections: int) -> Any:
    """A boto3 S3 client from the standard AWS configuration chain."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    custom_endpoint = bool(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    settings: dict[str, Any] = {
        "max_pool_connections": max_connections,
        "connect_timeout": 10, "read_timeout": 60,
        # dtrain checksums every byte itself (CRC-32C in the manifest, checked on every read), so
        # botocore's own body checksums, computed in Python, would only slow the upload down.
        "request_checksum_calculation": "when_required", "response_checksum_validation": "when_required",
        # SeaweedFS, MinIO and other self-hosted endpoints serve buckets as paths, not subdomains.
        "s3": {"addressing_style": "path" if custom_endpoint else "auto"},
    }
    if not (os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE")):
        settings["retries"] = {"mode": "standard", "total_max_attempts": 8}
    region = session.region_name or "us-east-1"
    return session.client("s3", region_name=region, config=Config(**settings))


def _code(e: Exception) -> str:
    response = getattr(e, "response", {}) or {}
    code = response.get("Error", {}).get("Code")
    return str(code or response.get("ResponseMetadata", {}).get("HTTPStatusCode", "unknown"))


def _describe(e: Exception) -> str:
    response = getattr(e, "response", {}) or {}
    return response.get("Error", {}).get("Message") or type(e).__name__


def _os_error(e: Exception, where: str) -> OSError:
    """A ClientError as the OSError the Storage protocol raises: FileNotFoundError for a missing key."""
    if not hasattr(e, "response"):  # a connection or timeout error, after botocore's retries
        return OSError(f"{where}: {type(e).__name__}: {e}")
    code = _code(e)
    if code in ("NoSuchKey", "404", "NotFound"):
        return FileNotFoundError(f"{where}: no such object")
    return OSError(f"{where}: {code} ({_describe(e)})")
