"""dtrain's save and restore in a bucket, against the floor of the same bytes moved by the same client.

    .venv/bin/python -m bench.s3 --state-mb 512 --reps 3     # SeaweedFS on 127.0.0.1, started here

One process (world size 1) holds an MLP's parameters and Adam state (`bench.state`). Per repetition:

    dtrain save     SnapshotWriter.save(...).wait() into s3://bench/dtrain-N: stage, upload every file
                    (multipart, 8 parts in flight), CRC-32C on the way, the conditional manifest PUT
    floor upload    the same bytes as the same number of objects of the same sizes, each uploaded by
                    boto3's own transfer manager (`upload_fileobj`, 16 MiB parts, 8 threads), no checksum
    dtrain restore  reader.restore(..., into=live): parallel ranged GETs straight into the tensors, CRC-32C checked
    floor download  the same objects by `download_fileobj` (16 MiB parts, 8 threads) into memory

    dcp save        torch.distributed.checkpoint.save of the same state through AWS's `s3torchconnector`
                    (`S3StorageWriter`, 8 threads, path-style addressing for the local endpoint)
    dcp load        torch.distributed.checkpoint.load of it back into the live state (`S3StorageReader`)

Medians over the repetitions go to stdout and `--out` (bench/s3_results.json). DCP's other S3 path,
fsspec's `s3fs`, cannot be installed beside boto3 here: its `aiobotocore` pins botocore to another
range than boto3's.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dtrain.dist import solo_context  # noqa: E402
from dtrain.snapshot import reader  # noqa: E402
from dtrain.snapshot.writer import SnapshotWriter  # noqa: E402
from dtrain.storage.s3 import CONCURRENCY, PART_BYTES, S3Storage  # noqa: E402
from support.seaweed import SeaweedServer  # noqa: E402

BUCKET = "bench"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from bench.state import build_state

    state = build_state(int(args.state_mb * (1 << 20)), rank=0, world_size=1)
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-s3-") as tmp, SeaweedServer(Path(tmp) / "weed") as server:
        server.create_bucket(BUCKET)
        os.environ.update(server.env())
        S3Storage(BUCKET, "warm-up").write_atomic("first", b"a fresh server allocates its volumes on the first write")
        rows = [repetition(state, rep) for rep in range(args.reps)]
    results = {"state_mb": args.state_mb, "reps": args.reps, "part_mb": PART_BYTES >> 20, "concurrency": CONCURRENCY,
               "rows": rows, "median": {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "bytes"},
               "bytes": rows[0]["bytes"]}
    print(render(results))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.s3", description=__doc__.split("\n\n")[0])
    p.add_argument("--state-mb", type=float, default=512, help="parameters + Adam state, in MiB (default 512)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "bench" / "s3_results.json"))
    return p.parse_args(argv)


def repetition(state: Any, rep: int) -> dict[str, float]:
    storage = S3Storage(BUCKET, f"dtrain-{rep}")
    assert storage.client is not None  # made before the clock starts, as the floor's is
    live = {"model": state.module.state_dict(), "optimizer": state.optimizer.state_dict()}
    started = time.perf_counter()
    SnapshotWriter(storage, solo_context()).save(1, live, {}).wait()
    save = time.perf_counter() - started
    manifest = reader.read_manifest(storage, 1)
    started = time.perf_counter()
    reader.restore(storage, 1, into=live)
    restore = time.perf_counter() - started
    sizes = [f.bytes for f in manifest.files.values()]
    upload, download = floor(storage, sizes, rep)
    dcp_save, dcp_load = dcp_round_trip(live, rep)
    return {"bytes": sum(sizes), "dtrain_save": save, "floor_upload": upload,
            "dtrain_restore": restore, "floor_download": download, "dcp_save": dcp_save, "dcp_load": dcp_load}


def dcp_round_trip(live: dict[str, Any], rep: int) -> tuple[float, float]:
    """Seconds for DCP to save `live` into the bucket through s3torchconnector, then load it back."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from s3torchconnector import S3ClientConfig
    from s3torchconnector.dcp import S3StorageReader, S3StorageWriter

    config, region, path = S3ClientConfig(force_path_style=True), os.environ["AWS_REGION"], f"s3://{BUCKET}/dcp-{rep}"
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process, as intended
        warnings.simplefilter("ignore", UserWarning)
        started = time.perf_counter()
        dcp.save(live, storage_writer=S3StorageWriter(region, path, s3client_config=config, thread_count=CONCURRENCY))
        save = time.perf_counter() - started
        started = time.perf_counter()
        dcp.load(live, storage_reader=S3StorageReader(region, path, s3client_config=config))
    return save, time.perf_counter() - started


def floor(storage: S3Storage, sizes: list[int], rep: int) -> tuple[float, float]:
    """Seconds to upload, then download, objects of `sizes` with boto3's transfer manager alone."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES,
                            max_concurrency=CONCURRENCY, use_threads=True)
    blobs = [os.urandom(min(n, 1 << 20)) * (n // (1 << 20) + 1) for n in sizes]
    started = time.perf_counter()
    for i, (blob, n) in enumerate(zip(blobs, sizes, strict=True)):
        storage.client.upload_fileobj(io.BytesIO(memoryview(blob)[:n]), BUCKET, f"floor-{rep}/{i}", Config=config)
    upload = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(len(sizes)):
        storage.client.download_fileobj(BUCKET, f"floor-{rep}/{i}", io.BytesIO(), Config=config)
    return upload, time.perf_counter() - started


def render(results: dict[str, Any]) -> str:
    m = results["median"]
    mb = results["bytes"] / 1e6
    lines = [f"S3 (SeaweedFS on 127.0.0.1): {mb:.0f} MB snapshot, one process, medians of {results['reps']} "
             f"({results['part_mb']} MiB parts, {results['concurrency']} in flight)",
             f"{'':<16} {'seconds':>8} {'MB/s':>7} {'x floor':>8}"]
    for ours, base in (("dtrain_save", "floor_upload"), ("dtrain_restore", "floor_download")):
        for key in (ours, base):
            ratio = f"{m[key] / m[base]:.2f}" if key == ours else ""
            lines.append(f"{key.replace('_', ' '):<16} {m[key]:>8.2f} {mb / m[key]:>7.0f} {ratio:>8}")
    for ours, theirs in (("dtrain_save", "dcp_save"), ("dtrain_restore", "dcp_load")):
        lines.append(f"{ours.replace('_', ' ')} / {theirs.replace('_', ' ')}: {m[ours] / m[theirs]:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
