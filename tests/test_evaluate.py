"""The evaluation report: log-prob by hand, self-comparison, boilerplate, files written."""

import json
import math
import types

import pytest
import torch

from lit_rlhf.cli import cli
from lit_rlhf.errors import UserError
from lit_rlhf.ops import IGNORE_INDEX
from lit_rlhf.evaluate import completion_logps, is_boilerplate, main, mean_answer_logprob, over_batches, sequence_kl
from lit_rlhf.report import SEEDED, across_seeds, answer_table, seed_table


class ConstantLM(torch.nn.Module):
    """A causal LM with the logits `logits` (V,) at every position, shaped like a transformers model
    (`forward.token_logps` runs its backbone, then its head): hidden state 1 everywhere, a bias-free head."""

    base_model_prefix = "backbone"

    def __init__(self, logits: list[float]):
        super().__init__()
        self.config = types.SimpleNamespace()
        self.head = torch.nn.Linear(1, len(logits), bias=False)
        self.head.weight.data = torch.tensor(logits)[:, None]

    def backbone(self, input_ids, **kwargs):
        return types.SimpleNamespace(last_hidden_state=torch.ones(*input_ids.shape, 1))

    def get_output_embeddings(self):
        return self.head


def biased_coin_lm():
    """3/4 of the mass on token 1 and 1/4 on token 0 (vocab 2), everywhere."""
    return ConstantLM([0.0, math.log(3.0)])


def fair_coin_lm():
    """Uniform over a vocab of 2."""
    return ConstantLM([0.0, 0.0])


def test_mean_answer_logprob_by_hand():
    rows = [{"prompt": [0, 0], "chosen": [1, 1]}, {"prompt": [0], "chosen": [0, 1, 1, 1]}]
    # row 1: mean(log 3/4, log 3/4) = log 0.75; row 2: (log 1/4 + 3 log 3/4) / 4
    expected = (math.log(0.75) + (math.log(0.25) + 3 * math.log(0.75)) / 4) / 2
    assert math.isclose(mean_answer_logprob(biased_coin_lm(), rows, pad_id=0, batch_size=2), expected, rel_tol=1e-5)


def test_over_batches_groups_rows_by_length_and_answers_in_the_given_order():
    pairs = [([7], [1] * 5), ([7], [1]), ([7], [1] * 5), ([7], [1])]  # completions of 5, 1, 5, 1 tokens
    padded = []

    def answer_lengths(model, batch):  # the completion tokens of each row, and the padded size of each batch
        padded.append(batch["input_ids"].numel())
        return (batch["labels"] != IGNORE_INDEX).sum(-1)

    assert over_batches(answer_lengths, None, pairs, pad_id=0, batch_size=2).tolist() == [5, 1, 5, 1]
    assert padded == [2 * 2, 2 * 6]  # the two short rows together, then the two long ones: no padding


def test_sequence_kl_by_hand():
    # completion tokens 1, 0 under p = (1/4, 3/4) and q = (1/2, 1/2), a third position masked out:
    # k1 = log(3/4 / 1/2) + log(1/4 / 1/2) = log 1.5 + log 0.5
    # k3 = (r - 1) - log r with r = q / p: (2/3 - 1 - log 2/3) + (2 - 1 - log 2)
    logps = torch.tensor([[math.log(0.75), math.log(0.25), -5.0]], dtype=torch.float64)
    base_logps = torch.tensor([[math.log(0.5), math.log(0.5), -1.0]], dtype=torch.float64)
    k1, k3 = sequence_kl(logps, base_logps, torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64))[0]
    assert k1.item() == pytest.approx(math.log(1.5) + math.log(0.5))
    assert k3.item() == pytest.approx((2 / 3 - 1 - math.log(2 / 3)) + (2 - 1 - math.log(2)))


def test_completion_logps_left_aligned_by_hand():
    # row 1: prompt [0], completion [1, 0]; row 2: prompt [0, 0], completion [1], right-padded; p(1) = 3/4, p(0) = 1/4
    batch = {"input_ids": torch.tensor([[0, 1, 0], [0, 0, 1]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 1]]),
             "labels": torch.tensor([[-100, 1, 0], [-100, -100, 1]])}  # fmt: skip
    expected = [[math.log(0.75), math.log(0.25), 0.0, 0.0], [math.log(0.75), 0.0, 0.0, 0.0]]
    assert completion_logps(biased_coin_lm(), batch, width=4).tolist() == [pytest.approx(row, abs=1e-6) for row in expected]


