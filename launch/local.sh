#!/usr/bin/env bash
# N jaxllama processes on this machine, joined through jax.distributed (gloo CPU collectives).
# Usage: launch/local.sh N [--devices-per-process M] [--port P] [--grace S] -- jaxllama train ...
# Uses the Python next to the `jaxllama` command on PATH (the project's environment).
set -euo pipefail
jll=$(command -v jaxllama || true)
if [[ -n $jll && -x $(dirname "$jll")/python ]]; then py=$(dirname "$jll")/python; else py=${PYTHON:-python3}; fi
exec "$py" -m jaxllama.launch.local "$@"
