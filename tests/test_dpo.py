"""DPO module: the loss at the start, reference modes, padding, LoRA, and fit -> export -> reload."""

import math
import sys
import types
from contextlib import nullcontext
from pathlib import Path

import datasets.config
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from transformers import AutoModelForCausalLM

from conftest import fit_args, make_causal_lm
from lit_rlhf.cli import cli
from lit_rlhf import DPOModule, PreferenceDataModule, sequence_logps
from lit_rlhf.forward import token_logps


@pytest.fixture(scope="module")
def datamodule(tiny_model_dir, real_rows):
    dm = PreferenceDataModule(
        dataset=str(real_rows), tokenizer_name_or_path=tiny_model_dir, limit=10, val_size=2, batch_size=4,
        max_length=64, max_prompt_length=32,
    )  # fmt: skip
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tokenizer) -> str:
    """A second tiny model with other weights, to act as a reference that differs from the policy."""
    path = tmp_path_factory.mktemp("other-llama")
    make_causal_lm(tokenizer, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def in_precision(precision: str):
    """The context the Trainer runs a forward in (bf16-mixed: Lightning's CPU autocast)."""
    return MixedPrecision(precision, "cpu").forward_context() if precision != "32-true" else nullcontext()


def step0_loss(module, batch, precision="32-true"):
    with torch.no_grad(), in_precision(precision):
        return module.shared_step(batch, "val").item()


def with_precomputed_reference(module, datamodule, precision="32-true"):
    """What `fit` does for `precompute_ref_logps` in one process: make room for every row, fill it, free the reference."""
    module.trainer = types.SimpleNamespace(datamodule=datamodule)
    module.setup("fit")
    with in_precision(precision):
        module.ref_logps_cache.copy_(module.reference_share(datamodule.every_row_dataloader()))
    module.ref_model = None
    module.trainer = None
    return module


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("mode", [{}, {"lora_r": 4}, {"precompute_ref_logps": True}, {"precompute_ref_logps": True, "lora_r": 4}])
def test_step0_loss_is_log_2_in_every_reference_mode(tiny_model_dir, datamodule, mode, precision):
    module = DPOModule(model_name_or_path=tiny_model_dir, **mode)
    if mode.get("precompute_ref_logps"):
        with_precomputed_reference(module, datamodule, precision)
        assert module.ref_model is None and module.ref_logps_cache.shape == (10, 2)
        assert not module.ref_logps_cache.isnan().any()
    batch = datamodule.train_dataloader().collate_fn(datamodule.train_rows[:4])
    assert math.isclose(step0_loss(module, batch, precision), math.log(2), abs_tol=1e-6)
    assert module.val_metrics["val_rewards/chosen"].compute().item() == pytest.approx(0.0, abs=1e-6)


def test_rpo_adds_the_chosen_answers_token_nll_at_step_0(tiny_model_dir, datamodule):
    module = DPOModule(model_name_or_path=tiny_model_dir, rpo_alpha=0.5)
    batch = datamodule.train_dataloader().collate_fn(datamodule.train_rows[:4])
    with torch.no_grad():
        chosen_logps = sequence_logps(module.model, batch)[:4]
    chosen_tokens = sum(len(r["chosen"]) for r in datamodule.train_rows[:4])
    expected = math.log(2) + 0.5 * (-chosen_logps.sum().item() / chosen_tokens)
    assert step0_loss(module, batch) == pytest.approx(expected, rel=1e-5)
    assert module.val_metrics["val_nll_loss"].compute().item() == pytest.approx(-chosen_logps.sum().item() / chosen_tokens, rel=1e-5)


def test_precomputed_reference_matches_live_reference(tiny_model_dir, other_model_dir, datamodule):
    live = DPOModule(model_name_or_path=tiny_model_dir, ref_model_name_or_path=other_model_dir)
    pre = DPOModule(model_name_or_path=tiny_model_dir, ref_model_name_or_path=other_model_dir, precompute_ref_logps=True)
    with_precomputed_reference(pre, datamodule)
    batch = datamodule.train_dataloader().collate_fn(datamodule.train_rows[2:6])
    live_loss, pre_loss = step0_loss(live, batch), step0_loss(pre, batch)
    assert live_loss == pytest.approx(pre_loss, abs=1e-5)
    assert abs(live_loss - math.log(2)) > 1e-3  # a different reference really changes the loss


def test_precomputed_reference_is_kept_in_checkpoints_and_not_recomputed(tiny_model_dir, other_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = dpo_args(tiny_model_dir, real_rows, "--model.ref_model_name_or_path", other_model_dir, "--model.precompute_ref_logps", "true",
                    "--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1")  # fmt: skip
    first = cli(args)
    cache = first.model.ref_logps_cache.clone()
    assert cache.shape == (16, 2) and not cache.isnan().any()
    ckpt = tmp_path / "logs/dpo/version_0/checkpoints/epoch=0-step=1.ckpt"
    assert torch.equal(torch.load(ckpt, weights_only=False)["state_dict"]["ref_logps_cache"], cache)
    calls = []
    monkeypatch.setattr(DPOModule, "live_reference_logps", lambda self, batch: calls.append(1))
    resumed = cli([*args, "--ckpt_path", str(ckpt)])
    assert calls == [] and torch.equal(resumed.model.ref_logps_cache, cache)
    assert resumed.trainer.global_step == 3


def test_precomputed_reference_is_cached_on_disk_by_reference_and_rows(tiny_model_dir, other_model_dir, real_rows, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    args = dpo_args(tiny_model_dir, real_rows, "--model.ref_model_name_or_path", other_model_dir, "--model.precompute_ref_logps", "true",
                    "--trainer.max_steps", "1")  # fmt: skip
    computed, live = [], DPOModule.live_reference_logps
    counting = lambda self, batch: computed.extend(batch["index"].tolist()) or live(self, batch)  # noqa: E731
    monkeypatch.setattr(DPOModule, "live_reference_logps", counting)
    first = cli(args)
    table = first.model.ref_logps_cache
    files = list((tmp_path / "cache/lit_rlhf/ref_logps").glob("*.pt"))
    assert sorted(computed) == list(range(16)) and len(files) == 1
    assert torch.equal(torch.load(files[0]), table) and not table.isnan().any()
    # the same reference and rows: read from the file, never computed
    monkeypatch.setattr(DPOModule, "live_reference_logps", lambda self, batch: pytest.fail("recomputed the cached reference log-probs"))
    with caplog.at_level("INFO"):
        second = cli(args)
    assert torch.equal(second.model.ref_logps_cache, table) and f"reference log-probs of 16 rows read from {files[0]}" in caplog.text
    # another max_length: other tokens, so computed again and cached beside the first
    computed.clear()
    monkeypatch.setattr(DPOModule, "live_reference_logps", counting)
    third = cli([*args, "--data.max_length", "48"])
    assert sorted(computed) == list(range(16)) and len(list((tmp_path / "cache/lit_rlhf/ref_logps").glob("*.pt"))) == 2
    assert not torch.allclose(third.model.ref_logps_cache, table)


def test_sequence_logps_do_not_depend_on_right_padding(tiny_model_dir, datamodule):
    module = DPOModule(model_name_or_path=tiny_model_dir)
    batch = datamodule.train_dataloader().collate_fn(datamodule.train_rows[:4])
    pad = torch.full((batch["input_ids"].shape[0], 7), module.tokenizer.pad_token_id)
    padded = {
        "input_ids": torch.cat([batch["input_ids"], pad], 1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.zeros_like(pad)], 1),
        "labels": torch.cat([batch["labels"], torch.full_like(pad, -100)], 1),
    }
    with torch.no_grad():
        assert torch.allclose(sequence_logps(module.model, batch), sequence_logps(module.model, padded), atol=1e-4)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_token_logps_equal_log_softmax_of_the_models_own_logits(tiny_model_dir, datamodule, lora_r):
    """The head on label positions in chunks (forward.token_logps) against the model's full forward, values and gradients."""
    module = DPOModule(model_name_or_path=tiny_model_dir, lora_r=lora_r)
    batch = datamodule.train_dataloader().collate_fn(datamodule.train_rows[:4])
    labels = batch["labels"][:, 1:]
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]  # (B, T-1, V), left-aligned rows
    expected = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != -100)
    trained = [p for p in module.model.parameters() if p.requires_grad]
    expected_grads = torch.autograd.grad(expected.sum(), trained)
    logps = token_logps(module.model, batch)
    assert logps.dtype == torch.float32 and torch.allclose(logps, expected, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(torch.autograd.grad(logps.sum(), trained), expected_grads))


