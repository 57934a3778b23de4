"""`--model.rollout_engine vllm`: the weights follow training, the first update is on-policy, a toy reward is
learned, LoRA is pushed merged. The runs happen once, in a process of their own (tests/helpers/vllm_checks.py);
the tests read what they recorded. Tolerances: the engine runs in fp32, like the trainer here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import make_causal_lm
from test_generation import assert_rows_end_at_different_steps
from lit_rlhf.environments import observation_text
from lit_rlhf.errors import UserError
from lit_rlhf.tokenization import tokenize
from lit_rlhf.vllm_engine import import_vllm

pytestmark = pytest.mark.vllm
TESTS = Path(__file__).parent
SCRIPT = TESTS / "helpers" / "vllm_checks.py"
SAME = 1e-4  # max |log p_vLLM - log p_trainer| per token for the same fp32 weights (measured: about 1e-6)
MOVED = 1e-2  # one update at learning rate 1e-2 moves a token's log-prob by more than this


@pytest.fixture(scope="module")
def checks(tmp_path_factory, tokenizer, real_rows) -> dict:
    """What the vLLM runs recorded. The tiny model has 2 heads of 32 dims: vLLM's CPU attention needs >= 32."""
    out = tmp_path_factory.mktemp("vllm")
    make_causal_lm(tokenizer, num_attention_heads=2, num_key_value_heads=1).save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(out / "model", num_labels=1).save_pretrained(out / "reward")
    tokenizer.save_pretrained(out / "reward")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))  # lit_rlhf, and conftest and test_ppo
    command = [sys.executable, str(SCRIPT), str(out / "results.pt"), str(out / "model"), str(out / "reward"), str(real_rows)]
    done = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "results.pt", weights_only=False)


def max_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_the_engine_samples_from_the_weights_of_the_last_update(checks):
    seen = checks["grpo"]["seen"]  # per rollout, after the push: (engine, trainer) log-probs of one fixed sequence
    assert len(seen) == 3
    for engine, trainer in seen:
        assert max_gap(engine, trainer) < SAME
    # and the weights did move between rollouts: an engine that kept its first weights would fail the check above
    assert max_gap(seen[1][0], seen[0][0]) > MOVED and max_gap(seen[2][0], seen[1][0]) > MOVED


@pytest.mark.parametrize("estimator", ["grpo", "gae"])
def test_vllm_rollouts_start_on_policy(checks, estimator):
    metrics, first = checks[estimator]["metrics"][0], checks[estimator]["first_stats"]  # the first step's
    assert metrics["objective/kl"] == 0.0  # policy == reference at the first rollout
    assert first["ratio"].item() == pytest.approx(1.0, abs=1e-6) and first["approxkl"].item() < 1e-10
    # logged, and small. Not as small as SAME: both engines sample the first token with EOS masked (min 1 new
    # token), so vLLM's log-prob of it is renormalised without EOS; the trainer's is not (measured: 6e-4 to 1.3e-3)
    assert 0 < metrics["rollout/logprob_diff"] < 1e-2


def test_a_lora_policy_is_pushed_merged_and_stays_unmerged(checks):
    lora = checks["lora"]
    assert len(lora["seen"]) == 2
    for engine, trainer in lora["seen"]:
        assert max_gap(engine, trainer) < SAME  # the engine holds base + adapter, the trainer computes with both
    assert max_gap(lora["seen"][1][0], lora["seen"][0][0]) > MOVED
    assert lora["merged"] and not any(lora["merged"])


def test_a_toy_reward_is_learned_with_vllm_rollouts(checks):
    scores = checks["toy_scores"]  # share of ASCII bytes in the responses: about 0.5 at random init
    assert len(scores) == 10
    assert sum(scores[-2:]) / 2 > sum(scores[:2]) / 2 + 0.15, scores


def test_multi_turn_rollouts_with_vllm_are_its_sampled_turns_and_the_observations_and_start_on_policy(checks, tokenizer):
    """32 conversations with `Script` (test_multi_turn.py), each turn sampled by vLLM: every response is, in order, the ids
    vLLM returned for that conversation's turns and the observations' ids between them, nothing tokenized again; the
    policy mask covers the turns; the sampler log-probs are vLLM's on the turns and 0 on the observations."""
    run = checks["multi_turn"]
    observations = [tokenize(tokenizer, observation_text(tokenizer, "go on" * t, "user")) for t in (1, 2)]
    going, expected = list(range(32)), {i: ([], [], []) for i in range(32)}  # per conversation: ids, policy mask, log-probs
    for t, call in enumerate(run["turns"]):  # call t answered the conversations still going, in order
        assert len(call) == len(going)
        for i, (ids, logprobs) in zip(going, call):
            ends_turn = ids[-1] == tokenizer.eos_token_id and t < 2  # Script answers turns 1 and 2, ends at 3
            observation = observations[t] if ends_turn else []
            expected[i][0].extend(ids + observation)
            expected[i][1].extend([1] * len(ids) + [0] * len(observation))
            expected[i][2].extend(logprobs + [0.0] * len(observation))
        going = [i for i, (ids, _) in zip(going, call) if ids[-1] == tokenizer.eos_token_id and t < 2]
    assert any(0 in mask for _, mask, _ in expected.values())  # some conversation went on after an observation
    for i, (ids, mask, logprobs) in expected.items():
        R = len(ids)
        assert run["responses"][i, :R].tolist() == ids and run["response_mask"][i].sum() == R
        assert run["policy_mask"][i, :R].tolist() == mask and run["policy_mask"][i, R:].sum() == 0
        assert torch.allclose(run["sampler_logprobs"][i, :R], torch.tensor(logprobs))
    metrics, first = run["metrics"][0], run["first_stats"]
    assert first["ratio"].item() == pytest.approx(1.0, abs=1e-6) and first["approxkl"].item() < 1e-10
    assert 0 < metrics["rollout/logprob_diff"] < 1e-2  # the trainer's log-probs of the policy's tokens are vLLM's
    assert metrics["rollout/turns"] > 1.0


def test_vllm_answers_greedy_as_the_hf_engine(checks, tokenizer):
    """The generation path's `engine="vllm"`: token-identical greedy answers to the HF loop's in fp32 (rows ending at
    different steps), the same log-probs of them, and seeded samples that repeat (tests/test_generation.py's model)."""
    out = checks["generation"]
    assert_rows_end_at_different_steps(out["hf"][0], tokenizer.eos_token_id)
    for hf, vllm in zip(out["hf"][:3], out["vllm"][:3]):  # responses, mask, contains_eos
        assert torch.equal(hf, vllm)
    assert max_gap(out["hf"][3], out["vllm"][3]) < SAME  # each greedy token's log-prob at temperature 1
    assert out["samples"][0] == out["samples"][1] and out["samples"][0] != out["samples"][2]


def test_starting_vllm_keeps_the_runs_random_stream(checks):
    assert checks["rng_kept"]


def test_a_missing_vllm_is_one_line_saying_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(UserError, match=r"needs vLLM, which is not installed .*pip install 'lit-rlhf\[vllm\]'") as error:
        import_vllm()
    assert "\n" not in str(error.value)