def test_preferred_answers_by_hand():
    from lit_rlhf.evaluate import preferred_answers

    eos = 9
    rows = [{"chosen": [5, 6, eos, 1]}, {"chosen": [5, 6, 7, 8, eos]}, {"chosen": [5, 6, 7, 8]}]  # ends after 3, 5, never (cut)
    ends, lengths = preferred_answers(rows, eos, max_new_tokens=4)
    assert ends.tolist() == [1.0, 0.0, 0.0] and lengths.tolist() == [3.0, 4.0, 4.0]
    ends, lengths = preferred_answers(rows, eos, max_new_tokens=5)
    assert ends.tolist() == [1.0, 1.0, 0.0] and lengths.tolist() == [3.0, 5.0, 5.0]


def test_boilerplate_on_hand_made_strings():
    texts = [
        "As a digital AI assistant, I don't have a morning.",
        "Oh I love pancakes! 🥞",
        "As an AI, I cannot eat.",
        "I don't have personal experiences, but...",
        "Mornings are for coffee and a run.",
        "I'm sorry, but as a chatbot I can't celebrate birthdays.",
    ]
    assert [is_boilerplate(t) for t in texts] == [True, False, True, True, False, True]
    assert not is_boilerplate("Haha, said no AI ever") and not is_boilerplate("Gotta stay as an aide")


