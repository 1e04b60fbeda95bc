"""ExP-DPO's preference pairs for TRL's DPOTrainer, as JSONL in TRL's conversational preference format:
{"prompt": [user: expo.solve_prompt(q)], "chosen": [assistant: the self-explanation target], "rejected": [assistant:
one of the policy's own wrong answers]}. Recipe: docs/trl.md.

    python -m scale.dpo_pairs --model Qwen/Qwen2.5-3B-Instruct --dataset math --levels 5 --steps 100 \\
        --batch_size 64 --num_generations 8 --max_new_tokens 1024 --output_dir runs/math5-pairs
    # -> runs/math5-pairs/pairs.jsonl, for trl.DPOTrainer(train_dataset=load_dataset("json", data_files=...))

The pairs are exactly those that `python train.py --method expo_dpo` (offline) trains on at steps 0 .. N-1 with the
same flags, had its policy not moved between steps: the same questions in the same order, the same rollouts and the
same self-explanations of the initial policy through the same filters (dpo.chosen_responses, dpo.preference_pairs;
tested). Online ExP-DPO on TRL: write new pairs from the newest checkpoint (--model) every N steps. Needs no trl.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import dpo
import expo
import train
from backend import threads
from engine.run import batch_indices


def trl_row(question: str, chosen: str, rejected: str) -> dict:
    """One pair in TRL's conversational preference format, scored after the answer-free prompt as ours is."""
    return {"prompt": [{"role": "user", "content": expo.solve_prompt(question)}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def write_pairs(t: train.Trainer) -> int:
    """Steps 0 .. --steps - 1 of trainer `t` (an expo_dpo run), sampled but not trained: their pairs, appended to
    `t.out`/pairs.jsonl. Returns how many."""
    cfg, written = t.cfg, 0
    with open(t.out / "pairs.jsonl", "w") as f:
        for step in range(cfg.steps):
            t.step = step  # the step's questions and sampling seeds, as the run's
            batch = [t.train_set[i] for i in batch_indices(len(t.train_set), cfg.batch_size, t.step, cfg.seed)]
            roll, rewards, _ = t.rollouts(batch)
            chosen, _ = dpo.chosen_responses(t, batch)
            for pair in dpo.preference_pairs(batch, chosen, roll.texts, rewards.tolist(), cfg.num_generations):
                f.write(json.dumps(trl_row(*pair)) + "\n")
                written += 1
    return written


def main(argv: list[str] | None = None) -> None:
    """train.py's flags (--method is expo_dpo; --dpo_refresh 0); the pairs go to OUTPUT_DIR/pairs.jsonl."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = train.parse_args([*argv, "--method", "expo_dpo", "--dpo_refresh", "0"])
    if not any(a.split("=")[0] == "--output_dir" for a in argv):  # not the folder an ExP-DPO training run would take
        cfg.output_dir = f"runs/expo_dpo-pairs-{Path(cfg.dataset).stem}"
    t = train.Trainer(cfg)
    print(f"{write_pairs(t)} pairs from {cfg.steps} steps of {cfg.batch_size} questions: {t.out / 'pairs.jsonl'}")


if __name__ == "__main__":
    threads.use_this_process_cpus()
    main()
