"""Collator tensors, chat rendering, truncation, splits and every bad-input error."""

import json
import shutil

import datasets.config
import pytest
import torch
from transformers import AutoTokenizer

import lit_rlhf.tokenization
from conftest import CHATML
from lit_rlhf.commands import main
from lit_rlhf.data import PreferenceDataModule, collate_pairs, collate_prompts
from lit_rlhf.tokenization import render_completion, render_prompt
from lit_rlhf.errors import UserError
from lit_rlhf.loader import CountingDataLoader, ResumableBatchSampler
from lit_rlhf.ops import IGNORE_INDEX

EOS = PAD = 9  # pad == eos, as in SmolLM
X = IGNORE_INDEX


def test_collate_pairs_exact_and_keeps_eos_when_pad_is_eos():
    examples = [
        {"prompt": [1, 2], "chosen": [3, 4, EOS], "rejected": [5, EOS]},
        {"prompt": [6], "chosen": [7, EOS], "rejected": [8, 8, 8, EOS]},
    ]
    batch = collate_pairs(examples, pad_id=PAD)
    # rows: chosen 0, chosen 1, rejected 0, rejected 1; right padding to the longest row (5)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, EOS],
        [6, 7, EOS, PAD, PAD],
        [1, 2, 5, EOS, PAD],
        [6, 8, 8, 8, EOS],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],  # the real EOS at position 2 is attended; the pads after it are not
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]
    assert batch["labels"].tolist() == [
        [X, X, 3, 4, EOS],
        [X, 7, EOS, X, X],
        [X, X, 5, EOS, X],
        [X, 8, 8, 8, EOS],
    ]


