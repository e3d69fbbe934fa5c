#!/usr/bin/env bash
# Run `jaxllama train` on every worker of a Cloud TPU VM pod slice (one process per host).
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [options] -- jaxllama train ARGS...
#
# 1. (--create) requests the slice as a queued resource and waits until it is ACTIVE;
# 2. installs this checkout on every worker (git archive -> scp --worker=all -> pip install -e, with
#    jax[tpu]); --no-install skips it (a rerun on the same VMs);
# 3. starts the same command on every worker, one `gcloud compute tpus tpu-vm ssh --worker=i` each,
#    so each worker's output lands in its own log (--logs DIR, default tpu-logs/NAME-<time>/worker-i.log)
#    and its exit code is known. Each gets JAX_COORDINATOR_ADDRESS (worker 0's internal IP),
#    JAX_NUM_PROCESSES and JAX_PROCESS_ID (= its worker number), so `jaxllama train` starts
#    jax.distributed (and with it the preemption sync that makes SIGTERM checkpoints agree);
# 4. if one worker fails, sends SIGTERM to the command on every worker (`ssh --worker=all`): the
#    others save a checkpoint and exit. Ctrl-C does the same. The script exits with the first failure.
#
# Resume after preemption or maintenance: run the same command again (same run_dir, which should be
# on gs://); `jaxllama train` resumes from the latest complete checkpoint there.
#
# Options:
#   --tpu NAME            TPU VM (node) name                                   (required)
#   --zone ZONE           e.g. us-east5-a                                      (required)
#   --project PROJECT     default: gcloud's configured project
#   --workers N           hosts in the slice; default: from --accelerator-type, else asked of gcloud
#   --accelerator-type T  e.g. v5p-64, v4-32, v5litepod-16, v6e-32 (needed with --create)
#   --create              create the slice as a queued resource first (with --runtime-version)
#   --queued-resource QR  queued-resource name for --create                     [NAME-qr]
#   --runtime-version V   TPU software version for --create, e.g. v2-alpha-tpuv5
#   --spot                request Spot capacity (preemptible) with --create
#   --no-install          do not copy and install the checkout on the workers
#   --env KEY=VALUE       environment for the command on every worker (repeatable)
#   --libtpu-args ARGS    LIBTPU_INIT_ARGS for the workers (XLA TPU flags)
#   --logs DIR            where the workers' logs go
#   --dry-run             print every command instead of running it
set -euo pipefail

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

tpu="" zone="" project="" workers="" accel="" create=0 qr="" runtime="" spot=0 install=1 dry=0 logs="" libtpu=""
envs=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --tpu) tpu=${2:?}; shift 2 ;;
    --zone) zone=${2:?}; shift 2 ;;
    --project) project=${2:?}; shift 2 ;;
    --workers) workers=${2:?}; shift 2 ;;
    --accelerator-type) accel=${2:?}; shift 2 ;;
    --create) create=1; shift ;;
    --queued-resource) qr=${2:?}; shift 2 ;;
    --runtime-version) runtime=${2:?}; shift 2 ;;
    --spot) spot=1; shift ;;
    --no-install) install=0; shift ;;
    --env) [[ ${2:-} == *=* ]] || die "--env: expected KEY=VALUE, got '${2:-}'"; envs+=("$2"); shift 2 ;;
    --libtpu-args) libtpu=${2:?}; shift 2 ;;
    --logs) logs=${2:?}; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the command goes after --: ... -- jaxllama train ARGS)" ;;
  esac
done
[[ $# -gt 0 ]] || die "no command: add -- jaxllama train ARGS..."
[[ -n $tpu ]] || die "--tpu NAME is required"
[[ -n $zone ]] || die "--zone ZONE is required"
if (( create )); then
  [[ -n $accel ]] || die "--create needs --accelerator-type (e.g. v5p-64)"
  [[ -n $runtime ]] || die "--create needs --runtime-version (e.g. v2-alpha-tpuv5 for v5p)"
fi
qr=${qr:-$tpu-qr}

# Hosts in a slice: v2-v5p names count TensorCores (8 per host); v5e/v6e names count chips (4 per
# host, or one 8-chip host).
hosts_for_type() {
  local t=$1 n=${1##*-}
  [[ $n =~ ^[0-9]+$ ]] || return 1
  case $t in
    v2-*|v3-*|v4-*|v5p-*) echo $(( n >= 8 ? n / 8 : 1 )) ;;
    v5litepod-*|v5e-*|v6e-*) echo $(( n <= 8 ? 1 : n / 4 )) ;;
    *) return 1 ;;
  esac
}

where=(--zone "$zone")
[[ -n $project ]] && where+=(--project "$project")

say() { echo "tpu_pod.sh: $*" >&2; }
# Print a command the way a person would type it (single quotes only where needed).
quote() { if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi; }
show() { local a line="+"; for a in "$@"; do line+=" $(quote "$a")"; done; echo "$line"; }
run() { if (( dry )); then show "$@"; else "$@"; fi; }

# 1. the slice
if (( create )); then
  req=(gcloud compute tpus queued-resources create "$qr" --node-id "$tpu" --accelerator-type "$accel"
       --runtime-version "$runtime" "${where[@]}")
  (( spot )) && req+=(--spot)
  run "${req[@]}"
  state_cmd=(gcloud compute tpus queued-resources describe "$qr" "${where[@]}" --format='value(state.state)')
  if (( dry )); then
    show "${state_cmd[@]}"; echo "# (repeated every 30s until it prints ACTIVE)"
  else
    while state=$("${state_cmd[@]}"); [[ $state != ACTIVE ]]; do
      case $state in FAILED|SUSPENDED) say "queued resource $qr is $state"; exit 1 ;; esac
      say "queued resource $qr: ${state:-pending}; waiting"; sleep 30
    done
  fi
