"""Does DPO learn a preferred style? Answers that open with a one-word verdict over the same answers without it.

1. A base model: the CPU demo (`jaxllama train`, tiny preset on the stdlib corpus), --base (reused if
   present, else trained for --base-steps).
2. SFT: the base fine-tuned (all weights, --sft-steps) on the training prompts with either answer
   style at random, so it answers in both styles.
3. Preference pairs on made-up towns: "Is Marrowby north of Tordun?" -> chosen "Yes. Marrowby lies north
   of Tordun." / rejected "Marrowby lies north of Tordun." (or "No. ... does not lie ..."), four training
   phrasings; held-out pairs use other towns and two other phrasings.
4. `jaxllama train train.init_from=SFT data.format=preference train.objective=dpo train.lora.rank=R`.
5. Held-out: reward accuracy (the policy's log-ratio against the SFT model, chosen vs rejected), greedy
   `jaxllama generate RUN --chat` answers opening with "Yes." or "No.", before and after, and the
   perplexity of the chosen answers under the SFT and the DPO model.

    python benchmarks/dpo_learns.py --work /tmp/dpo-learns --base /tmp/lora-learns/base --steps 300

Prints one JSON line; benchmarks/README.md records a run.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lora_learns import jaxllama, name  # noqa: E402

TRAIN_Q = ["Is {a} {rel} {b}?", "Does {a} lie {rel} {b}?", "Tell me: is {a} {rel} {b}?", "Is the town {a} {rel} {b}?"]
HELD_Q = ["Would you say {a} is {rel} {b}?", "Is it true that {a} is {rel} {b}?"]
RELS = ["north of", "south of", "east of", "west of"]


def pairs(n: int, phrasings: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = name(rng, 3), name(rng, 3)
        rel, yes = rng.choice(RELS), rng.random() < 0.5
        q = rng.choice(phrasings).format(a=a, b=b, rel=rel)
        answer = f"{a} lies {rel} {b}." if yes else f"{a} does not lie {rel} {b}."
        out.append({"prompt": [{"role": "user", "content": q}], "chosen": f"{'Yes' if yes else 'No'}. {answer}",
                    "rejected": answer})
    return out


def style(model: str, rows: list[dict], work: Path, tag: str, log: Path) -> float:
    prompts = work / f"prompts-{tag}.txt"
    prompts.write_text("".join(r["prompt"][0]["content"] + "\n" for r in rows))
    out = work / f"answers-{tag}.jsonl"
    with open(out, "w") as f, open(log, "a") as err:
        r = subprocess.run([sys.executable, "-m", "jaxllama.cli", "generate", model, "--prompt-file", str(prompts),
                            "--chat", "--temperature", "0", "--max-new-tokens", "8", "--json"], stdout=f, stderr=err)
    if r.returncode:
        raise SystemExit(f"generate {model} failed; see {log}")
    texts = [json.loads(line)["text"].strip() for line in out.read_text().splitlines() if line.startswith("{")]
    return sum(t.startswith(("Yes.", "No.")) for t in texts) / len(texts)


def held_out(run: Path, base: str, data: Path, beta: float) -> dict:
    """Reward accuracy and chosen-answer perplexities on held-out pairs (policy = the merged DPO model)."""
    import jax
    import numpy as np

    from jaxllama.config import config_from_dict
    from jaxllama.convert.api import load_model
    from jaxllama.data.sources import make_source
    from jaxllama.model.llama import Arch, Llama
    from jaxllama.program import BatchSpec
    from jaxllama.program.preference import make_reference_logps, sequence_sums

    import yaml

    cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()),
                           [f"data.source={data}", "train.lora.rank=0", "data.global_batch=8", "mesh.fsdp=1"])
    policy, ref = load_model(str(run)).params, load_model(base).params
    arch = Arch.from_config(cfg.model)
    fn = jax.jit(make_reference_logps(Llama(arch), arch, cfg.data.seq_len, cfg.data.pairs_per_row, "separate"))
    spec = BatchSpec(8, cfg.data.seq_len, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    right = n = 0
    nll = {"base": 0.0, "dpo": 0.0}
    tokens = 0.0
    for local in make_source(cfg, one_pass=True, process_count=1, process_index=0):
        b = spec.to_global(local)
        lp, lr = np.asarray(fn(None, b, policy)), np.asarray(fn(None, b, ref))
        _, counts = sequence_sums(jax.numpy.zeros(b["tokens"].shape), b, cfg.data.pairs_per_row)
        counts = np.asarray(counts)
        valid = (counts[:, 0::2] > 0) & (counts[:, 1::2] > 0)
        reward = beta * (lp - lr)
        right += int(((reward[:, 0::2] > reward[:, 1::2]) & valid).sum())
        n += int(valid.sum())
        nll["base"] -= float(lr[:, 0::2][valid].sum())
        nll["dpo"] -= float(lp[:, 0::2][valid].sum())
        tokens += float(counts[:, 0::2][valid].sum())
    return dict(reward_accuracy=right / n, pairs=n, ppl_chosen_sft=math.exp(nll["base"] / tokens),
                ppl_chosen_dpo=math.exp(nll["dpo"] / tokens))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/dpo-learns")
    ap.add_argument("--base", default=None, help="a base run (default: train one in WORK/base)")
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--held-out", type=int, default=80)
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    base = args.base or str(work / "base")
    if not (Path(base) / "config.yaml").exists():
        jaxllama("train", f"train.steps={args.base_steps}", f"run_dir={base}", "train.progress=false", log=log)
    train_rows, held = pairs(args.pairs, TRAIN_Q, 0), pairs(args.held_out, HELD_Q, 1)
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    (work / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    rng = random.Random(2)
    (work / "sft.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "completion": rng.choice(
        [r["chosen"], r["rejected"]])}) + "\n" for r in train_rows))
    sft = work / f"sft-s{args.sft_steps}"
    sft_cmd = ["train", f"train.init_from={base}", f"data.source={work / 'sft.jsonl'}", "data.format=prompt_completion",
               f"train.steps={args.sft_steps}", "optim.lr=1e-3", "optim.weight_decay=0", "data.seq_len=128",
               "data.global_batch=16", f"run_dir={sft}", "train.progress=false", "--no-resume"]
    done = sft / "metrics.jsonl"  # reuse a finished SFT run of these settings
    t_sft = 0.0 if done.exists() and json.loads(done.read_text().splitlines()[-1])["step"] == args.sft_steps \
        else jaxllama(*sft_cmd, log=log)
    before = style(str(sft), held, work, "sft", log)
    run = work / f"dpo-r{args.rank}-s{args.steps}-lr{args.lr:g}-b{args.beta:g}"
    base = str(sft)
    cmd = ["train", f"train.init_from={base}", f"data.source={work / 'train.jsonl'}", "data.format=preference",
           "train.objective=dpo", f"train.lora.rank={args.rank}", f"train.lora.alpha={2 * args.rank}",
           f"train.dpo.beta={args.beta}", f"train.steps={args.steps}", f"optim.lr={args.lr}", "optim.weight_decay=0",
           "data.seq_len=128", "data.global_batch=16", f"run_dir={run}", "train.progress=false", "--no-resume"]
    t_train = jaxllama(*cmd, log=log)
    after = style(str(run), held, work, "dpo", log)
    metrics = held_out(run, base, work / "held.jsonl", args.beta)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    print(json.dumps(dict(style_sft=before, style_dpo=after, **metrics, sft_s=round(t_sft, 1), dpo_s=round(t_train, 1),
                          train_reward_accuracy=last.get("reward_accuracy"), train_loss=last["loss"],
                          sft_command="jaxllama " + " ".join(sft_cmd), dpo_command="jaxllama " + " ".join(cmd))))


if __name__ == "__main__":
    main()