def test_report_of_a_model_against_itself(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, tokenizer, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(1)
    judge_dir = tmp_path / "judge"
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(judge_dir)
    tokenizer.save_pretrained(judge_dir)
    unseen = tmp_path / "unseen.jsonl"
    unseen.write_text("".join(json.dumps(r) + "\n" for r in [
        {"instruction": "Name a fish.", "context": "", "response": "Tope."},
        {"instruction": "Summarise.", "context": "The sky is blue.", "response": "Blue sky."},
    ]))  # fmt: skip
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": 2 * i}) + "\n" for i in range(6)))
    (tmp_path / "judge_rewards.py").write_text("def short(prompts, completions, answer, **c):\n    return [float(len(x) < 4) for x in completions]\n")
    out = tmp_path / "eval"
    data = ["--data.dataset", str(real_rows), "--data.limit", "30", "--data.val_size", "10", "--data.max_length", "64",
            "--data.max_prompt_length", "32"]  # fmt: skip
    report = main([
        "--models", json.dumps({"base": tiny_model_dir, "same": tiny_model_dir}), "--reward_model", tiny_reward_dir, *data,
        "--judge_model", str(judge_dir),
        "--unseen_dataset", str(unseen), "--output_dir", str(out),
        "--num_generation_prompts", "5", "--max_new_tokens", "6", "--num_rows", "10", "--num_logprob_rows", "4",
        "--task_dataset", str(task), "--task_reward_funcs", f"[{tmp_path / 'judge_rewards.py'}:short]", "--task_rows", "4",
        "--precision", "fp32",
    ])  # fmt: skip
    same, base = report["models"]["same"], report["models"]["base"]
    assert same["win_rate"] == [0.5, 0.5, 0.5] and same["lc_win_rate"] == pytest.approx(0.5)
    # the same weights: the decoding's log-probs of its answers equal base's forward over them (fp32 rounding apart)
    assert same["greedy_logratio"] == pytest.approx(0.0, abs=1e-4) and same["sampled_kl"] == pytest.approx([0.0] * 3, abs=1e-4)
    assert same["sampled_kl_k3"] == pytest.approx([0.0] * 3, abs=1e-8)
    assert same["logprob_unseen"] == base["logprob_unseen"] < 0
    assert same["judge_reward"] == base["judge_reward"] != base["proxy_reward"]  # the judge is another model
    assert report["judge"]["independent"] and report["judge"]["accuracy"] != report["proxy"]["accuracy"]
    assert 0 < same["length"][0] <= 6 and same["eos_share"][1] <= same["eos_share"][0] <= same["eos_share"][2]
    # the reward model's accuracy on the same held-out rows, counted by the reward trainer's own validation
    # (in fp32, as this evaluation computes)
    validated = cli(["validate", "--model", "lit_rlhf.reward.RewardModule", "--model.model_name_or_path", tiny_reward_dir, *data,
                     "--data.batch_size", "10", "--trainer.precision", "32-true", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert report["proxy"]["rows"] == 10
    assert report["proxy"]["accuracy"] == pytest.approx(validated.trainer.callback_metrics["val_accuracy"].item())
    assert report["proxy"]["margin"] == pytest.approx(validated.trainer.callback_metrics["val_margin"].item(), abs=1e-5)
    assert len(same["generations"]) == 5
    assert same["task_pass_at_1"] == base["task_pass_at_1"] and 0.0 <= base["task_pass_at_1"][0] <= 1.0  # the same model, the same answers
    from lit_rlhf.evaluate import DEFAULT_PROMPTS

    assert report["preferred"]["rows"] == 5 - len(DEFAULT_PROMPTS) and 0 <= report["preferred"]["eos_share"][0] <= 1 and 0 < report["preferred"]["length"][0] <= 6
    text = (out / "report.md").read_text()
    assert f"The preferred (chosen) answers of the {5 - len(DEFAULT_PROMPTS)} held-out prompts, at the same length limit: ends with EOS" in text
    for section in ("## Quality and degeneration", "## Likelihood", "## Verifiable task", "## Reward models", "## Reward against KL", "## Generations",
                    "What's your morning routine like?"):  # fmt: skip
        assert section in text
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "report.json").read_text())["models"].keys() == {"base", "same"}
    assert list(out.glob("events.out.tfevents.*"))


def heldout_and_unseen(tmp_path, prompts: list[str]):
    """final.jsonl, a preference row for each of `prompts` (chosen "Yes, sure.", rejected "No."), and unseen.jsonl, one
    instruction row, in `tmp_path`. -> (final, unseen) paths"""
    final, unseen = tmp_path / "final.jsonl", tmp_path / "unseen.jsonl"
    final.write_text("".join(json.dumps({"prompt": p, "chosen": "Yes, sure.", "rejected": "No."}) + "\n" for p in prompts))
    unseen.write_text(json.dumps({"instruction": "Name a fish.", "response": "Tope."}) + "\n")
    return final, unseen


def test_the_prompts_come_from_the_heldout_dataset_when_given(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path):
    prompts = [f"Final question {i}?" for i in range(3)]
    final, unseen = heldout_and_unseen(tmp_path, prompts)
    report = main([
        "--models", json.dumps({"base": tiny_model_dir}), "--reward_model", tiny_reward_dir, "--data.dataset", str(real_rows),
        "--heldout_dataset", str(final), "--prompts", "[]", "--unseen_dataset", str(unseen), "--output_dir", str(tmp_path / "eval"),
        "--num_generation_prompts", "8", "--max_new_tokens", "4", "--data.max_length", "64", "--data.max_prompt_length", "32",
    ])  # fmt: skip
    assert report["prompts"] == prompts  # only its rows, none from --data.dataset
    assert report["judge"]["rows"] == 3 and len(report["models"]["base"]["generations"]) == 3
    assert f"`{final}`;" in (tmp_path / "eval" / "report.md").read_text()


def test_a_stopped_evaluation_resumes_from_the_model_it_was_on(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch):
    from lit_rlhf import evaluate

    final, unseen = heldout_and_unseen(tmp_path, [f"Question {i}?" for i in range(4)])
    out = tmp_path / "eval"
    args = ["--models", json.dumps({"base": tiny_model_dir, "same": tiny_model_dir}), "--reward_model", tiny_reward_dir,
            "--data.dataset", str(real_rows), "--heldout_dataset", str(final), "--prompts", "[]", "--unseen_dataset", str(unseen),
            "--output_dir", str(out), "--max_new_tokens", "4", "--data.max_length", "64", "--data.max_prompt_length", "32"]  # fmt: skip
    fresh = main(args)
    (out / "parts" / "model_same.json").unlink()  # stopped while evaluating `same`: `base` was saved, `same` not
    answered = []
    generate = evaluate.generate_answers
    monkeypatch.setattr(evaluate, "generate_answers", lambda *a, **k: answered.append(1) or generate(*a, **k))
    resumed = main([*args, "--resume", "true"])
    assert len(answered) == 2  # `same` alone, greedy and sampled: `base` was read back
    assert {k: v for k, v in resumed.items() if k != "seconds"} == {k: v for k, v in fresh.items() if k != "seconds"}
    assert resumed["models"]["same"]["win_rate"] == [0.5, 0.5, 0.5]  # against the base scores read back
    with pytest.raises(UserError, match=r"model_base.json was computed with other settings \(max_new_tokens\)"):
        main([*args, "--resume", "true", "--max_new_tokens", "5"])


def test_across_seeds_by_hand():
    def run(win_rate, kl, loop):
        scalars = {key: (0.0, 0.0, 0.0) for key, _ in SEEDED}
        return scalars | {"win_rate": win_rate, "sampled_kl": (kl, kl, kl), "loop_share": (loop, loop, loop)}

    report = {"models": {"base": run((0.5, 0.5, 0.5), 0.0, 0.2), "dpo@1": run((0.6, 0.52, 0.7), 4.0, 0.1),
                         "dpo@2": run((0.8, 0.7, 0.9), 6.0, 0.3), "ppo": run((0.7, 0.6, 0.8), 3.0, 0.2)}}  # fmt: skip
    seeds = across_seeds(report)
    assert list(seeds) == ["dpo"] and seeds["dpo"]["seeds"] == ["1", "2"]  # `ppo` and `base` are single runs
    dpo = seeds["dpo"]
    assert dpo["win_rate"]["mean"] == pytest.approx(0.7) and dpo["win_rate"]["sd"] == pytest.approx(math.sqrt(0.02))
    assert (dpo["sampled_kl"]["min"], dpo["sampled_kl"]["max"], dpo["sampled_kl"]["mean"]) == (4.0, 6.0, 5.0)
    assert dpo["loop_share"]["mean"] == pytest.approx(0.2) and dpo["lowest_win_rate_bound"] == 0.52
    assert "| dpo | 2 | 0.700 ± 0.141 (0.600–0.800) |" in "\n".join(seed_table(seeds, "base"))


def test_answer_table_by_hand():
    def run(win_rate, loop, eos, kl=0.0, length=100.0):
        return {"judge_reward": (0.0,) * 3, "win_rate": win_rate, "sampled_kl": (kl,) * 3, "loop_share": (loop,) * 3, "eos_share": (eos,) * 3, "length": (length,) * 3}

    report = {"models": {"base": run((0.5, 0.5, 0.5), 0.70, 0.40), "dpo@1": run((0.6, 0.52, 0.7), 0.72, 0.30, kl=4.0),
                         "dpo@2": run((0.8, 0.7, 0.9), 0.76, 0.40, kl=6.0), "ppo": run((0.45, 0.3, 0.55), 0.60, 0.50, length=180.0),
                         "sft": run((0.3, 0.2, 0.4), 0.70, 0.40)},  # fmt: skip
              "preferred": {"eos_share": (0.86, 0.8, 0.9), "length": (167.0, 150.0, 180.0)}}
    report["seeds"] = across_seeds(report)
    lines = answer_table(report, "base")
    assert lines[0].startswith("| model | better than base? |") and "ends with EOS (base 0.400, chosen 0.860)" in lines[0]
    # dpo: mean of the seeds (win 0.7, KL 5, looping 0.74 = +4 points, EOS 0.35 = -5 points); every seed's interval above 0.5
    assert lines[2] == "| dpo (2 seeds) | better | 0.700 ± 0.141 | 5.00 | 0.740 (+4 points) | 0.350 (-5 points) | 100 |"
    assert lines[3] == "| ppo | no clear difference | 0.450 [0.300, 0.550] | 0.00 | 0.600 (-10 points) | 0.500 (+10 points) | 180 |"
    assert lines[4].startswith("| sft | worse |") and len(lines) == 5  # no row for base or for single seeds of a recipe
    # seeds that disagree (one interval below 0.5, one above) say nothing clear; worse needs every seed's interval below
    mixed = {"models": {"base": report["models"]["base"], "rm@1": run((0.3, 0.2, 0.4), 0.7, 0.4), "rm@2": run((0.7, 0.6, 0.8), 0.7, 0.4),
                        "kto@1": run((0.3, 0.2, 0.4), 0.7, 0.4), "kto@2": run((0.35, 0.25, 0.45), 0.7, 0.4)}}  # fmt: skip
    mixed["seeds"] = across_seeds(mixed)
    assert [line.split(" | ")[1] for line in answer_table(mixed, "base")[2:]] == ["no clear difference", "worse"]


def test_a_judge_that_is_the_proxy_scores_each_answer_once(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch):
    from lit_rlhf import evaluate

    final, unseen = heldout_and_unseen(tmp_path, [f"Question {i}?" for i in range(3)])
    scored = []
    score = evaluate.sequence_scores
    monkeypatch.setattr(evaluate, "sequence_scores", lambda model, batch: scored.append(len(batch["input_ids"])) or score(model, batch))
    report = main([
        "--models", json.dumps({"base": tiny_model_dir}), "--reward_model", tiny_reward_dir, "--data.dataset", str(real_rows),
        "--heldout_dataset", str(final), "--prompts", "[]", "--unseen_dataset", str(unseen), "--output_dir", str(tmp_path / "eval"),
        "--max_new_tokens", "4", "--data.max_length", "64", "--data.max_prompt_length", "32",
    ])  # fmt: skip
    assert sum(scored) == 3 * 2 + 3  # the 3 pairs' chosen and rejected answers, then base's 3 answers: each once
    assert report["judge"] == {**report["proxy"], "independent": False}
    assert report["models"]["base"]["judge_reward"] == report["models"]["base"]["proxy_reward"]
