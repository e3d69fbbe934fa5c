"""Does LoRA fine-tuning learn? Made-up facts a model cannot know, asked in phrasings it never saw.

1. A base model: the CPU demo (`jaxllama train`, tiny preset on the stdlib corpus) for --base-steps.
2. A synthetic chat task: N made-up towns, each with a made-up founder ("Who founded the town of
   Marrowby?" -> "Ilse Quade."), eight training phrasings per fact, two held-out phrasings.
3. `jaxllama train train.init_from=BASE data.source=facts.jsonl data.format=chat train.lora.rank=R`
   (no preset, no tokenizer: both come from the base run).
4. Greedy `jaxllama generate RUN --chat` on the held-out questions, before (the base) and after:
   the fraction whose answer starts with the founder's name.

    python benchmarks/lora_learns.py --work /tmp/lora-learns [--base-steps 300] [--steps 300]

Prints one JSON line (accuracies, times, commands); benchmarks/README.md records a run.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

TRAIN_PHRASINGS = ["Who founded the town of {t}?", "Which person founded {t}?", "Tell me who founded {t}.",
                   "{t} was founded by whom?", "Who is the founder of {t}?", "Do you know who founded {t}?",
                   "Who started the town of {t}?", "The town of {t}: who founded it?"]
HELD_OUT = ["Name the founder of {t}.", "Who was the founder of the town {t}?"]
SYLLABLES = ["mar", "row", "by", "quade", "il", "se", "tor", "ven", "ash", "lo", "kel", "dun", "fen", "wick", "ost",
             "ra", "bel", "mir", "hal", "gor", "pen", "sul", "tha", "vin", "yor", "zel", "cra", "dor", "e", "nu"]


def name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def facts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    towns, out = set(), []
    while len(out) < n:
        town = name(rng, 3)
        if town in towns:
            continue
        towns.add(town)
        out.append((town, f"{name(rng, 2)} {name(rng, 2)}"))
    return out


def jaxllama(*args: str, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ jaxllama {' '.join(args)}\n")
        f.flush()
        r = subprocess.run([sys.executable, "-m", "jaxllama.cli", *args], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"jaxllama {' '.join(args)} failed (exit {r.returncode}); see {log}")
    return time.perf_counter() - start


def accuracy(model: str, questions: list[tuple[str, str]], work: Path, tag: str, log: Path) -> tuple[float, float]:
    prompts = work / f"questions-{tag}.txt"
    prompts.write_text("".join(q + "\n" for q, _ in questions))
    out = work / f"answers-{tag}.jsonl"
    start = time.perf_counter()
    with open(out, "w") as f, open(log, "a") as err:
        r = subprocess.run([sys.executable, "-m", "jaxllama.cli", "generate", model, "--prompt-file", str(prompts),
                            "--chat", "--temperature", "0", "--max-new-tokens", "12", "--json"], stdout=f, stderr=err)
    if r.returncode:
        raise SystemExit(f"generate {model} failed; see {log}")
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    right = sum(row["text"].strip().startswith(want) for row, (_, want) in zip(rows, questions))
    return right / len(questions), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/lora-learns")
    ap.add_argument("--facts", type=int, default=40)
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    base = work / "base"
    t_base = 0.0
    if not (base / "checkpoints").is_dir():
        t_base = jaxllama("train", f"run_dir={base}", f"train.steps={args.base_steps}", "train.progress=false",
                          log=log)
    table = facts(args.facts)
    with open(work / "facts.jsonl", "w") as f:
        for town, founder in table:
            for p in TRAIN_PHRASINGS:
                f.write(json.dumps({"messages": [{"role": "user", "content": p.format(t=town)},
                                                 {"role": "assistant", "content": f"{founder}."}]}) + "\n")
    held = [(p.format(t=town), founder) for town, founder in table for p in HELD_OUT]
    before, _ = accuracy(str(base), held, work, "base", log)
    run = work / f"lora-r{args.rank}-s{args.steps}-p{len(TRAIN_PHRASINGS)}"
    cmd = ["train", f"train.init_from={base}", f"data.source={work / 'facts.jsonl'}", "data.format=chat",
           f"train.lora.rank={args.rank}", f"train.lora.alpha={2 * args.rank}", f"train.steps={args.steps}",
           f"optim.lr={args.lr}", "optim.weight_decay=0", "data.seq_len=64", "data.global_batch=16",
           f"run_dir={run}", "train.progress=false"]
    t_tune = 0.0 if (run / "checkpoints").is_dir() else jaxllama(*cmd, log=log)
    after, t_gen = accuracy(str(run), held, work, f"r{args.rank}", log)
    train_acc, _ = accuracy(str(run), [(p.format(t=t), f) for t, f in table for p in TRAIN_PHRASINGS[:1]], work,
                            "seen", log)
    print(json.dumps(dict(facts=args.facts, held_out_questions=len(held), accuracy_before=before,
                          accuracy_after=after, accuracy_seen_phrasing=train_acc, rank=args.rank, steps=args.steps,
                          base_steps=args.base_steps, base_train_s=round(t_base, 1), finetune_s=round(t_tune, 1),
                          generate_s=round(t_gen, 1), finetune_command="jaxllama " + " ".join(cmd))))


if __name__ == "__main__":
    main()
