"""The model families a user brings next: chat templates, turn-end tokens, and every method training on each."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers import models as tok_models
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import data
import dpo
import expo
import rollout
import train
from conftest import _args, _rollout_tensors, _steps, needs_assets, tiny_llama
from engine import checkpoint, distributed, run

QWEN25_TEMPLATE = (  # Qwen2.5-Instruct's template, its branch without tools
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


LLAMA3_TEMPLATE = (  # Meta-Llama-3-Instruct's template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


FAMILIES = {
    "qwen2.5": dict(model=(Qwen2Config, Qwen2ForCausalLM), special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                    bos=None, eos="<|im_end|>", pad="<|endoftext|>", generation_eos=["<|im_end|>", "<|endoftext|>"],
                    template=QWEN25_TEMPLATE, turn_end="<|im_end|>"),
    "llama3": dict(model=(LlamaConfig, LlamaForCausalLM),
                   special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eom_id|>", "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
                   generation_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], template=LLAMA3_TEMPLATE,
                   turn_end="<|eot_id|>"),
}


def family_tokenizer(name: str):
    spec = FAMILIES[name]
    corpus = [expo.solve_prompt(f"What is {a} + {b}?") + expo.HINTS["brief"].format(answer=a + b) +
              f" {a} + {b} = {a + b}. So \\boxed{{{a + b}}}." for a in range(10, 40) for b in range(1, 9)]
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=spec["special"], show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if spec["bos"]:  # Llama's tokenizer adds a BOS on its own; the template writes one too
        tok.post_processor = processors.TemplateProcessing(single=f"{spec['bos']} $A",
                                                           special_tokens=[(spec["bos"], tok.token_to_id(spec["bos"]))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"], pad_token=spec["pad"])
    hf.chat_template = spec["template"]
    return hf


def save_family_model(name: str, path: Path) -> Path:
    """A tiny random model of a family with its tokenizer, saved like a hub model with its generation config."""
    spec, tok = FAMILIES[name], family_tokenizer(name)
    config_cls, model_cls = spec["model"]
    eos = [tok.convert_tokens_to_ids(t) for t in spec["generation_eos"]]
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                 eos_token_id=eos, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id))
    model.generation_config.eos_token_id = eos
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, folder) of a tiny random model of each family."""
    return request.param, save_family_model(request.param, tmp_path_factory.mktemp(request.param) / "model")


def test_turn_end_is_the_token_that_closes_an_assistant_turn(family, tokenizer):
    """Targets end in the chat template's turn-end token, not in the smallest EOS id; sampling stops at every EOS."""
    name, path = family
    model, tok = rollout.load_policy(str(path))
    end = tok.convert_tokens_to_ids(FAMILIES[name]["turn_end"])
    assert rollout.turn_end_id(tok) == end, f"{name}: targets would end in {tok.decode([rollout.turn_end_id(tok)])}"
    assert min(rollout.stop_ids(model, tok)) != end  # the family lists a smaller EOS id: the old rule's mistake
    assert set(rollout.stop_ids(model, tok)) >= {tok.convert_tokens_to_ids(t) for t in FAMILIES[name]["generation_eos"]}
    assert rollout.turn_end_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")  # SmolLM2


def test_prompts_render_as_the_family_template_with_one_bos(family):
    name, path = family
    tok = rollout.load_policy(str(path))[1]
    ids = rollout.encode_prompts(tok, ["What is 12 + 3?"])[0]
    assert tok.decode(ids) == tok.apply_chat_template([{"role": "user", "content": "What is 12 + 3?"}], tokenize=False,
                                                      add_generation_prompt=True)
    if tok.bos_token_id is not None:  # Llama-3: the template's BOS, not a second one from the tokenizer
        assert tok("x").input_ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