def dpo_args(model_dir, dataset, *extra):
    return ["fit", *fit_args("lit_rlhf.dpo.DPOModule", model_dir, dataset, "--model.learning_rate", "1e-3", "--data.limit", "16",
                             "--data.val_size", "4", "--data.batch_size", "4", "--trainer.max_steps", "3", *extra,
                             model_summary=True, sanity_val_steps=None)]  # fmt: skip


def test_fit_export_reload_same_logits(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = cli(dpo_args(tiny_model_dir, real_rows))
    ckpt = torch.load(tmp_path / "logs/dpo/version_0/checkpoints/last.ckpt", weights_only=False)
    assert not any(k.startswith("ref_model.") for k in ckpt["state_dict"])  # reloaded from source, not stored
    card = (tmp_path / "logs/dpo/version_0/hf/README.md").read_text()
    assert f"base model: `{tiny_model_dir}`" in card and "beta: 0.1" in card and "rewards/accuracies" in card
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "logs/dpo/version_0/hf")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, run.model.model(ids).logits, atol=1e-5)
        start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        assert not torch.allclose(reloaded(ids).logits, start(ids).logits, atol=1e-4)  # it trained


def test_lora_trains_adapter_leaves_base_identical_and_exports_merged(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().items()}
    run = cli(dpo_args(tiny_model_dir, real_rows, "--model.lora_r", "4"))
    assert run.model.ref_model is None  # the reference is the policy with the adapter disabled
    state = run.model.model.state_dict()
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
    assert base.keys() == start.keys()
    assert all(torch.equal(base[k], start[k]) for k in start)
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # B starts at 0: it moved
    out = Path("logs/dpo/version_0/hf")
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, run.model.model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("lora", [[], ["--model.lora_r", "4"]])
def test_gradient_checkpointing_recomputes_layers_and_trains_the_same(tiny_model_dir, real_rows, tmp_path, monkeypatch, lora):
    monkeypatch.chdir(tmp_path)
    mlp_calls, weights = [], []
    for checkpointing in ("false", "true"):
        run = cli(dpo_args(tiny_model_dir, real_rows, *lora, "--model.gradient_checkpointing", checkpointing, "--trainer.max_steps", "1",
                           "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0", "--seed_everything", "0")[1:], run=False)  # fmt: skip
        calls = []
        mlp = next(m for name, m in run.model.model.named_modules() if name.endswith("layers.0.mlp"))
        mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # a post-hook can miss the recompute: it stops early
        run.trainer.fit(run.model, datamodule=run.datamodule)
        mlp_calls.append(len(calls))
        weights.append({k: v.clone() for k, v in run.model.model.state_dict().items()})
    assert mlp_calls[1] == mlp_calls[0] + 1  # the policy's layer ran again in the backward pass
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])


