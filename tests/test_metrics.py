"""Evaluation statistics checked on hand-made tensors and strings."""

import math

import pytest
import torch

from lit_rlhf.metrics import bootstrap_ci, distinct_n, has_loop, length_controlled_win_rate, wins


def test_bootstrap_interval_of_a_constant_is_the_constant():
    assert bootstrap_ci(torch.full((20,), 0.75)) == (0.75, 0.75, 0.75)


def test_bootstrap_interval_of_fair_coin_flips():
    # 100 flips, mean 0.5: the normal approximation gives 0.5 +- 1.96 * 0.05 = [0.402, 0.598]
    mean, low, high = bootstrap_ci(torch.tensor([0.0, 1.0] * 50))
    assert mean == 0.5 and low == pytest.approx(0.402, abs=0.03) and high == pytest.approx(0.598, abs=0.03)


def test_wins_count_ties_as_half():
    assert wins(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0])).tolist() == [1.0, 0.5, 0.0, 1.0]


def test_length_controlled_win_rate_by_hand():
    # shorter answers (diff -1) win half the time, longer ones (diff +1) three times in four: the fit gives
    # logit P = a + b z with a = (logit 0.5 + logit 0.75) / 2 = log(3) / 2, so the rate at equal length is
    # sigmoid(log(3) / 2) = sqrt(3) / (1 + sqrt(3)) = 0.6340 (the raw win-rate is 5 / 8 = 0.625)
    win = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    diff = torch.tensor([-1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0])
    assert length_controlled_win_rate(win, diff) == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)), abs=1e-3)


def test_length_controlled_win_rate_without_length_differences_is_the_win_rate():
    win = torch.tensor([1.0, 1.0, 0.5, 0.0, 1.0])
    assert length_controlled_win_rate(win, torch.zeros(5)) == pytest.approx(0.7, abs=1e-6)


def test_length_alone_cannot_buy_a_win():
    # every longer answer wins, every shorter one loses, equally often: at equal length, a coin flip
    win = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    diff = torch.tensor([5.0, 10.0, 20.0, -5.0, -10.0, -20.0])
    assert length_controlled_win_rate(win, diff) == pytest.approx(0.5, abs=1e-6)


def test_a_looping_answer_is_flagged_and_a_normal_one_is_not():
    looping = "I'm gonna make a whole bowl of scrambled eggs, bacon, sausage, sausage, sausage, sausage, sausage, sausage"
    assert has_loop(looping)
    echo = "it's a custom birthday gift that's been passed down, and it's a custom birthday gift that's been passed down, and it's a custom birthday gift"
    assert has_loop(echo)
    normal = "I wake up at six, make coffee, and go for a run. Then I read the news and start work at nine."
    assert not has_loop(normal)
    assert not has_loop("the cat and the dog and the bird")  # "the" three times is not a loop: no 4-gram repeats


def test_distinct_2_by_hand():
    # bigrams: (a b) (b a) (a b) | (c d): 3 unique of 4
    assert distinct_n(["a b a b", "c d"], 2) == 0.75
    assert distinct_n(["one"], 2) == 0.0


def test_degeneration_stats_by_hand():
    from lit_rlhf.monitor import degeneration_stats

    answers = [
        {"response": [1, 2, 3], "text": "Sure, see you then.", "eos": True},
        {"response": [4] * 9, "text": "I like it. I like it. I like it. I like it.", "eos": False},  # "i like it i" three times
        {"response": [5] * 6, "text": "Well, well, it depends.", "eos": False},
        {"response": [6, 7], "text": "No.", "eos": True},
    ]
    stats = degeneration_stats(answers)
    assert stats["eos_share"].item() == 0.5 and stats["loop_share"].item() == 0.25 and stats["mean_length"].item() == 5.0
