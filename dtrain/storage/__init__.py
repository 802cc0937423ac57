"""Where snapshot bytes go. `Storage` is the seam; `LocalStorage` is a POSIX filesystem, `S3Storage`
(in `dtrain.storage.s3`, imported on use: it needs boto3) an S3-compatible bucket."""

from dtrain.storage.base import CommitConflictError, Storage, WriteHandle
from dtrain.storage.local import LocalStorage
from dtrain.storage.location import RunLocation, parse_run_dir

__all__ = ["CommitConflictError", "LocalStorage", "RunLocation", "Storage", "WriteHandle", "parse_run_dir"]