# ---- the preference-loss table and plug-ins ---------------------------------------------------


def test_apo_zero_starts_at_1_and_reference_free_losses_load_no_reference(tiny_model_dir, datamodule):
    batch = datamodule.train_dataloader().collate_fn(datamodule.train_rows[:4])
    assert math.isclose(step0_loss(DPOModule(model_name_or_path=tiny_model_dir, loss_type="apo_zero"), batch), 1.0, abs_tol=1e-6)
    for loss_type in ("simpo", "orpo"):
        module = DPOModule(model_name_or_path=tiny_model_dir, loss_type=loss_type)
        assert module.ref_model is None and not module.needs_reference
        assert not any(name.startswith("ref_model") for name, _ in module.named_parameters())


def test_a_reference_free_loss_uses_less_memory_than_dpo(tiny_model_dir):
    dpo, simpo = DPOModule(model_name_or_path=tiny_model_dir), DPOModule(model_name_or_path=tiny_model_dir, loss_type="simpo")
    weights = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert weights(simpo) * 2 == weights(dpo)  # DPO holds a frozen copy of the policy, SimPO holds none


PLUGIN = '''
import torch.nn.functional as F


def margin_loss(chosen_logps, rejected_logps, beta):
    """A reference-free logistic loss on the log-likelihood difference."""
    return -F.logsigmoid(beta * (chosen_logps - rejected_logps))


def bad_loss(chosen, rejected):
    return chosen - rejected
'''


