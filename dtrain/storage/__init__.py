"""Where snapshot bytes go. `Storage` is the seam; `LocalStorage` is a POSIX filesystem."""

from dtrain.storage.base import Storage, WriteHandle
from dtrain.storage.local import LocalStorage

__all__ = ["LocalStorage", "Storage", "WriteHandle"]
