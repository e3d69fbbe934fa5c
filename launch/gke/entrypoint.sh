#!/usr/bin/env bash
# Container entrypoint for the GKE JobSets: run the command, and turn "stopped for preemption" into a
# failure (exit 143), so JobSet's failurePolicy restarts the set and the run resumes from its run_dir
# instead of the Job counting as complete. `jaxllama train` exits 0 after its SIGTERM checkpoint.
set -uo pipefail
log=$(mktemp)
trap 'rm -f "$log"' EXIT
trap 'kill -TERM "$child" 2>/dev/null' TERM
# The command writes to the log; tail shows it in the pod log and exits after the command, having
# printed everything. SIGTERM (sent by the kubelet to PID 1 only) is forwarded to the command.
"$@" > "$log" 2>&1 &
child=$!
tail -n +1 -f --pid="$child" "$log" &
follower=$!
wait "$child"; rc=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done  # a trapped SIGTERM interrupted wait
wait "$follower"
if [[ $rc == 0 ]] && grep -q "preempted (SIGTERM)" "$log"; then
  echo "entrypoint: stopped for preemption after a checkpoint; exiting 143 so the JobSet restarts" >&2
  exit 143
fi
exit "$rc"
