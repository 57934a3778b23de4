"""`lit-rlhf self-play-pairs`: the model's own answers as the rejected ones, the rows and their split kept."""

import json

import pytest
import torch

from conftest import make_causal_lm
from lit_rlhf import self_play
from lit_rlhf.data import PreferenceDataModule
from lit_rlhf.errors import UserError
from lit_rlhf.models import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny random model whose greedy answers are not blank: with the LM head tied to the embeddings, a random model
    repeats the prompt's last token, here the template's newline, which leaves an empty answer."""
    path = tmp_path_factory.mktemp("answering-llama")
    model = make_causal_lm(tokenizer)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def read(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def pairs(tiny_model_dir, rows, output, *flags) -> dict:
    return self_play.main(["--model", tiny_model_dir, "--dataset", str(rows), "--output", str(output), "--limit", "6",
                           "--max_new_tokens", "12", "--generation_precision", "fp32", "--generation_engine", "hf", *flags])  # fmt: skip


def test_rejected_answers_are_the_models_greedy_answers_and_the_rest_of_each_row_is_kept(tiny_model_dir, real_rows, tmp_path):
    summary = pairs(tiny_model_dir, real_rows, tmp_path / "rows.jsonl")
    written, source = read(tmp_path / "rows.jsonl"), read(real_rows)[:6]
    assert summary["rows"] == len(written) == 6
    tokenizer, model = load_tokenizer(tiny_model_dir), load_causal_lm(tiny_model_dir).eval()
    for row, original in zip(written, source):
        assert (row["prompt"], row["chosen"]) == (original["prompt"], original["chosen"])
        ids = tokenizer.apply_chat_template([{"role": "user", "content": original["prompt"]}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1] :].tolist()
        ended = tokenizer.eos_token_id in out
        answer = tokenizer.decode(out[: out.index(tokenizer.eos_token_id)] if ended else out, skip_special_tokens=True).strip()
        assert answer and (row["rejected"], row["rejected_source"]) == (answer, "model")


def test_an_empty_answer_keeps_the_datasets_rejected_answer_and_is_counted(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    real = self_play.task_answers

    def first_answer_empty(*args, **kwargs):
        answers = real(*args, **kwargs)
        return [{"response": [], "text": "", "eos": True}, *answers[1:]]

    monkeypatch.setattr(self_play, "task_answers", first_answer_empty)
    summary = pairs(tiny_model_dir, real_rows, tmp_path / "rows.jsonl")
    first, *rest = read(tmp_path / "rows.jsonl")
    assert summary["kept_dataset_rejected"] == 1
    assert first["rejected"] == read(real_rows)[0]["rejected"] and first["rejected_source"] == "dataset"
    assert all(row["rejected_source"] == "model" for row in rest)


def test_a_stage_reading_the_written_rows_holds_out_the_same_prompts(tiny_model_dir, real_rows, tmp_path):
    pairs(tiny_model_dir, real_rows, tmp_path / "rows.jsonl")

    def held_out(dataset) -> list[str]:
        dm = PreferenceDataModule(dataset=str(dataset), tokenizer_name_or_path=tiny_model_dir, limit=6, val_size=2, max_length=256, max_prompt_length=64)
        dm.setup("fit")
        return sorted(row["prompt_text"] for row in dm.val_rows)

    assert held_out(tmp_path / "rows.jsonl") == held_out(real_rows)


def test_an_existing_output_is_refused_and_bad_rows_fail_before_any_answer(tiny_model_dir, real_rows, tmp_path):
    existing = tmp_path / "rows.jsonl"
    existing.write_text("keep me\n")
    with pytest.raises(UserError, match="exists"):
        pairs(tiny_model_dir, real_rows, existing)
    assert existing.read_text() == "keep me\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "hello"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl: row 1: field 'rejected' is missing"):
        pairs(tiny_model_dir, bad, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