@pytest.mark.parametrize("spec", ["my_losses:margin_loss", "plugins/my_losses.py:margin_loss"])
def test_a_loss_from_the_users_own_file_trains_by_flag(tiny_model_dir, real_rows, tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / ("plugins" if "/" in spec else "")
    folder.mkdir(exist_ok=True)
    (folder / "my_losses.py").write_text(PLUGIN)
    monkeypatch.delitem(sys.modules, "my_losses", raising=False)  # imported from this test's folder, not an earlier one's
    run = cli(dpo_args(tiny_model_dir, real_rows, "--model.loss_type", spec, "--trainer.limit_val_batches", "0"))
    assert run.trainer.global_step == 3 and run.model.ref_model is None  # it declares no reference log-probs
    assert run.model.preference_loss.__name__ == "margin_loss"
    assert run.trainer.callback_metrics["rewards/margins"] > 0  # chosen pulled above rejected


def test_a_loss_with_a_wrong_signature_says_what_is_provided(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    from test_reliability import fail

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_losses.py").write_text(PLUGIN)
    message = fail(dpo_args(tiny_model_dir, real_rows, "--model.loss_type", "my_losses.py:bad_loss"))
    assert "--model.loss_type: bad_loss(chosen, rejected) requires chosen, rejected, which is not provided; a preference loss is" in message
    assert "called with any of the keyword arguments chosen_logps, rejected_logps, chosen_lengths" in message
    from lit_rlhf.losses import PREFERENCE_LOSSES

    assert fail(dpo_args(tiny_model_dir, real_rows, "--model.loss_type", "simpoo")).endswith(
        f"--model.loss_type simpoo: not one of {', '.join(PREFERENCE_LOSSES)}, nor an import path module:function"
    )


# ---- KTO: unpaired rows ---------------------------------------------------------------------


def unpaired_rows_file(real_rows, path: Path, n: int = 16) -> Path:
    """`n` unpaired rows from the real pairs: alternately the chosen answer (desirable) and the rejected one."""
    import json

    pairs = [json.loads(line) for line in real_rows.read_text().splitlines()[:n]]
    rows = [{"prompt": p["prompt"], "completion": p["chosen" if i % 2 == 0 else "rejected"], "label": i % 2 == 0} for i, p in enumerate(pairs)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_kto_starts_at_one_half_and_its_batch_holds_each_prompt_with_the_next_rows_completion(tiny_model_dir, real_rows, tmp_path):
    dm = PreferenceDataModule(dataset=str(real_rows), tokenizer_name_or_path=tiny_model_dir, mode="unpaired", split_pairs=True,
                              limit=6, val_size=2, batch_size=3, max_length=64, max_prompt_length=32)  # fmt: skip
    dm.setup("fit")
    assert len(dm.train_rows) + len(dm.val_rows) == 12 and sum(r["label"] for r in dm.train_rows + dm.val_rows) == 6
    rows = dm.train_rows[:3]
    batch = dm.train_dataloader().collate_fn(rows)
    assert batch["input_ids"].shape[0] == 6 and batch["label"].tolist() == [r["label"] for r in rows]
    for i in range(3):  # row 3 + i: prompt i with the completion of row (i + 1) mod 3
        n = len(rows[i]["prompt"]) + len(rows[(i + 1) % 3]["completion"])
        assert batch["input_ids"][3 + i, :n].tolist() == rows[i]["prompt"] + rows[(i + 1) % 3]["completion"]
    module = DPOModule(model_name_or_path=tiny_model_dir, loss_type="kto")
    assert module.unpaired and module.ref_model is not None
    assert math.isclose(step0_loss(module, batch), 0.5, abs_tol=1e-6)


def test_kto_reference_point_is_the_mean_over_every_processs_rows(tiny_model_dir, real_rows, monkeypatch):
    """Two processes: z = max(0, mean of log pi(y'|x) - log ref(y'|x)) over both batches' mismatched rows, as one
    process with the whole batch would compute it. Here this process's rows give 0 (policy == reference) and
    the other process's (a stand-in for the all-gather) 2, so z = 1 where this process alone would use 0."""
    dm = PreferenceDataModule(dataset=str(real_rows), tokenizer_name_or_path=tiny_model_dir, mode="unpaired", split_pairs=True,
                              limit=6, val_size=2, batch_size=4, max_length=64, max_prompt_length=32)  # fmt: skip
    dm.setup("fit")
    batch = dm.train_dataloader().collate_fn([row for row in dm.train_rows if row["label"]][:3])  # desirable rows
    module = DPOModule(model_name_or_path=tiny_model_dir, loss_type="kto", beta=0.1)
    gathered = iter([2.0, 0.0])  # what the other process adds: policy log-probs 2 above, reference ones 0 above this one's
    monkeypatch.setattr(module, "all_gather", lambda t: torch.stack([t, t + next(gathered)]))
    module._trainer = types.SimpleNamespace(world_size=2)
    logged = {}
    monkeypatch.setattr(module, "log_stats", lambda stats, stage, batch_size: logged.update(stats))
    with torch.no_grad():
        loss = module.unpaired_step(batch, "train").item()
    assert logged["kl"].item() == pytest.approx(1.0, abs=1e-5)
    # r = 0 on every (desirable) row: 1 - sigmoid(0.1 * (0 - z)) = 0.52498 with z = 1; z = 0 would give 0.5
    assert batch["label"].all() and loss == pytest.approx(1 - 1 / (1 + math.exp(0.1)), abs=1e-5)


@pytest.mark.parametrize("data", ["unpaired rows", "split pairs"])
def test_kto_trains_on_unpaired_rows_and_on_split_pairs(tiny_model_dir, real_rows, tmp_path, monkeypatch, data):
    monkeypatch.chdir(tmp_path)
    dataset = unpaired_rows_file(real_rows, tmp_path / "unpaired.jsonl") if data == "unpaired rows" else real_rows
    split = ["--data.split_pairs", "true"] if data == "split pairs" else []
    run = cli(dpo_args(tiny_model_dir, dataset, "--model.loss_type", "kto", "--data.mode", "unpaired", *split, "--trainer.limit_val_batches", "0"))
    assert run.trainer.global_step == 3
    assert {"rewards/chosen", "rewards/rejected", "kl"} <= run.trainer.callback_metrics.keys()
    assert (tmp_path / "logs/dpo/version_0/hf/model.safetensors").is_file()


def test_kto_refuses_pairs_and_pairs_losses_refuse_unpaired_rows(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    from test_reliability import fail

    monkeypatch.chdir(tmp_path)
    message = fail(dpo_args(tiny_model_dir, real_rows, "--model.loss_type", "kto"))
    assert message.endswith("--model.loss_type kto reads unpaired rows: set --data.mode unpaired (--data.split_pairs true reads preference pairs as unpaired rows)")
    message = fail(dpo_args(tiny_model_dir, real_rows, "--model.loss_type", "kto", "--data.mode", "unpaired"))
    assert "row 1: field 'label' must be true (desirable) or false (undesirable), got None; preference pairs: pass --data.split_pairs true" in message
    unpaired = unpaired_rows_file(real_rows, tmp_path / "unpaired.jsonl")
    assert fail(dpo_args(tiny_model_dir, unpaired, "--data.mode", "unpaired")).endswith("--model.loss_type sigmoid reads pairs rows: set --data.mode pairs")


def test_validation_logs_the_share_of_held_out_answers_that_end_and_that_loop(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    """The callback answers the first --generations.num_prompts held-out prompts and logs what the answers show;
    with real generation the length stays within --generations.max_new_tokens."""
    import lit_rlhf.monitor

    monkeypatch.chdir(tmp_path)
    flags = ("--trainer.limit_val_batches", "1", "--generations.num_prompts", "3", "--generations.max_new_tokens", "7")
    run = cli(dpo_args(tiny_model_dir, real_rows, *flags))
    metrics = run.trainer.callback_metrics
    assert 0 <= metrics["val_generations/eos_share"] <= 1 and 1 <= metrics["val_generations/mean_length"] <= 7
    asked = []

    def fake_answers(model, tokenizer, prompts, max_new_tokens, batch_size):
        asked.append((prompts, max_new_tokens))
        return [{"response": [1] * 7, "text": "yes yes yes yes yes yes yes", "eos": False}, {"response": [2], "text": "no", "eos": True},
                {"response": [3] * 4, "text": "maybe so", "eos": True}]  # fmt: skip

    monkeypatch.setattr(lit_rlhf.monitor, "generate_answers", fake_answers)
    run.trainer.validate(run.model, datamodule=run.datamodule, verbose=False)
    assert asked == [([row["prompt"] for row in run.datamodule.val_rows[:3]], 7)]
    metrics = run.trainer.callback_metrics
    assert metrics["val_generations/eos_share"].item() == pytest.approx(2 / 3)
    assert metrics["val_generations/loop_share"].item() == pytest.approx(1 / 3) and metrics["val_generations/mean_length"].item() == 4.0
    monitor = next(c for c in run.trainer.callbacks if isinstance(c, lit_rlhf.monitor.GenerationMonitor))
    monitor.max_new_tokens = None  # the default: a policy without a rollout length (DPO) answers up to 256 tokens
    run.trainer.validate(run.model, datamodule=run.datamodule, verbose=False)
    assert asked[-1][1] == 256


def test_validation_logs_greedy_pass_at_1_and_sampled_pass_at_k_without_touching_the_runs_random_stream(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    """3 held-out prompts, a judge that passes answers saying "yes": greedy yes/no/maybe passes 1 of 3; two sampled
    rounds (no, yes, no) and (yes, no, no) pass prompts 1 and 2 at least once: pass@2 = 2/3. The samples are drawn
    at --generations.temperature from a random stream of their own."""
    import lit_rlhf.monitor

    monkeypatch.chdir(tmp_path)
    (tmp_path / "judge.py").write_text("def says_yes(prompts, completions, **columns):\n    return [float('yes' in c) for c in completions]\n")
    flags = ("--trainer.limit_val_batches", "1", "--generations.num_prompts", "3", "--generations.pass_at_k", "2", "--generations.temperature", "0.5",
             "--generations.reward_funcs", f"[{tmp_path / 'judge.py'}:says_yes]")  # fmt: skip
    run = cli(dpo_args(tiny_model_dir, real_rows, *flags))
    assert 0 <= run.trainer.callback_metrics["val_generations/pass@2"] <= 1
    rounds = iter([["no", "no", "no"]] * 2 + [["yes yes", "no", "maybe"], ["no", "yes", "no"], ["yes", "no", "no"]])
    asked = []

    def fake_answers(model, tokenizer, prompts, max_new_tokens, batch_size, sample=False, temperature=1.0):
        asked.append((sample, temperature))
        return [{"response": [1], "text": text, "eos": True} for text in next(rounds)]

    def next_random_number_after_validation() -> float:
        torch.manual_seed(1)
        run.trainer.validate(run.model, datamodule=run.datamodule, verbose=False)
        return torch.rand(1).item()

    monkeypatch.setattr(lit_rlhf.monitor, "generate_answers", fake_answers)
    monitor = next(c for c in run.trainer.callbacks if isinstance(c, lit_rlhf.monitor.GenerationMonitor))
    monitor.pass_at_k = 0  # off: greedy answers only
    next_random_number_after_validation()
    without_samples = next_random_number_after_validation()
    monitor.pass_at_k = 2
    assert next_random_number_after_validation() == without_samples
    assert asked == [(False, 1.0)] * 3 + [(True, 0.5), (True, 0.5)]
    metrics = run.trainer.callback_metrics
    assert metrics["val_generations/pass@1"].item() == pytest.approx(1 / 3) and metrics["val_generations/pass@2"].item() == pytest.approx(2 / 3)
    from test_reliability import fail

    message = fail(dpo_args(tiny_model_dir, real_rows, "--generations.pass_at_k", "2"))  # a DPO run has no reward functions of its own
    assert message.endswith("--generations.pass_at_k needs reward functions that judge a pass: --generations.reward_funcs (or --model.reward_funcs)")
