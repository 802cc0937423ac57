#!/usr/bin/env bash
# Start one torchrun agent on this node for `dtrain train`; restarting it resumes the run.
#
#   # one node, two processes:
#   NPROC_PER_NODE=2 RUN_DIR=runs/demo launch/torchrun.sh
#   # the same job on 4 nodes (run on every node; the endpoint is any one of them):
#   NNODES=4 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29400 RDZV_ID=job42 RUN_DIR=/shared/runs/demo \
#     launch/torchrun.sh --set train.steps=20000
#   # elastic: start with 2 to 4 nodes, carry on while at least 2 remain
#   NNODES=2:4 ...
#
# Arguments are passed on to `dtrain train` (typically `--set section.key=value`).
#
# Environment (defaults in brackets; NNODES, NPROC_PER_NODE, RDZV_ENDPOINT, RDZV_ID and MAX_RESTARTS
# fall back to torchrun's PET_* variables, which the Kubeflow training operator sets):
#   CONFIG            TOML config                                  [examples/demo.toml]
#   RUN_DIR           run dir; shared storage when NNODES > 1      [runs/demo]
#   NNODES            nodes, or MIN:MAX for an elastic job         [1]
#   NPROC_PER_NODE    workers per node: a number, gpu, cpu, auto   [1]
#   RDZV_ENDPOINT     host:port of the c10d rendezvous             [localhost:0 on one node; required otherwise]
#   RDZV_ID           job id, the same on every node               [dtrain; a fresh one on one node]
#   MAX_RESTARTS      worker-group restarts after a failure        [3]
#   MONITOR_INTERVAL  seconds between worker health checks         [1]
#   JOIN_TIMEOUT      seconds to wait for NNODES agents to join    [600]
#   LAST_CALL_TIMEOUT seconds to wait for late nodes past MIN      [30]
#   SHUTDOWN_TIMEOUT  seconds workers get to save after a signal, then SIGKILL  [60]
#   LOCAL_ADDR        this node's address for the workers' store   [127.0.0.1 on one node; looked up otherwise]
#   LOG_DIR           per-rank stdout/stderr files                 [RUN_DIR/logs/HOSTNAME]
#   TORCHRUN          the torchrun command                         [torchrun]
#   PYTHON            the Python that has dtrain, for the preflight [python3]
#   PREFLIGHT         1: `dtrain train --check` before torchrun; 0: skip it  [1]
#   PASS_SIGNALS      1: pass signals on to torchrun; 0: the sender signals torchrun itself
#                     [0 inside a SLURM job step, which signals every process of the step; else 1]
#
# Preflight: before torchrun starts, `dtrain train --check` checks the config, the task's entry
# points (for the largest world size NNODES x NPROC_PER_NODE allows) and the run dir. A bad one
# exits 2 here at once: in the workers it would exit 2 in each, torchrun would restart them
# MAX_RESTARTS times and then exit 1, which a scheduler cannot tell from a crash.
#
# Signals: SIGTERM, SIGINT, SIGHUP and SIGUSR1 go to torchrun, which passes them to the workers;
# they agree on a step, commit an emergency snapshot and exit. torchrun then exits 1 whatever
# the workers did, so this script decides the exit code itself (docs/launchers.md):
#   0 done, 75 preempted (a snapshot was committed after the signal: requeue to resume),
#   2 bad config, run dir or launcher settings (nothing started), anything else: torchrun's code.
set -uo pipefail

readonly EXIT_USAGE=2 EXIT_PREEMPTED=75

CONFIG=${CONFIG:-examples/demo.toml}
RUN_DIR=${RUN_DIR:-runs/demo}
NNODES=${NNODES:-${PET_NNODES:-1}}
NPROC_PER_NODE=${NPROC_PER_NODE:-${PET_NPROC_PER_NODE:-1}}
MAX_RESTARTS=${MAX_RESTARTS:-${PET_MAX_RESTARTS:-3}}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-${PET_RDZV_ENDPOINT:-}}
RDZV_ID=${RDZV_ID:-${PET_RDZV_ID:-}}
MONITOR_INTERVAL=${MONITOR_INTERVAL:-1}
JOIN_TIMEOUT=${JOIN_TIMEOUT:-600}
LAST_CALL_TIMEOUT=${LAST_CALL_TIMEOUT:-30}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-60}
LOG_DIR=${LOG_DIR:-$RUN_DIR/logs/$HOSTNAME}
TORCHRUN=${TORCHRUN:-torchrun}
PYTHON=${PYTHON:-python3}
PREFLIGHT=${PREFLIGHT:-1}
if [[ -n ${SLURM_STEP_ID:-} ]]; then PASS_SIGNALS=${PASS_SIGNALS:-0}; else PASS_SIGNALS=${PASS_SIGNALS:-1}; fi

log() { echo "torchrun.sh [$HOSTNAME] $(date +%T): $*" >&2; }

