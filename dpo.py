"""ExP-DPO and DPO on expert solutions: the DPO family, built on train.Trainer's sampling, loop and checkpoints.

    python train.py --method expo_dpo                      # offline: the initial policy's self-explanations
    python train.py --method expo_dpo --dpo_refresh 2      # online: renewed by the current policy every 2 steps
    python train.py --method dpo_gt                        # the expert solution as the chosen response

Each question's chosen response -- its self-explanation (made into a target by expo.self_explanation_targets, as
ExP-GRPO's are) or its expert solution -- is paired with the first of the policy's own wrong rollouts, and
expo.dpo_loss is minimised against the frozen initial policy, summed over pairs and divided by the step's pairs.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

import data
import distributed
import expo
from train import (Config, Trainer, explanation_stats, logprobs, micro_batches, sampling_stats, target_batch,
                   timed)


class DPOTrainer(Trainer):
    """ExP-DPO (expo_dpo) and DPO on expert solutions (dpo_gt): each question's chosen response -- its
    self-explanation, or its expert solution -- against the first of the policy's own wrong rollouts, with
    expo.dpo_loss against the frozen initial policy. Owns its cached self-explanations and checkpoints them."""

    def __init__(self, cfg: Config):
        self.chosen: dict[str, tuple[int, str]] = {}  # question id -> (step made, target), expo_dpo only
        super().__init__(cfg)

    def needs_reference(self) -> bool:
        return True

    def restore(self, start: Path, state: dict) -> None:
        super().restore(start, state)
        self.chosen = {k: tuple(v) for k, v in state.get("dpo_chosen", {}).items()}

    def checkpoint_state(self) -> dict:
        """Rank 0 saves every rank's cached explanations: each rank explains its own share of the questions."""
        merged = {k: v for part in distributed.gather(self.chosen, self.ranks) for k, v in part.items()}
        return {**super().checkpoint_state(), "dpo_chosen": merged}

    def update(self, batch: list[data.Example]) -> dict:
        return self.dpo_step(batch)

    def dpo_step(self, batch: list[data.Example]) -> dict:
        cfg, G, times = self.cfg, self.cfg.num_generations, {}
        with timed(times, "t_sample"):
            roll, rewards, _ = self.rollouts(batch)
        scores = rewards.tolist()
        chosen, chosen_stats = self.chosen_responses(batch)
        pairs = []  # (question, chosen text, rejected text): the first wrong rollout of the question
        for i, e in enumerate(batch):
            wrong = [roll.texts[i * G + j] for j in range(G) if scores[i * G + j] == 0]
            if chosen[i] is not None and wrong:
                pairs.append((e.question, chosen[i], wrong[0]))
        (n_pairs,) = distributed.all_sum([float(len(pairs))], self.ranks)  # the step's denominator: every rank's pairs
        loss_dpo = 0.0
        with timed(times, "t_update"):
            self.optimizer.zero_grad(set_to_none=True)
            if pairs:
                questions, good, bad = zip(*pairs)
                both = target_batch(self.tokenizer, questions + questions, good + bad, self.turn_end).to(self.device)
                lengths = both.completion_mask.sum(1).view(2, -1).amax(0).tolist()  # [pairs] the longer of the two
                for rows in micro_batches(len(pairs), cfg.grad_accum, lengths):
                    rows = rows + [i + len(pairs) for i in rows]  # chosen rows, then their rejected partners
                    part = both.select(rows)
                    with torch.no_grad(), self.amp(), self.reference() as reference:
                        ref_seq = expo.sequence_logp(logprobs(reference, part, 1.0), part.completion_mask)
                    with self.amp():
                        seq = expo.sequence_logp(logprobs(self.model, part, 1.0), part.completion_mask)
                    k = len(rows) // 2  # [2k]: chosen then rejected
                    loss = expo.dpo_loss(seq[:k], seq[k:], ref_seq[:k], ref_seq[k:], cfg.dpo_beta, n_pairs)
                    loss.backward()
                    loss_dpo += loss.item()
                self.write_samples(batch[0], roll.texts[:G], scores[:G], chosen[0])
            grad_norm = self.optimizer_step()
        return {**sampling_stats(roll, rewards, None, G, times["t_sample"]), **chosen_stats, **times,
                "pairs": len(pairs), "loss_dpo": loss_dpo, "grad_norm": grad_norm}

    def chosen_responses(self, batch: list[data.Example]) -> tuple[list[str | None], dict]:
        """dpo_gt: expert solutions. expo_dpo: self-explanations, cached per question -- made once by the initial
        (reference) policy when offline, or by the current policy and renewed every --dpo_refresh steps."""
        if self.cfg.method == "dpo_gt":
            return [e.solution for e in batch], {}
        cfg, stats = self.cfg, {}
        refresh = cfg.dpo_refresh
        stale = [e for e in batch if e.id not in self.chosen
                 or (refresh and self.step - self.chosen[e.id][0] >= refresh)]
        if stale:
            with contextlib.nullcontext(self.model) if refresh else self.reference() as model:
                sampled = self.sample([expo.explain_prompt(e.question, e.answer) for e in stale], 1,
                                      self.sampling_seed(1), model)
            targets, stats = expo.self_explanation_targets(sampled.texts, [e.answer for e in stale],
                                                           sampled.truncated.tolist(), None, cfg.drop_leaks,
                                                           cfg.drop_truncated, cfg.drop_wrong)
            stats.update(explanation_stats(sampled))
            self.chosen.update({e.id: (self.step, t) for e, t in zip(stale, targets)})
        return [self.chosen[e.id][1] for e in batch], stats
