"""ExP-DPO and DPO on expert solutions: the DPO family's step, on train.Trainer's sampling, loop and checkpoints.

    python train.py --method expo_dpo                      # offline: the initial policy's self-explanations
    python train.py --method expo_dpo --dpo_refresh 2      # online: renewed by the current policy every 2 steps
    python train.py --method dpo_gt                        # the expert solution as the chosen response

Each question's chosen response -- its self-explanation (made into a target by expo.self_explanation_targets, as
ExP-GRPO's are) or its expert solution -- is paired with the first of the policy's own wrong rollouts, and
expo.dpo_loss is minimised against the frozen initial policy, summed over pairs and divided by the step's pairs.
`step(trainer, batch)` is called by `Trainer.update`; this file imports nothing of train.py.
"""
from __future__ import annotations

import contextlib

import torch

import data
import expo
import rollout
from engine import distributed, report
from engine.run import timed

METHODS = ("expo_dpo", "dpo_gt")


def step(t, batch: list[data.Example]) -> dict:
    """One DPO step of trainer `t` on this rank's questions: rollouts, pairs, the loss micro-batch by micro-batch
    (the reference's and the policy's sequence log-probs of chosen and rejected), one optimizer step."""
    cfg, G, times = t.cfg, t.cfg.num_generations, {}
    with timed(times, "t_sample"):
        roll, rewards, _ = t.rollouts(batch)
    scores = rewards.tolist()
    chosen, chosen_stats = chosen_responses(t, batch)
    pairs = preference_pairs(batch, chosen, roll.texts, scores, G)
    (n_pairs,) = distributed.all_sum([float(len(pairs))], t.ranks)  # the step's denominator: every rank's pairs
    loss_dpo = 0.0
    with timed(times, "t_update"):
        t.optimizer.zero_grad(set_to_none=True)
        if pairs:
            questions, good, bad = zip(*pairs)
            both = pair_batch(t, questions, good, bad)  # [2 * pairs]: chosen, then rejected
            lengths = both.completion_mask.sum(1).view(2, -1).amax(0).tolist()  # [pairs] the longer of the two
            for rows in rollout.micro_batches(len(pairs), cfg.grad_accum, lengths):
                rows = rows + [i + len(pairs) for i in rows]  # chosen rows, then their rejected partners
                part = both.select(rows)
                with torch.no_grad(), t.amp(), t.reference() as reference:
                    ref_seq = expo.sequence_logp(rollout.logprobs(reference, part, 1.0), part.completion_mask)
                with t.amp():
                    seq = expo.sequence_logp(rollout.logprobs(t.model, part, 1.0), part.completion_mask)
                k = len(rows) // 2  # [2k]: chosen then rejected
                loss = expo.dpo_loss(seq[:k], seq[k:], ref_seq[:k], ref_seq[k:], cfg.dpo_beta, n_pairs)
                loss.backward()
                loss_dpo += loss.item()
            t.write_samples(batch[0], roll.texts[:G], scores[:G], chosen[0])
        grad_norm = t.optimizer_step()
    return {**report.sampling_stats(roll, rewards, None, G, times["t_sample"], batch), **chosen_stats, **times,
            "pairs": len(pairs), "loss_dpo": loss_dpo, "grad_norm": grad_norm}


def preference_pairs(batch: list[data.Example], chosen: list[str | None], texts: list[str], scores: list[float],
                     G: int) -> list[tuple[str, str, str]]:
    """(question, chosen, rejected) per question that has a chosen response and a wrong rollout: the first wrong one
    of its G rows (`texts` [B*G], `scores` their rewards)."""
    pairs = []
    for i, e in enumerate(batch):
        wrong = [texts[i * G + j] for j in range(G) if scores[i * G + j] == 0]
        if chosen[i] is not None and wrong:
            pairs.append((e.question, chosen[i], wrong[0]))
    return pairs


def pair_batch(t, questions: tuple[str, ...], chosen: tuple[str, ...], rejected: tuple[str, ...]) -> rollout.Rollouts:
    """The chosen responses, then the rejected ones, as completions of their questions' answer-free prompts."""
    prompts = [expo.solve_prompt(q) for q in questions + questions]
    return rollout.encode_targets(t.tokenizer, prompts, chosen + rejected, t.turn_end, t.device)


def cache(t) -> dict[str, list]:
    """ExP-DPO's chosen responses across steps, by question id: [the step that made it, the target or None]. It lives
    in the run's `method_state`, which checkpoints keep and --resume restores unread (engine/run.py); checkpoints of
    earlier versions named it "dpo_chosen"."""
    return t.method_state.setdefault("cached", t.method_state.pop("dpo_chosen", {}))


def chosen_responses(t, batch: list[data.Example]) -> tuple[list[str | None], dict]:
    """dpo_gt: expert solutions. expo_dpo: self-explanations, kept per question in `cache(t)` (checkpointed, so
    --resume keeps them) -- made once by the initial (reference) policy when offline, or by the current policy and
    renewed every --dpo_refresh steps."""
    if t.cfg.method == "dpo_gt":
        return [e.solution for e in batch], {}
    cfg, stats, refresh, cached = t.cfg, {}, t.cfg.dpo_refresh, cache(t)
    stale = [e for e in batch if e.id not in cached or (refresh and t.step - cached[e.id][0] >= refresh)]
    if stale:
        with contextlib.nullcontext(t.model) if refresh else t.reference() as model, t.sampling(model):
            prompts = rollout.encode_prompts(t.tokenizer, [expo.explain_prompt(e.question, e.answer, cfg.explain_hint)
                                                           for e in stale])
            sampled = rollout.sample(model, t.tokenizer, prompts, 1, cfg.max_new_tokens, cfg.explain_temperature,
                                     seed=t.sampling_seed(1))
        targets, stats = expo.self_explanation_targets(sampled.texts, [e.answer for e in stale],
                                                       sampled.truncated.tolist(), None, cfg.drop_leaks,
                                                       cfg.drop_truncated, cfg.drop_wrong, [e.question for e in stale])
        stats.update(report.explanation_stats(sampled))
        cached.update({e.id: [t.step, text] for e, text in zip(stale, targets)})
    return [cached[e.id][1] for e in batch], stats