@pytest.mark.exercise10
@pytest.mark.parametrize("method", train.METHODS)
def test_every_method_trains_on_each_family_with_targets_ending_in_its_turn_end(family, tmp_path, monkeypatch, method):
    """Two steps of each method on a Qwen2.5- and a Llama-3-shaped model: every target (self-explanation, expert
    solution, DPO pair) is a completion of the answer-free prompt and ends in the family's turn-end token."""
    name, path = family
    built, real = [], rollout.encode_targets
    monkeypatch.setattr(rollout, "encode_targets", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    train.main(_args(path, tmp_path, "--method", method, "--steps", "2"))
    tok = rollout.load_policy(str(path))[1]
    end = tok.convert_tokens_to_ids(FAMILIES[name]["turn_end"])
    assert [s["step"] for s in _steps(tmp_path)] == [0, 1]
    assert any(built) or method == "grpo", f"{method} built no targets"
    for batch in filter(None, built):  # grpo's targets: None
        last = batch.completion_ids.gather(1, batch.completion_mask.sum(1, keepdim=True) - 1).squeeze(1)  # [n]
        assert (last == end).all(), f"{name}/{method}: targets end in {tok.convert_ids_to_tokens(last.tolist())}"
        assert not any("correct final answer" in tok.decode(p) for p in batch.prompt_ids), "a hint in a scored prompt"


@pytest.mark.exercise10
@needs_assets
def test_gpu_recipe_flags_dry_run_on_a_qwen_shaped_model(tmp_path):
    """The README's GPU recipe scaled down on the CPU: MATH level 5, LoRA, gradient checkpointing, --grad_accum,
    --eval_every; one evaluation mid-run, a loadable merged checkpoint."""
    out = tmp_path / "run"
    train.main(["--model", str(save_family_model("qwen2.5", tmp_path / "qwen")), "--dataset", "math", "--levels", "5",
                "--num_generations", "2",
                "--batch_size", "2", "--max_new_tokens", "8", "--learning_rate", "1e-5", "--beta", "0.04", "--steps", "2",
                "--grad_accum", "2", "--gradient_checkpointing", "--eval_every", "1", "--eval_limit", "2", "--eval_k", "2",
                "--eval_max_new_tokens", "8", "--lora_rank", "4", "--output_dir", str(out)])
    evals = [json.loads(line)["eval"] for line in open(out / "metrics.jsonl") if '"eval"' in line]
    assert evals == ["before", "step 1", "after"] and [s["step"] for s in _steps(out)] == [0, 1]
    assert AutoModelForCausalLM.from_pretrained(out / "checkpoint").config.model_type == "qwen2"


@pytest.mark.exercise10
@pytest.mark.parametrize("dataset", ["gsm8k", "math", "jsonl"])
def test_datasets_run_with_their_default_levels(tiny_dir, tmp_path, dataset, capsys):
    if dataset == "jsonl":  # rows without a level
        dataset = str(tmp_path / "mine.jsonl")
        Path(dataset).write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                                         for i in range(4)))
    train.main(_args(tiny_dir, tmp_path / "run", "--dataset", dataset, "--method", "grpo", "--steps", "1",
                     "--max_new_tokens", "2"))
    assert [s["step"] for s in _steps(tmp_path / "run")] == [0]
    if dataset == "math":
        assert "math, all levels: 7496 train" in capsys.readouterr().out  # levels 1-5
    with pytest.raises(data.DataError, match="has no difficulty levels"):
        data.load(dataset if dataset.endswith(".jsonl") else "gsm8k", "test", levels=[1])


@pytest.mark.exercise8
def test_grpo_learns_a_synthetic_reward(tokenizer, tmp_path, monkeypatch):
    """A tiny policy over 20 tokens; reward 1 when the completion starts with a digit (half of them at first)."""
    model = tiny_llama(tokenizer)
    allowed = [tokenizer.convert_tokens_to_ids(c) for c in "0123456789abcdefghij"]
    head = torch.nn.Linear(32, len(tokenizer), bias=True)
    with torch.no_grad():  # every other token gets a -30 bias: effectively a 20-token vocabulary
        head.weight.copy_(model.lm_head.weight)
        head.bias.fill_(-30.0)
        head.bias[allowed] = 0.0
    model.lm_head = head
    monkeypatch.setattr(train.rollout, "load_policy", lambda name, device="cpu", dtype=None: (model, tokenizer))
    monkeypatch.setattr(train.reward, "score", lambda text, gold, question=None: float(text[:1].isdigit()))

    def digit_rate():
        out = rollout.sample(model, tokenizer, rollout.encode_prompts(tokenizer, ["What is 1 + 2?"] * 8), 8, 2,
                             seed=123)
        return sum(t[:1].isdigit() for t in out.texts) / len(out.texts)

    before = digit_rate()
    cfg = train.parse_args(["--method", "grpo", "--steps", "6", "--batch_size", "4", "--num_generations", "8",
                            "--max_new_tokens", "2", "--learning_rate", "1e-2", "--temperature", "1.0",
                            "--output_dir", str(tmp_path), "--grad_accum", "1", "--sampler_dtype", "fp32",
                            "--train_dtype", "fp32"])
    trainer = train.Trainer(cfg)
    for step in range(6):
        trainer.grpo_step([trainer.train_set[i] for i in run.batch_indices(len(trainer.train_set), 4, step, 0)])
        trainer.step += 1
    assert 0.3 < before < 0.7 and digit_rate() > before + 0.25


@pytest.mark.exercise8
def test_non_finite_loss_skips_the_update(tiny_dir, tmp_path, monkeypatch):
    real = expo.grpo_loss
    monkeypatch.setattr(train.expo, "grpo_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    cfg = train.parse_args(_args(tiny_dir, tmp_path, "--method", "grpo", "--steps", "1", "--kl_coef", "0.1"))
    trainer = train.Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.grpo_step(trainer.train_set[:2])
    assert trainer.skipped == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_batches_cover_each_epoch_once():
    seen = [i for step in range(5) for i in run.batch_indices(10, 2, step, seed=1)]
    assert sorted(seen) == list(range(10))
    assert run.batch_indices(10, 2, 3, seed=1) == run.batch_indices(10, 2, 3, seed=1)


def test_bad_flags_and_missing_checkpoint_give_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--num_generations", "1"])
    assert "--num_generations must be at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--method", "ppo"])
    assert "invalid choice: 'ppo'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.main(["--resume", "--output_dir", str(tmp_path)])
    for _ in range(2):  # a start that fails leaves no run behind, so the corrected command is not refused
        with pytest.raises(SystemExit, match="unknown dataset"):
            train.main(["--dataset", "nope", "--output_dir", str(tmp_path / "nope")])
        assert not (tmp_path / "nope" / "config.json").exists()


