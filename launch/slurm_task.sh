#!/usr/bin/env bash
# The per-task command of launch/slurm_gpu.sbatch: `srun launch/slurm_task.sh jaxllama train ...`.
#
# srun starts one copy per task with SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID,
# SLURM_STEP_NODELIST, ... set; `jaxllama train` hands them to jax.distributed.initialize, whose SLURM
# detection picks the coordinator (first node of the step, port derived from the job id), the process
# count and this process's id. This wrapper only adds what JAX cannot guess:
#   - one task per node driving all its GPUs: JAX_LOCAL_DEVICE_IDS=0..N-1 (JAX's SLURM default is
#     one GPU per task, GPU number SLURM_LOCALID);
#   - on GPU nodes, the XLA/NCCL settings recommended for H100 clusters (see launch/README.md for
#     why each one), unless already set, or JAXLLAMA_GPU_FLAGS=0.
set -euo pipefail
: "${SLURM_PROCID:?launch/slurm_task.sh runs under srun (SLURM_PROCID is not set)}"

gpus=${SLURM_GPUS_ON_NODE:-}
if [[ -z $gpus ]] && command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
fi
gpus=${gpus:-0}
tasks_here=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%(*}}
if [[ $gpus -gt 1 && ${tasks_here:-1} == 1 && -z ${JAX_LOCAL_DEVICE_IDS:-} ]]; then
  JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
  export JAX_LOCAL_DEVICE_IDS
fi

if [[ $gpus -gt 0 && ${JAXLLAMA_GPU_FLAGS:-1} != 0 ]]; then
  h100_xla_flags=(
    --xla_gpu_enable_latency_hiding_scheduler=true
    --xla_gpu_enable_triton_gemm=false
    --xla_gpu_enable_pipelined_all_gather=true
    --xla_gpu_enable_pipelined_reduce_scatter=true
    --xla_gpu_enable_pipelined_all_reduce=true
    --xla_gpu_enable_while_loop_double_buffering=true
    --xla_gpu_all_gather_combine_threshold_bytes=134217728
    --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
    --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  )
  export XLA_FLAGS="${h100_xla_flags[*]} ${XLA_FLAGS:-}"
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
fi

exec "$@"
