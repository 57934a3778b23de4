"""benchmarks/equal_time.py's own logic on hand-made data: the wall-time stop, the head-to-head win-rate, the rows a
step reads, and the TRL DPO run's rows and settings taken from a lit-rlhf run's config."""

import sys
from pathlib import Path

import pytest
from transformers import TrainerControl

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import equal_time  # noqa: E402


def test_deadline_stops_at_the_first_step_end_at_or_after_it():
    now = [99.0]
    control = TrainerControl()
    deadline = equal_time.Deadline(100.0, clock=lambda: now[0])
    assert not deadline.on_step_end(None, None, control).should_training_stop
    now[0] = 100.0
    assert deadline.on_step_end(None, None, control).should_training_stop


def test_hard_deadline_raises_only_when_time_is_up():
    now = [5.0]
    deadline = equal_time.Deadline(10.0, hard=True, clock=lambda: now[0])
    deadline.on_step_end(None, None, TrainerControl())  # not yet
    now[0] = 12.0
    with pytest.raises(equal_time.TimeUp):
        deadline.on_step_end(None, None, TrainerControl())


def test_head_to_head_counts_ties_as_half_and_is_ordered():
    report = {"models": {"lit_dpo": {"judge_scores": [1.0, 2.0, 3.0, 0.5] * 5}, "trl_dpo": {"judge_scores": [0.0, 2.0, 4.0, 0.1] * 5}}}
    mean, low, high = equal_time.head_to_head(report, "lit_dpo", "trl_dpo")  # per prompt: win, tie, loss, win
    assert mean == 0.625 and low < mean < high
    assert equal_time.head_to_head(report, "trl_dpo", "lit_dpo")[0] == 0.375


def test_rows_per_step():
    dpo = {"model": {"init_args": {}}, "data": {"batch_size": 4}, "trainer": {"accumulate_grad_batches": 2}}
    ppo = {"model": {"init_args": {"num_generations": 1, "ppo_epochs": 2, "num_minibatches": 1}}, "data": {"batch_size": 8}}
    assert equal_time.rows_per_step("dpo", dpo) == 8  # pairs
    assert equal_time.rows_per_step("ppo", ppo) == 4  # 8 rollouts over 2 optimizer steps


def test_trl_dpo_trains_on_lit_rlhfs_training_rows_with_its_settings(tiny_model_dir, real_rows):
    from lit_rlhf.data import PreferenceDataModule

    model = {"model_name_or_path": tiny_model_dir, "learning_rate": 1e-5, "warmup_steps": 2, "weight_decay": 0.0, "loss_type": "sigmoid",
             "lora_r": 0, "rpo_alpha": 0.5, "beta": 0.1, "gradient_checkpointing": True, "lr_scheduler": "linear"}  # fmt: skip
    data = {"dataset": str(real_rows), "mode": "pairs", "max_length": 256, "max_prompt_length": 64, "batch_size": 4, "limit": 40, "val_size": 10, "offset": 5}
    config = {"model": {"init_args": model}, "data": data, "trainer": {"precision": "32-true", "accumulate_grad_batches": 2, "gradient_clip_val": None},
              "seed_everything": 42}  # fmt: skip
    spec = equal_time.trl_spec("dpo", config, steps=12)
    dm = PreferenceDataModule(**data, tokenizer_name_or_path=tiny_model_dir)
    dm.setup("fit")
    assert [row["prompt"][-1]["content"] for row in spec["rows"]] == [row["prompt_text"] for row in dm.train_rows]
    assert len(spec["rows"]) == 30 and {row["prompt_text"] for row in dm.val_rows}.isdisjoint(row["prompt"][-1]["content"] for row in spec["rows"])
    assert spec["config"]["loss_type"] == ["sigmoid", "sft"] and spec["config"]["loss_weights"] == [1.0, 0.5]  # rpo_alpha: TRL's sft term
    assert spec["config"]["max_grad_norm"] == 0.0 and spec["config"]["bf16"] is False and spec["config"]["gradient_accumulation_steps"] == 2
    # lit-rlhf's rate decays to 0 at its 12th step: TRL's decays over the same 12 steps and stops there
    assert (spec["config"]["lr_scheduler_type"], spec["config"]["max_steps"]) == ("linear", 12)
    constant = equal_time.trl_spec("dpo", config | {"model": {"init_args": model | {"lr_scheduler": "constant"}}}, steps=12)["config"]
    assert (constant["lr_scheduler_type"], constant["max_steps"]) == ("constant_with_warmup", equal_time.FOREVER)  # trains until time is up