def test_collate_prompts_left_pads():
    batch = collate_prompts([{"prompt": [1, 2, 3]}, {"prompt": [4]}], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [PAD, PAD, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_render_uses_the_chat_template(tokenizer):
    prompt = [{"role": "user", "content": "hi"}]
    assert render_prompt(tokenizer, prompt) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_completion(tokenizer, prompt, [{"role": "assistant", "content": "yo"}]) == "yo<|im_end|>"  # the end-of-turn token closes the completion


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_dm(tiny_model_dir, dataset, **kwargs):
    return PreferenceDataModule(dataset=str(dataset), tokenizer_name_or_path=tiny_model_dir, **kwargs)


ROW = {"prompt": "hello there", "chosen": "hi! :)", "rejected": "As an AI, I cannot."}


def test_datamodule_tokenizes_completion_only_labels(tiny_model_dir, tokenizer, tmp_path):
    dm = make_dm(tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", [ROW] * 3), val_size=0, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    chosen = batch["labels"][0][batch["labels"][0] != X].tolist()
    assert tokenizer.decode(chosen) == "hi! :)<|im_end|>"
    assert batch["input_ids"][0, : len(prompt_ids)].tolist() == list(prompt_ids)
    assert batch["input_ids"].shape[0] == 4  # 2 pairs -> [chosen; rejected]


def test_truncation_keeps_prompt_end_and_completion_start(tiny_model_dir, tokenizer, tmp_path):
    row = {"prompt": "p" * 50, "chosen": "c" * 50, "rejected": "r" * 50}
    dm = make_dm(tiny_model_dir, tmp_path / "x.jsonl", max_prompt_length=20, max_length=30)
    encoded = dm.encode(tokenizer, row, "here")
    assert encoded["truncated"]
    assert tokenizer.decode(encoded["prompt"]) == "p" * 7 + "<|im_end|>\n<|im_start|>assistant\n"  # last 20 = 7 + 13 template tokens
    assert tokenizer.decode(encoded["chosen"]) == "c" * 10
    dm_drop = make_dm(tiny_model_dir, tmp_path / "x.jsonl", max_prompt_length=20, max_length=30, truncation="drop")
    assert dm_drop.encode(tokenizer, row, "here") is None


def test_drop_policy_counts_dropped_rows(tiny_model_dir, tmp_path, caplog):
    rows = [dict(ROW, prompt=f"question {i}") for i in range(4)] + [{"prompt": "x" * 300, "chosen": "a", "rejected": "b"}]
    dm = make_dm(tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", rows), val_size=1, truncation="drop", max_prompt_length=100)
    with caplog.at_level("INFO"):
        dm.setup("fit")
    assert len(dm.train_rows) + len(dm.val_rows) == 4
    assert "5 rows, 0 truncated, 1 dropped" in caplog.text


def test_dropped_rows_leave_the_held_out_prompts_as_they_were(tiny_model_dir, real_rows, caplog):
    """The split is drawn before rows are dropped: a stage that drops long rows holds out the same prompts as
    one that keeps them all, so neither trains on the other's held-out prompts."""
    def split(**limits):
        dm = make_dm(tiny_model_dir, real_rows, limit=120, val_size=40, max_prompt_length=128, **limits)
        dm.setup("fit")
        return dm, {r["prompt_text"] for r in dm.val_rows}, {r["prompt_text"] for r in dm.train_rows}

    whole, whole_val, whole_train = split(max_length=2048)
    with pytest.warns(UserWarning, match=r"\d+ of the 40 held-out rows were dropped, which leaves \d+ for validation"):
        cut, cut_val, cut_train = split(max_length=800, truncation="drop")  # about half the rows
    assert len(whole.val_rows) == 40 and 0 < len(cut.val_rows) < 40 and len(cut.train_rows) < len(whole.train_rows)
    assert cut_val <= whole_val and cut_train <= whole_train

def test_split_is_deterministic_and_disjoint(tiny_model_dir, real_rows):
    splits = []
    for _ in range(2):
        dm = make_dm(tiny_model_dir, real_rows, limit=60, val_size=20, max_length=64, max_prompt_length=32)
        dm.setup("fit")
        splits.append(dm)
    assert len(splits[0].train_rows) == 40 and len(splits[0].val_rows) == 20
    assert [r["prompt"] for r in splits[0].val_rows] == [r["prompt"] for r in splits[1].val_rows]
    val_ids = {tuple(r["prompt"] + r["chosen"]) for r in splits[0].val_rows}
    assert not val_ids & {tuple(r["prompt"] + r["chosen"]) for r in splits[0].train_rows}


def test_shuffle_seed_changes_the_training_order_alone(tiny_model_dir, real_rows):
    def setup(**seeds):
        dm = make_dm(tiny_model_dir, real_rows, limit=60, val_size=20, max_length=64, max_prompt_length=32, batch_size=4, **seeds)
        dm.setup("fit")
        return dm, [i for batch in dm.train_dataloader().batch_sampler for i in batch]

    (plain, plain_order), (_, same_order), (other, other_order) = setup(), setup(shuffle_seed=42), setup(shuffle_seed=7)
    assert same_order == plain_order  # unset, the training order follows --data.seed (42)
    assert other_order != plain_order and sorted(other_order) == sorted(plain_order)
    assert [r["prompt"] for r in other.val_rows] == [r["prompt"] for r in plain.val_rows]
    assert [r["prompt"] for r in other.train_rows] == [r["prompt"] for r in plain.train_rows]


def count_encoded_rows(monkeypatch) -> list:
    """Every row tokenized from now on appends to the returned list (map runs in this process with num_proc 1)."""
    calls = []
    encode_messages = lit_rlhf.tokenization.encode_messages
    monkeypatch.setattr(lit_rlhf.tokenization, "encode_messages", lambda *args, **kwargs: calls.append(1) or encode_messages(*args, **kwargs))
    return calls


def test_tokenized_rows_are_cached_by_everything_that_changes_the_tokens(tiny_model_dir, tokenizer, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    rows = [ROW, {"prompt": "x" * 40, "chosen": "b", "rejected": "c"}, *[dict(ROW, prompt=f"q{i}") for i in range(4)]]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    other_template = tmp_path / "other-template"  # the same vocabulary; the template adds a system turn
    shutil.copytree(tiny_model_dir, other_template)
    AutoTokenizer.from_pretrained(tiny_model_dir, chat_template="<|im_start|>system\nbe brief<|im_end|>\n" + CHATML).save_pretrained(other_template)
    calls = count_encoded_rows(monkeypatch)

    def setup(dataset=path, tokenizer_dir=tiny_model_dir, **changes) -> PreferenceDataModule:
        calls.clear()
        dm = make_dm(tokenizer_dir, dataset, **{"val_size": 1, "max_length": 64, "max_prompt_length": 32} | changes)
        dm.setup("fit")
        return dm

    with caplog.at_level("INFO"):
        first = setup()
    assert len(calls) == 6 and "6 rows, 1 truncated, 0 dropped" in caplog.text and "tokens written to the cache" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        again = setup()
    assert calls == [] and "6 rows, 1 truncated, 0 dropped" in caplog.text and "tokens read from the cache" in caplog.text
    assert again.train_rows == first.train_rows and again.val_rows == first.val_rows and again.fingerprint == first.fingerprint
    changes = [{"max_length": 63}, {"max_prompt_length": 31}, {"truncation": "drop"}, {"mode": "prompts"}, {"offset": 1}, {"limit": 5},
               {"tokenizer_dir": str(other_template)}]  # fmt: skip
    for change in changes:
        assert setup(**change).fingerprint != first.fingerprint and len(calls) == 6 - ("offset" in change) - ("limit" in change), change
        setup(**change)
        assert calls == [], change  # cached in turn
    assert "be brief" in tokenizer.decode(setup(tokenizer_dir=str(other_template)).train_rows[0]["prompt"])
    write_jsonl(tmp_path / "d.jsonl", [*rows[:-1], dict(rows[-1], rejected="As an AI, I cannot!")])  # one character
    assert setup().fingerprint != first.fingerprint and len(calls) == 6


def test_two_tokenizing_processes_give_the_same_rows(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    dms = []
    for num_proc in (1, 2):
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / f"cache{num_proc}")  # each tokenizes
        dms.append(make_dm(tiny_model_dir, real_rows, limit=30, val_size=5, max_length=64, max_prompt_length=32, num_proc=num_proc))
        dms[-1].setup("fit")
    assert dms[0].train_rows == dms[1].train_rows and dms[0].val_rows == dms[1].val_rows
    assert len(list((tmp_path / "cache2/lit_rlhf/tokenized").glob("*_of_00002.arrow"))) == 2  # one file per process


def test_every_row_is_served_once_split_over_processes_in_equal_batch_counts(tiny_model_dir, real_rows):
    dm = make_dm(tiny_model_dir, real_rows, limit=11, val_size=2, batch_size=2, max_length=64, max_prompt_length=32)
    dm.setup("fit")
    shares = [[b["index"].tolist() for b in dm.every_row_dataloader(rank, 2)] for rank in (0, 1)]
    assert [len(batches) for batches in shares] == [3, 3]  # 6 rows; 5 and the last one repeated
    rows = [{i for batch in batches for i in batch} for batches in shares]
    assert not rows[0] & rows[1] and rows[0] | rows[1] == set(range(11))
    assert sorted(i for b in dm.every_row_dataloader() for i in b["index"].tolist()) == list(range(11))


def test_prompts_mode_needs_only_prompt(tiny_model_dir, tmp_path):
    dm = make_dm(tiny_model_dir, write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "bb"}]), mode="prompts", val_size=1, batch_size=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "prompt_text", "index", "columns"} and batch["columns"] == {}
    assert batch["prompt_text"][0] == ["a", "bb"][batch["index"][0]]  # the index names the row it came from


def test_prompts_mode_passes_the_rows_other_columns_through(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"{i} + {i} = ?", "answer": 2 * i, "level": "easy"} for i in range(6)]
    dm = make_dm(tiny_model_dir, write_jsonl(tmp_path / "p.jsonl", rows), mode="prompts", val_size=2, batch_size=2)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        assert batch["columns"] == {"answer": [2 * i for i in batch["index"].tolist()], "level": ["easy", "easy"]}


def test_chat_message_rows(tiny_model_dir, tokenizer, tmp_path):
    row = {
        "prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": "go away",
    }
    dm = make_dm(tiny_model_dir, tmp_path / "x.jsonl")
    encoded = dm.encode(tokenizer, row, "here")
    assert tokenizer.decode(encoded["prompt"]).startswith("<|im_start|>system\nbe nice<|im_end|>")
    assert tokenizer.decode(encoded["rejected"]) == "go away<|im_end|>"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "a", "chosen": "b"}, "row 2: field 'rejected' is missing"),
        ({"prompt": "a", "chosen": "  ", "rejected": "c"}, "row 2: field 'chosen' is empty"),
        ({"prompt": "a", "chosen": 5, "rejected": "c"}, "row 2: field 'chosen' must be a non-empty string or list"),
        ({"prompt": [{"role": "user"}], "chosen": "b", "rejected": "c"}, "row 2: field 'prompt' message 0 must be"),
        ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "b", "rejected": "c"}, "row 2: field 'prompt' message 0"),
        ({"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}, "row 2: field 'chosen' must end with a 'assistant' message"),
        (["a", "b", "c"], "row 2: expected an object"),
    ],
)
def test_bad_rows_name_file_row_and_field(tiny_model_dir, tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROW, row, ROW])
    with pytest.raises(UserError, match=f"bad.jsonl: {message}"):
        make_dm(tiny_model_dir, path, val_size=1).setup("fit")


