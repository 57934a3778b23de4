"""The evaluation report: log-prob by hand, self-comparison, boilerplate, files written."""

import json
import math

import pytest
import torch

from lit_rlhf.cli import cli
from lit_rlhf.evaluate import boilerplate_share, main, mean_answer_logprob, win_rate


class UniformLM(torch.nn.Module):
    """Logits that put 3/4 of the mass on token 1 and 1/4 on token 0 (vocab 2), everywhere."""

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, 2)
        logits[..., 1] = math.log(3.0)
        return type("Out", (), {"logits": logits})()


def test_mean_answer_logprob_by_hand():
    rows = [{"prompt": [0, 0], "chosen": [1, 1]}, {"prompt": [0], "chosen": [0, 1, 1, 1]}]
    # row 1: mean(log 3/4, log 3/4) = log 0.75; row 2: (log 1/4 + 3 log 3/4) / 4
    expected = (math.log(0.75) + (math.log(0.25) + 3 * math.log(0.75)) / 4) / 2
    assert math.isclose(mean_answer_logprob(UniformLM(), rows, pad_id=0, batch_size=2), expected, rel_tol=1e-5)


def test_win_rate_counts_ties_as_half():
    assert win_rate(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0])) == 0.625


def test_boilerplate_share_on_hand_made_strings():
    texts = [
        "As a digital AI assistant, I don't have a morning.",
        "Oh I love pancakes! 🥞",
        "As an AI, I cannot eat.",
        "I don't have personal experiences, but...",
        "Mornings are for coffee and a run.",
        "I'm sorry, but as a chatbot I can't celebrate birthdays.",
    ]
    assert boilerplate_share(texts) == 4 / 6
    assert boilerplate_share(["Haha, said no AI ever", "Gotta stay as an aide"]) == 0.0


def test_report_of_a_model_against_itself(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path):
    unseen = tmp_path / "unseen.jsonl"
    unseen.write_text("".join(json.dumps(r) + "\n" for r in [
        {"instruction": "Name a fish.", "context": "", "response": "Tope."},
        {"instruction": "Summarise.", "context": "The sky is blue.", "response": "Blue sky."},
    ]))  # fmt: skip
    out = tmp_path / "eval"
    data = ["--data.dataset", str(real_rows), "--data.limit", "30", "--data.val_size", "10", "--data.max_length", "64",
            "--data.max_prompt_length", "32"]  # fmt: skip
    report = main([
        "--models", json.dumps({"base": tiny_model_dir, "same": tiny_model_dir}), "--reward_model", tiny_reward_dir, *data,
        "--unseen_dataset", str(unseen), "--output_dir", str(out),
        "--num_generation_prompts", "5", "--max_new_tokens", "6", "--num_rows", "10", "--num_logprob_rows", "4",
    ])  # fmt: skip
    same = report["models"]["same"]
    assert same["win_rate"] == 0.5 and same["greedy_logratio"] == 0.0
    assert same["logprob_unseen"] == report["models"]["base"]["logprob_unseen"] < 0
    # the reward model's accuracy on the same held-out rows, counted by the reward trainer's own validation
    validated = cli(["validate", "--model", "lit_rlhf.reward.RewardModule", "--model.model_name_or_path", tiny_reward_dir,
                     *data, "--data.batch_size", "10", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert report["reward_model"]["rows"] == 10
    assert report["reward_model"]["accuracy"] == pytest.approx(validated.trainer.callback_metrics["val_accuracy"].item())
    assert report["reward_model"]["margin"] == pytest.approx(validated.trainer.callback_metrics["val_margin"].item(), abs=1e-5)
    assert len(same["generations"]) == 5
    text = (out / "report.md").read_text()
    for section in ("## Models", "## Reward model", "## Generations", "What's your morning routine like?"):
        assert section in text
    assert json.loads((out / "report.json").read_text())["models"].keys() == {"base", "same"}
    assert list(out.glob("events.out.tfevents.*"))