fi

if [[ -z $workers && -n $accel ]]; then
  workers=$(hosts_for_type "$accel") || die "--accelerator-type '$accel': unknown; give --workers N"
fi
if [[ -z $workers ]]; then
  count_cmd=(gcloud compute tpus tpu-vm describe "$tpu" "${where[@]}" --format='value(networkEndpoints.len())')
  (( dry )) && die "--dry-run needs --workers N or --accelerator-type to know the number of hosts"
  workers=$("${count_cmd[@]}") || { say "cannot describe TPU $tpu"; exit 1; }
fi
[[ $workers =~ ^[1-9][0-9]*$ ]] || die "--workers: expected a positive integer, got '$workers'"

# 2. install the checkout on every worker
if (( install )); then
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  tarball=${TMPDIR:-/tmp}/jaxllama-src-$$.tar.gz
  jax_range=$(grep -o '"jax[><=,.0-9]*"' "$repo/pyproject.toml" | head -1 | tr -d '"' | sed 's/^jax/jax[tpu]/')
  run git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
  run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:jaxllama-src.tar.gz" --worker=all "${where[@]}"
  run gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${where[@]}" --command \
    "set -e; rm -rf ~/jaxllama; mkdir -p ~/jaxllama; tar xzf ~/jaxllama-src.tar.gz -C ~/jaxllama; python3 -m pip install -q -e ~/jaxllama '${jax_range:-jax[tpu]}'"
  (( dry )) || rm -f "$tarball"
fi

# 3. the same command on every worker, each with its own log and its process id
ip_cmd=(gcloud compute tpus tpu-vm describe "$tpu" "${where[@]}" --format='value(networkEndpoints[0].ipAddress)')
if (( dry )); then
  coordinator_ip=WORKER0_IP
else
  coordinator_ip=$("${ip_cmd[@]}") && [[ -n $coordinator_ip ]] || { say "cannot find worker 0's IP of $tpu"; exit 1; }
fi
coordinator=$coordinator_ip:${JAXLLAMA_COORDINATOR_PORT:-8476}
remote_env=("PATH=\$HOME/.local/bin:\$PATH" "JAX_COORDINATOR_ADDRESS=$coordinator" "JAX_NUM_PROCESSES=$workers")
[[ -n $libtpu ]] && remote_env+=("LIBTPU_INIT_ARGS=$(printf '%q' "$libtpu")")
for e in "${envs[@]}"; do remote_env+=("${e%%=*}=$(printf '%q' "${e#*=}")"); done
user_cmd=$(printf ' %q' "$@")
remote_for() {  # the command line worker $1 runs
  echo "cd ~/jaxllama && echo \$\$ > ~/.jaxllama-train.pid && exec env ${remote_env[*]} JAX_PROCESS_ID=$1$user_cmd"
}
stop_remote='kill -TERM $(cat ~/.jaxllama-train.pid 2>/dev/null) 2>/dev/null || true'
logs=${logs:-tpu-logs/$tpu-$(date +%Y%m%d-%H%M%S)}

if (( dry )); then
  echo "# WORKER0_IP below: the output of $(show "${ip_cmd[@]}" | cut -c3-)"
  echo "# logs: $logs/worker-<i>.log"
  for ((i = 0; i < workers; i++)); do
    show gcloud compute tpus tpu-vm ssh "$tpu" --worker=$i "${where[@]}" --command "$(remote_for $i)"
  done
  echo "# if a worker fails:"
  show gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${where[@]}" --command "$stop_remote"
  exit 0
fi

mkdir -p "$logs"
pids=()
for ((i = 0; i < workers; i++)); do
  gcloud compute tpus tpu-vm ssh "$tpu" --worker=$i "${where[@]}" --command "$(remote_for $i)" > "$logs/worker-$i.log" 2>&1 &
  pids+=($!)
done
say "started on $workers worker(s); logs in $logs/worker-<i>.log (worker 0: tail -f $logs/worker-0.log)"

stopped=0
stop_all() {
  (( stopped )) && return 0
  stopped=1
  say "stopping the command on all workers (SIGTERM: they checkpoint and exit)"
  gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${where[@]}" --command "$stop_remote" >&2 || true
}
trap 'stop_all' INT TERM

# 4. the first failure stops everyone
first_rc=0 left=$workers
while (( left > 0 )); do
  set +e; wait -n -p done_pid "${pids[@]}"; rc=$?; set -e
  [[ -z ${done_pid:-} ]] && continue  # interrupted by a trapped signal
  left=$((left - 1))
  for ((i = 0; i < workers; i++)); do [[ ${pids[i]} == "$done_pid" ]] && w=$i; done
  if (( rc != 0 && first_rc == 0 )); then
    first_rc=$rc
    say "worker $w failed (exit $rc); last lines of $logs/worker-$w.log:"
    tail -n 5 "$logs/worker-$w.log" >&2 || true
    stop_all
  fi
  done_pid=""
done
if (( first_rc == 0 )); then say "all $workers workers finished; logs in $logs"; fi
exit "$first_rc"