@pytest.mark.exercise3
def test_each_torchrun_rank_draws_its_own_rollouts(tiny_dir, tmp_path):
    """Under torchrun every rank samples with its own seed: the same question on rank 0 and on rank 1 gets different
    rollouts (with one seed for all ranks, a batch split over ranks would repeat its draws)."""
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path, "--num_generations", "4", "--max_new_tokens", "8",
                                             "--temperature", "1.0")))
    drawn = []
    for rank in (0, 1):
        t.ranks = distributed.Ranks(rank=rank, world=2)
        drawn.append(t.rollouts(t.train_set[:1])[0].texts)
    t.ranks = distributed.Ranks()
    assert drawn[0] != drawn[1], "two ranks drew the same rollouts of a question"
    assert t.sampling_seed() == run.step_seed(t.cfg.seed, t.step)  # rank 0's is the single-process seed


@pytest.mark.exercise10
def test_expo_dpo_resume_keeps_its_cached_self_explanations(tiny_dir, tmp_path, monkeypatch):
    """Offline ExP-DPO explains each question once, with the initial policy; --resume restores those chosen responses
    from the checkpoint instead of sampling them again (which would train on other texts than the uninterrupted run)."""
    args = _args(tiny_dir, tmp_path, "--method", "expo_dpo", "--no-eval_before", "--eval_limit", "1", "--eval_k", "1")
    train.main([*args, "--steps", "1"])
    cached = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["cached"]
    assert cached, "the checkpoint holds no self-explanations"
    state_file = tmp_path / "checkpoint" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "dpo_chosen": state.pop("cached")}))  # as an earlier version saved it
    t = train.Trainer(train.parse_args([*args, "--steps", "2", "--resume"]))
    try:
        assert dpo.cache(t) == cached, "--resume forgot the cached self-explanations (saved under their older name)"
        assert t.checkpoint_state()["cached"] == cached and "dpo_chosen" not in t.checkpoint_state()
        asked = []
        monkeypatch.setattr(rollout, "sample", lambda model, tok, prompts, *a, **kw: asked.extend(prompts))
        done = [e for e in t.train_set if e.id in cached]
        chosen, _ = dpo.chosen_responses(t, done)
        assert asked == [] and chosen == [cached[e.id][1] for e in done], "a cached question was explained again"
    finally:
        checkpoint.unlock(t.out)


@pytest.mark.exercise1
def test_embedded_model_answers_and_stops(tokenizer):
    """The real SmolLM2-135M: greedy output ends at its EOS, and the mask stops there."""
    model, tok = rollout.load_policy(None)
    out = rollout.sample(model, tok, rollout.encode_prompts(tok, ["What is 2 + 3? Answer with one number."]), 1, 40,
                         temperature=0)
    length = int(out.completion_mask.sum())
    assert not out.truncated[0] and out.completion_ids[0, length - 1] == tok.eos_token_id
    assert "5" in out.texts[0] and "<|im_end|>" not in out.texts[0]


@pytest.mark.exercise8
@pytest.mark.parametrize("norm", expo.LOSS_NORMS)
def test_zero_advantage_rows_can_be_skipped_exactly(norm):
    """train.py skips rows whose advantage is 0 (all-equal groups) when kl_coef == 0: the gradient must not change."""
    logp, mask, adv = _rollout_tensors()
    adv[1] = 0.0
    old = logp.detach() - 0.05
    full, _ = expo.grpo_loss(logp, old, None, adv, mask, norm=norm, max_tokens=5)
    (grad_full,) = torch.autograd.grad(full, logp)
    kept = [0, 2]
    part, _ = expo.grpo_loss(logp[kept], old[kept], None, adv[kept], mask[kept], norm=norm,
                             denominator=expo.pg_denominator(mask, norm, max_tokens=5))  # the whole batch's
    (grad_part,) = torch.autograd.grad(part, logp)
    assert torch.allclose(grad_full, grad_part)


@pytest.mark.exercise10
def test_ctrl_c_saves_a_checkpoint_to_resume_from(tiny_dir, tmp_path, monkeypatch):
    real_step = train.Trainer.grpo_step

    def interrupted_at_step_1(self, batch):
        if self.step == 1:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(train.Trainer, "grpo_step", interrupted_at_step_1)
    with pytest.raises(SystemExit) as stop:
        train.main(_args(tiny_dir, tmp_path, "--method", "grpo", "--steps", "3"))
    assert stop.value.code == 130
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 1  # the completed steps; --resume continues from here