# Name of the newest committed snapshot (step dirs are zero-padded: the last in glob order).
newest_snapshot() {
  local dirs=("$RUN_DIR"/snapshots/step_*)
  [[ -e ${dirs[-1]} ]] && basename "${dirs[-1]}"
}

if [[ $NNODES == 1 || $NNODES == 1:1 ]]; then
  RDZV_ENDPOINT=${RDZV_ENDPOINT:-localhost:0}
  RDZV_ID=${RDZV_ID:-dtrain-$$-$(date +%s)}
  # Everything is on this host: no dependence on the hostname resolving (docker --network none).
  LOCAL_ADDR=${LOCAL_ADDR:-127.0.0.1}
elif [[ -z $RDZV_ENDPOINT ]]; then
  log "NNODES=$NNODES needs RDZV_ENDPOINT=host:port (a node every agent can reach); set it and retry"
  exit "$EXIT_USAGE"
else
  RDZV_ID=${RDZV_ID:-dtrain}
fi

agent="" caught="" snapshot_at_signal=""
# shellcheck disable=SC2317,SC2329  # only called from the traps below
forward() {
  local sig=$1
  if [[ -n $caught ]]; then
    log "SIG$sig again: already passed SIG$caught on, waiting for the workers"
    return
  fi
  caught=$sig
  snapshot_at_signal=$(newest_snapshot)
  if [[ -z $agent ]]; then
    log "SIG$sig before torchrun started: nothing to save"
    exit "$EXIT_PREEMPTED"
  fi
  if [[ $PASS_SIGNALS == 1 ]]; then
    log "SIG$sig: passing it to torchrun (pid $agent); workers save and exit within ${SHUTDOWN_TIMEOUT}s"
    kill -s "$sig" "$agent" 2>/dev/null
  else
    log "SIG$sig: torchrun got it too; workers save and exit within ${SHUTDOWN_TIMEOUT}s"
  fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP
trap 'forward USR1' USR1

# The largest world size the job can reach: global_batch_size must cover it (1 when unknown).
world_size() {
  local nodes=${NNODES#*:}
  if [[ $nodes =~ ^[0-9]+$ && $NPROC_PER_NODE =~ ^[0-9]+$ ]]; then
    echo $((nodes * NPROC_PER_NODE))
  else
    echo 1
  fi
}

if [[ $PREFLIGHT == 1 ]]; then
  WORLD_SIZE=$(world_size) $PYTHON -m dtrain train --check --config "$CONFIG" --run-dir "$RUN_DIR" "$@"
  rc=$?
  if (( rc == EXIT_USAGE )); then
    log "the preflight refused the config or the run dir (above): torchrun not started; fix it and retry"
    exit "$EXIT_USAGE"
  elif (( rc != 0 )); then
    log "the preflight ($PYTHON -m dtrain train --check) exited $rc; set PYTHON to the Python that has dtrain"
    exit "$rc"
  fi
fi
mkdir -p "$LOG_DIR" || exit "$EXIT_USAGE"

log "run dir $RUN_DIR, nodes $NNODES x $NPROC_PER_NODE, rendezvous $RDZV_ENDPOINT id $RDZV_ID," \
    "newest snapshot: $(newest_snapshot || echo none)"
# torch 2.13: agents that share the rendezvous store deadlock in the round after a membership
# change (a new agent waits for MASTER_ADDR the old rank-0 agent never republishes).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# SIGUSR1 must be in --signals-to-handle: its default action would kill torchrun on the spot.
$TORCHRUN \
  ${LOCAL_ADDR:+--local-addr "$LOCAL_ADDR"} \
  --nnodes "$NNODES" \
  --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$RDZV_ENDPOINT" \
  --rdzv-id "$RDZV_ID" \
  --rdzv-conf "join_timeout=$JOIN_TIMEOUT,last_call_timeout=$LAST_CALL_TIMEOUT,close_timeout=60" \
  --max-restarts "$MAX_RESTARTS" \
  --monitor-interval "$MONITOR_INTERVAL" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
  --shutdown-timeout "$SHUTDOWN_TIMEOUT" \
  --log-dir "$LOG_DIR" --redirects 3 --tee 3 \
  -m dtrain train --config "$CONFIG" --run-dir "$RUN_DIR" "$@" &
agent=$!

# `wait` returns early (128 + signal) when a trapped signal arrives: wait until torchrun is gone,
# then once more for its own exit status, which bash keeps.
while kill -0 "$agent" 2>/dev/null; do
  wait "$agent"
done
rc=0
wait "$agent" || rc=$?

if (( rc != 0 )) && [[ -n $caught ]]; then
  after=$(newest_snapshot)
  if [[ -n $after && $after > $snapshot_at_signal ]]; then
    log "preempted by SIG$caught: snapshot $after committed; run the same command again to resume"
    exit "$EXIT_PREEMPTED"
  fi
  log "SIG$caught arrived but no snapshot was committed after it (newest: ${after:-none})"
fi
log "torchrun exited $rc"
exit "$rc"
