"""What a `--run-dir` names: a local directory or an `s3://BUCKET/PREFIX` run, and its storage.

    location = parse_run_dir("s3://runs/exp1")     # RunLocation(url='s3://runs/exp1', bucket='runs', ...)
    storage = location.storage()                   # S3Storage("runs", "exp1")

A path with any other scheme (`gs://`, `hdfs://`, ...) is refused: taken for a relative path, as it
once was, `s3://bucket/run` silently trained into a local directory named `s3:`. `file://` names
a local directory, as in every URL parser.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from dtrain.errors import ConfigError
from dtrain.storage.base import Storage
from dtrain.storage.local import LocalStorage

LOCAL_DIR_ENV = "DTRAIN_LOCAL_DIR"
SUPPORTED = "a local path, file:///PATH or s3://BUCKET/PREFIX"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(//)?")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class RunLocation:
    url: str
    """As the user wrote it (a path, or an `s3://` URL)."""
    local: Path | None = None
    bucket: str = ""
    prefix: str = ""

    @property
    def is_local(self) -> bool:
        return self.local is not None

    def local_dir(self) -> Path:
        """The local directory of the run's local things (the run dir lock, `metrics.jsonl`): the
        run dir itself, or for a bucket `$DTRAIN_LOCAL_DIR/BUCKET/PREFIX` (default `./dtrain-local/...`)
        on the machine of rank 0."""
        if self.local is not None:
            return self.local
        return Path(os.environ.get(LOCAL_DIR_ENV) or "dtrain-local", self.bucket, *self.prefix.split("/"))

    def storage(self) -> Storage:
        if self.local is not None:
            return LocalStorage(self.local)
        from dtrain.storage.s3 import S3Storage

        return S3Storage(self.bucket, self.prefix)

    def child(self, *parts: str) -> RunLocation:
        """The location of a path below this one (`snapshots/step_N` of a run)."""
        if self.local is not None:
            return RunLocation(str(self.local.joinpath(*parts)), self.local.joinpath(*parts))
        prefix = "/".join(p for p in [self.prefix, *parts] if p)
        return RunLocation(f"s3://{self.bucket}/{prefix}", bucket=self.bucket, prefix=prefix)

    def parent(self, levels: int = 1) -> RunLocation:
        if self.local is not None:
            up = self.local
            for _ in range(levels):
                up = up.parent
            return RunLocation(str(up), up)
        prefix = "/".join(self.prefix.split("/")[:-levels])
        return RunLocation(f"s3://{self.bucket}/{prefix}".rstrip("/"), bucket=self.bucket, prefix=prefix)

    @property
    def name(self) -> str:
        return self.local.name if self.local is not None else self.prefix.rsplit("/", 1)[-1]


def parse_run_dir(text: str, what: str = "--run-dir") -> RunLocation:
    """The run dir `text` names; `ConfigError` (exit 2) for a scheme dtrain does not support."""
    found = _SCHEME.match(text)
    if found is None or (len(found[1]) == 1 and not found[2]):  # a plain path (or a Windows drive letter)
        return RunLocation(text, Path(text))
    scheme = found[1].lower()
    rest = text[found.end():]
    if scheme == "file" and found[2]:
        if not rest.startswith("/"):
            raise ConfigError(f"{what} {text}: a file:// URL needs an absolute path (file:///PATH); "
                              "or pass the path itself")
        return RunLocation(rest, Path(rest))
    if scheme == "s3" and found[2]:
        return _s3(text, rest, what)
    raise ConfigError(f"{what} {text}: the scheme {scheme}: is not supported; pass {SUPPORTED}")


def _s3(text: str, rest: str, what: str) -> RunLocation:
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET.match(bucket):
        raise ConfigError(f"{what} {text}: {bucket!r} is not an S3 bucket name (3-63 lowercase letters, digits, "
                          "dots and hyphens); pass s3://BUCKET/PREFIX")
    if not prefix or any(p in ("", ".", "..") for p in prefix.split("/")):
        raise ConfigError(f"{what} {text}: name the run's prefix inside the bucket, without empty, '.' or '..' "
                          "parts (s3://BUCKET/PREFIX, e.g. s3://runs/exp1): a run owns everything below it")
    return RunLocation(f"s3://{bucket}/{prefix}", bucket=bucket, prefix=prefix)
