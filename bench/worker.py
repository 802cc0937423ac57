"""One rank of a bench launch: join the process group, build the state, run the cases in order.

Each rank appends one JSON line per event to `<log_dir>/rank-<r>.jsonl` (`start`, `result`,
`error`), so the parent knows which case was running when a launch died or hung. An unexpected
error ends the process at once: the other ranks then fail in their next collective instead of
running later cases out of step.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

logger = logging.getLogger("bench")


def main(rank: int, spec: dict[str, Any]) -> None:
    """Entry point of a spawned rank; `spec` is built by `bench/launch.py`."""
    quiet_warnings()
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(spec["world_size"]),
                       "LOCAL_WORLD_SIZE": str(spec["world_size"]), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(spec["port"])})
    logging.basicConfig(level=logging.WARNING, format=f"[bench rank {rank} %(relativeCreated)6.0f ms] %(message)s")
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)  # INFO from rank 0 only
    log = EventLog(Path(spec["log_dir"]) / f"rank-{rank}.jsonl")
    try:
        _run(rank, spec, log)
    except Exception:
        log.write({"event": "error", "error": traceback.format_exc(limit=6)})
        os._exit(1)


def _run(rank: int, spec: dict[str, Any], log: EventLog) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from bench.measure import Pristine
    from bench.state import build_state

    import_libraries()
    torch.set_num_threads(spec["threads"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=spec["collective_timeout_s"]))
    start = time.perf_counter()
    state = build_state(spec["state_bytes"], rank, spec["world_size"])
    pristine = Pristine(state)
    log.write({"event": "state", "nbytes": state.nbytes, "width": state.width,
               "build_s": time.perf_counter() - start})
    logger.info("state built: %.3f GiB per rank, width %d, %.1f s", state.nbytes / (1 << 30), state.width,
                time.perf_counter() - start)
    done: dict[str, dict[str, Any]] = {}
    for case in spec["cases"]:
        log.write({"event": "start", "case": case})
        result = done[case] = _run_case(case, state, pristine, spec, done)
        log.write({"event": "result", "case": case, **result})
    dist.barrier()
    dist.destroy_process_group()


def _run_case(case: str, state: Any, pristine: Any, spec: dict[str, Any],
              done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from bench.measure import measure_method, measure_reshard
    from bench.methods import METHODS

    kind, _, name = case.partition(":")
    case_dir = Path(spec["case_dir"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_warnings()
        try:
            if kind == "save":
                logger.info("%s: %d repetitions", name, spec["reps"])
                result = measure_method(METHODS[name], state, case_dir, spec["reps"],
                                        spec["cache_mode"], pristine)
            elif kind == "reshard":
                logger.info("dtrain restore at another world size: %d repetitions each way", spec["reps"])
                result = measure_reshard(state, case_dir, spec["reps"], spec["cache_mode"], pristine)
            else:
                result = _run_training(state, case_dir, spec, done.get("save:dtrain"))
            result["status"] = "ok"
        except NotImplementedError as e:
            result = {"status": "skipped", "note": str(e)}
    result["warnings"] = sorted({one_line(w.message) for w in caught} - {""})
    logger.info("%s: %s", case, result["status"])
    return result


def _run_training(state: Any, case_dir: Path, spec: dict[str, Any],
                  dtrain_save: dict[str, Any] | None) -> dict[str, Any]:
    from bench.methods import METHODS
    from bench.throughput import measure_training

    logger.info("throughput of %s: %d interleaved windows each, threads per rank by scenario %s",
                ", ".join(spec["train_methods"]), spec["windows"], spec["scenario_threads"])
    methods = [METHODS.get(m) for m in spec["train_methods"]]
    settings = {k: spec[k] for k in ("every", "write_share", "intervals")}
    return measure_training(methods, state, case_dir, spec["windows"], spec["scenario_threads"], settings,
                            dtrain_save)


def import_libraries() -> None:
    """Import the baselines' libraries now, so that no first repetition pays for it."""
    for name in ("torchsnapshot", "torch.distributed.checkpoint", "torch.distributed.checkpoint.state_dict"):
        try:
            __import__(name)
        except ImportError as e:  # the method's own rows will show the error
            logger.warning("cannot import %s: %s", name, e)


def one_line(message: Warning | str) -> str:
    return str(message).strip().splitlines()[0][:200] if str(message).strip() else ""


def quiet_warnings() -> None:
    # torchsnapshot's import scripts functions through the deprecated torch.jit; not a finding
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)


class EventLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, event: dict[str, Any]) -> None:
        event["time"] = time.time()
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