def test_invalid_json_names_the_line(tiny_model_dir, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROW) + "\n{not json\n")
    with pytest.raises(UserError, match="broken.jsonl: line 2: invalid JSON"):
        make_dm(tiny_model_dir, path, val_size=1).setup("fit")


def test_unreadable_parquet(tiny_model_dir, tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(UserError, match="junk.parquet: cannot read it"):
        make_dm(tiny_model_dir, path, val_size=1).setup("fit")


def test_wrong_path_and_unreachable_hub(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="no such file or folder; pass a local"):
        make_dm(tiny_model_dir, tmp_path / "missing.jsonl").setup("fit")
    with pytest.raises(UserError, match="could not load dataset 'nobody/no-such-dataset'.*pass a local file"):
        make_dm(tiny_model_dir, "nobody/no-such-dataset").setup("fit")


def test_too_few_rows_for_validation(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="2 usable rows leave none for training with --data.val_size 5"):
        make_dm(tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", [ROW] * 2), val_size=5).setup("fit")


def test_cli_prints_one_line_error_without_traceback(tiny_model_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROW, {"prompt": "a", "chosen": "", "rejected": "c"}])
    args = ["fit", "--model", "lit_rlhf.reward.RewardModule", "--model.model_name_or_path", tiny_model_dir,
            "--data.dataset", path, "--data.val_size", "1", "--trainer.logger", "false"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert str(exit_info.value) == f"lit-rlhf: error: {path}: row 2: field 'chosen' is empty"


def shares(num_rows: int, batch_size: int, world_size: int, shuffle: bool) -> list[list[list[int]]]:
    """The batches each of `world_size` processes draws in the first epoch, seed 3."""
    return [list(ResumableBatchSampler(num_rows, batch_size, shuffle, 3, rank, world_size)) for rank in range(world_size)]


def test_batches_a_step_takes_count_against_the_epochs_limit():
    """6 batches of 2 rows, the epoch limited to 4: the loop's first batch, one a step takes (`next_batch`, PPO's
    dynamic sampling), then the loop's next two; the epoch ends there, as it would have after 4 steps."""
    loader = CountingDataLoader(list(range(12)), batch_sampler=ResumableBatchSampler(12, 2, shuffle=False))
    loader.limit = 4
    epoch = iter(loader)
    taken = [next(epoch).tolist(), loader.next_batch().tolist()] + [batch.tolist() for batch in epoch]
    assert taken == [[0, 1], [2, 3], [4, 5], [6, 7]] and loader.next_batch() is None and loader.batch_sampler.batches_done == 4


def test_training_shards_are_disjoint_equal_and_add_up_to_the_one_process_batches():
    two = shares(11, 2, 2, shuffle=True)  # 11 rows: one is cut so that both processes have 5 rows
    one = shares(11, 4, 1, shuffle=True)[0]  # one process, batch size 2 x 2
    assert [len(r) for r in two] == [3, 3] and [len(ResumableBatchSampler(11, 2, rank=r, world_size=2)) for r in (0, 1)] == [3, 3]
    seen = [row for share in two for batch in share for row in batch]
    assert len(seen) == len(set(seen)) == 10
    for step in range(3):  # the processes' batches of a step are the one-process batch of that step
        assert sorted(two[0][step] + two[1][step]) == sorted(one[step][: len(two[0][step]) * 2])
    torch.manual_seed(1)
    assert shares(11, 2, 2, shuffle=True) == two  # the order is the seed's, not the global RNG's


def test_validation_shards_serve_every_row_once():
    val = shares(5, 2, 2, shuffle=False)
    assert val == [[[0, 2], [4]], [[1, 3]]]  # uneven counts, nothing cut or repeated


def test_length_grouped_batches_cover_every_row_once_with_less_padding_and_resume():
    lengths = [(7 * i) % 97 + 3 for i in range(400)]  # 400 rows of lengths 3..99
    grouped = ResumableBatchSampler(400, 4, seed=3, lengths=lengths)
    batches = list(grouped)
    assert sorted(row for batch in batches for row in batch) == list(range(400))  # a permutation: nothing dropped or repeated

    def padding(batches):  # padded minus real tokens, batches padded to their longest row
        return sum(max(lengths[r] for r in b) * len(b) - sum(lengths[r] for r in b) for b in batches)

    plain = list(ResumableBatchSampler(400, 4, seed=3))
    assert padding(batches) < padding(plain) / 5  # 50 batches sorted together: neighbours differ by ~0.5 tokens
    assert list(ResumableBatchSampler(400, 4, seed=3, lengths=lengths)) == batches  # the seed's order
    assert list(ResumableBatchSampler(400, 4, seed=4, lengths=lengths)) != batches
    # global batches of 2 processes x 2 rows are the 1-process batches of 4
    two = [list(ResumableBatchSampler(400, 2, seed=3, rank=r, world_size=2, lengths=lengths)) for r in (0, 1)]
    assert [sorted(a + b) for a, b in zip(*two)] == [sorted(b) for b in batches]
    # resumed after 7 batches, the sampler serves the remaining ones
    resumed = ResumableBatchSampler(400, 4, seed=3, lengths=lengths)
    resumed.load_state_dict({"seed": 3, "epoch": 0, "batches_done": 7})
    assert list(resumed) == batches[7:]


def test_split_by_prompt_keeps_each_prompt_on_one_side_and_holds_out_val_size_rows():
    from lit_rlhf.data import split_by_prompt

    prompts = [1, 1, 1, 2, 3, 4, 4, 5, 6, 7]
    for seed in range(20):
        val, train = split_by_prompt(prompts, 4, seed)
        assert len(val) == 4 and sorted(val + train) == list(range(10))
        assert not {prompts[i] for i in val} & {prompts[i] for i in train}
    distinct = list(range(10))  # distinct prompts: the first val_size rows of the seeded order
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert split_by_prompt(distinct, 4, 3) == (order[:4], order[4:])
