"""GKE JobSet manifests under launch/gke/: rendered, parsed, and checked for what JAX needs to start."""

import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jaxllama.config import load_config
from jaxllama.program import build_program
from jaxllama.parallel import distributed

ROOT = Path(__file__).resolve().parents[1]
GKE = ROOT / "launch/gke"


def render(name: str, *pairs: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GKE / "render.py"), str(GKE / name), *pairs], capture_output=True,
                          text=True, timeout=60)


def pod_of(doc: dict, job: int = 0) -> tuple[dict, dict, dict]:
    rjob = doc["spec"]["replicatedJobs"][job]
    spec = rjob["template"]["spec"]
    return rjob, spec, spec["template"]["spec"]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def pod_dns(doc: dict, rjob: dict, job_index: int = 0, pod_index: int = 0) -> str:
    """JobSet's pod hostname: <jobset>-<replicated job>-<job index>-<pod index>.<jobset (subdomain)>."""
    name = doc["metadata"]["name"]
    return f"{name}-{rjob['name']}-{job_index}-{pod_index}.{name}"


def jaxllama_args(container: dict) -> list[str]:
    cmd = container["command"]
    assert cmd[:3] == ["launch/gke/entrypoint.sh", "bash", "-c"]
    words = shlex.split(cmd[3])
    assert words[:2] == ["jaxllama", "train"]
    return words[2:]


def config_from(args: list[str]):
    config = args[args.index("--config") + 1]
    overrides = [a for a in args if "=" in a and not a.startswith("run_dir=")]
    return load_config(ROOT / config, overrides)


def test_tpu_multislice_has_the_megascale_and_slice_fields():
    p = render("tpu-multislice.yaml", "NAME=l3", "SLICES=2", "TPU_TOPOLOGY=2x4x4", "CHIPS_PER_HOST=4",
               "IMAGE=gcr.io/p/jaxllama:tpu")
    assert p.returncode == 0, p.stderr
    doc = yaml.safe_load(p.stdout)
    assert doc["apiVersion"].startswith("jobset.x-k8s.io/") and doc["kind"] == "JobSet"
    rjob, job, pod = pod_of(doc)
    assert rjob["replicas"] == 2
    # 2x4x4 = 32 chips at 4 per host: 8 pods per slice, indexed (TPU_WORKER_ID comes from the index).
    assert job["parallelism"] == job["completions"] == 8 and job["completionMode"] == "Indexed"
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x4x4"
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"].startswith("tpu-")
    (container,) = pod["containers"]
    assert container["image"] == "gcr.io/p/jaxllama:tpu"
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    env = env_of(container)
    assert env["MEGASCALE_COORDINATOR_ADDRESS"] == pod_dns(doc, rjob)
    assert env["MEGASCALE_NUM_SLICES"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['jobset.sigs.k8s.io/replicatedjob-replicas']"
    assert env["MEGASCALE_SLICE_ID"]["fieldRef"]["fieldPath"] == "metadata.annotations['jobset.sigs.k8s.io/job-index']"
    assert str(env["MEGASCALE_PORT"]) in {str(port["containerPort"]) for port in container["ports"]}
    assert doc["spec"]["failurePolicy"]["maxRestarts"] > 0 and pod["terminationGracePeriodSeconds"] >= 60
    # The shipped command's mesh spans the slices: it validates for 2 slices x 32 chips.
    cfg = config_from(jaxllama_args(container))
    assert cfg.mesh.dcn_data * cfg.mesh.dcn_fsdp * cfg.mesh.dcn_tensor == 2
    build_program(cfg, 2 * 32)  # an abstract mesh of 64 devices: sizes and shard shapes validate


def test_gpu_multinode_has_coordinator_process_count_and_id():
    p = render("gpu-multinode.yaml", "NAME=g", "NODES=2", "GPUS_PER_NODE=8", "PORT=4321",
               "COMMAND=jaxllama train --config configs/llama3-8b.yaml mesh.fsdp=-1 \"data.name=a b\"")
    assert p.returncode == 0, p.stderr
    doc = yaml.safe_load(p.stdout)
    rjob, job, pod = pod_of(doc)
    assert rjob["replicas"] == 1 and job["parallelism"] == job["completions"] == 2
    assert job["completionMode"] == "Indexed"
    (container,) = pod["containers"]
    env = env_of(container)
    # The names jaxllama's start-up reads (jaxllama/parallel/distributed.py).
    address, count, pid = distributed.ENV_ADDRESS, distributed.ENV_COUNT, distributed.ENV_ID
    host, port = env[address].rsplit(":", 1)
    assert host == pod_dns(doc, rjob) and int(port) == 4321
    assert {p["containerPort"] for p in container["ports"]} == {4321}
    assert int(env[count]) == job["parallelism"]
    assert env[pid]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
    assert jaxllama_args(container)[-1] == "data.name=a b"  # the command survives quoting
    build_program(config_from(jaxllama_args(container)[:-1]), 2 * 8)


def test_gpu_xla_flags_match_the_slurm_launcher():
    doc = yaml.safe_load(render("gpu-multinode.yaml").stdout)
    env = env_of(pod_of(doc)[2]["containers"][0])
    slurm = (ROOT / "launch/slurm_task.sh").read_text()
    slurm_flags = re.search(r"h100_xla_flags=\((.*?)\)", slurm, re.S).group(1).split()
    assert env["XLA_FLAGS"].split() == slurm_flags
    for key in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_DEBUG"):
        assert f"{key}=${{{key}:-{env[key]}}}" in slurm, key


@pytest.mark.parametrize("name, pairs, word", [
    ("tpu-multislice.yaml", ["SLICEZ=2"], "unknown key SLICEZ"),
    ("tpu-multislice.yaml", ["SLICES=0"], "SLICES"),
    ("tpu-multislice.yaml", ["TPU_TOPOLOGY=4by4"], "TPU_TOPOLOGY"),
    ("tpu-multislice.yaml", ["TPU_TOPOLOGY=2x3", "CHIPS_PER_HOST=4"], "CHIPS_PER_HOST"),
    ("gpu-multinode.yaml", ["NODES"], "KEY=VALUE"),
    ("nope.yaml", [], "not found"),
])
def test_render_errors_are_one_line_and_exit_2(name, pairs, word):
    p = render(name, *pairs)
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and word in p.stderr, p.stderr


@pytest.mark.parametrize("script, code, text", [
    ("echo 'preempted (SIGTERM) at step 7: checkpoint saved'", 143, "preempted (SIGTERM) at step 7"),  # restart
    ("echo 'done: 10 steps'", 0, "done: 10 steps"),
    ("echo boom; exit 5", 5, "boom"),
])
def test_entrypoint_turns_preemption_into_a_restart(script, code, text):
    p = subprocess.run([str(GKE / "entrypoint.sh"), "bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert p.returncode == code, p.stderr
    assert text in p.stdout  # the command's output still reaches the pod log


def test_entrypoint_forwards_sigterm_to_the_command():
    """The kubelet signals PID 1 (the entrypoint) only; the training command must still get SIGTERM."""
    script = ('trap \'echo "preempted (SIGTERM) at step 3: checkpoint saved"; kill $!; exit 0\' TERM; '
              'echo started; sleep 60 & wait')
    p = subprocess.Popen([str(GKE / "entrypoint.sh"), "bash", "-c", script], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "started"
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 143 and "preempted (SIGTERM) at step 3" in out
