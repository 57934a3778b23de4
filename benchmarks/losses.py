"""The preference losses of DPOModule on the demo's DPO recipe, judged on held-out pairs none of them trained on.

    python benchmarks/losses.py --model $(lit-rlhf fetch-smollm2) [--losses sigmoid kto]

Each loss (`--model.loss_type`) trains once per `--seeds` value (`--seed_everything`; without LoRA dropout
a run's only random part is its row order, which `--data.seed` sets) in a process of its own, so
that each peak RSS is that run's alone, from lit_rlhf/configs/demo/dpo.yaml on the shipped rows: 24
batches, 2 per optimizer step (12 steps). `sigmoid` (DPO, the baseline) and `apo_zero` keep the config's
beta 0.1 and rpo_alpha 1.0; `simpo` runs at beta 2.0, gamma 0.5 (the paper's ranges: beta 2-2.5, gamma
0.5-1.5) and `orpo` at beta (the paper's lambda) 0.1, both without the RPO term (ORPO has an NLL term of
its own). `kto` reads the pairs split into desirable and undesirable rows (`--data.mode unpaired
--data.split_pairs true`), 8 rows a batch: the completions of 4 pairs, as the other losses see.

The judge: the pairs-mode split holds out 200 of the 360 pairs; the unpaired split (400 of the 720 rows
held out) holds out other prompts. Every loss is judged on the held-out pairs whose prompt neither
split trains on. Per pair it computes the trained policy's and the starting model's (the reference's)
summed log-probs of chosen and rejected, and reports:
- DPO's implicit accuracy: `log pi - log ref` of chosen above rejected's (every loss; for the
  reference-free ones the starting model is loaded after training, for the judge only);
- the mean-token log-prob accuracy: the policy alone ranks chosen above rejected by mean token
  log-prob (SimPO's implicit reward; ORPO's log odds rank the same way);
- the change of the chosen answers' mean summed log-prob (a falling one is DPO's known failure);
- seconds per optimizer step (median, the first not counted), peak RSS during training, and whether
  the run loaded a reference model.
Prints a markdown table and writes every number to `<out>/results.json`. Run it alone on the machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lit_rlhf.data import PreferenceDataModule, collate_pairs
from lit_rlhf.demo import DEMO_CONFIGS, SHIPPED_ROWS
from lit_rlhf.forward import sequence_logps
from lit_rlhf.models import load_causal_lm
from lit_rlhf.ops import IGNORE_INDEX
from lit_rlhf.smollm2 import DEFAULT_DIR
from speed import StepTimer, peak_gib

UNPAIRED = ["--data.mode", "unpaired", "--data.split_pairs", "true", "--data.val_size", "400", "--data.batch_size", "8"]
LOSSES = {
    "sigmoid": [],
    "apo_zero": [],
    "simpo": ["--model.beta", "2.0", "--model.simpo_gamma", "0.5", "--model.rpo_alpha", "null"],
    "orpo": ["--model.beta", "0.1", "--model.rpo_alpha", "null"],
    "kto": ["--model.rpo_alpha", "null", *UNPAIRED],
}  # fmt: skip


def judged_pairs(data: PreferenceDataModule) -> list[dict]:
    """The pairs-mode held-out pairs (encoded rows) whose prompt the unpaired split does not train on either."""
    flags = {k: v for k, v in data.hparams.items() if not k.startswith("_")}  # not Lightning's `_instantiator`
    pairs = PreferenceDataModule(**(flags | {"mode": "pairs", "split_pairs": False, "val_size": 200, "batch_size": 4}))
    unpaired = PreferenceDataModule(**(flags | {"mode": "unpaired", "split_pairs": True, "val_size": 400}))
    for dm in (pairs, unpaired):
        dm.setup("fit")
    trained = {tuple(row["prompt"]) for row in unpaired.train_rows}
    return [row for row in pairs.val_rows if tuple(row["prompt"]) not in trained]


@torch.no_grad()
def pair_logps(model, rows: list[dict], pad_id: int, context) -> torch.Tensor:
    """(N, 4) summed log-probs of chosen and rejected and their lengths, per pair."""
    out = []
    for start in range(0, len(rows), 4):
        batch = collate_pairs(rows[start : start + 4], pad_id)
        with context():
            logps = sequence_logps(model, batch).float()
        lengths = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).float()
        out.append(torch.stack([*logps.chunk(2), *lengths.chunk(2)], dim=1))
    return torch.cat(out)


def judge(policy: torch.Tensor, reference: torch.Tensor) -> dict:
    """Accuracies and the chosen log-prob change from (N, 4) tables of the policy and of the reference."""
    ratio = policy[:, :2] - reference[:, :2]
    mean = policy[:, :2] / policy[:, 2:]
    return {
        "pairs": len(policy),
        "dpo_implicit_accuracy": (ratio[:, 0] > ratio[:, 1]).float().mean().item(),
        "mean_logp_accuracy": (mean[:, 0] > mean[:, 1]).float().mean().item(),
        "reference_mean_logp_accuracy": (reference[:, 0] / reference[:, 2] > reference[:, 1] / reference[:, 3]).float().mean().item(),
        "chosen_logp_change": ratio[:, 0].mean().item(),
        "rejected_logp_change": ratio[:, 1].mean().item(),
    }


def fit(loss: str, model: str, seed: int, out_dir: Path, extra: list[str]) -> None:
    """Train one loss in `out_dir` and judge it; print what was measured as one JSON line."""
    from lit_rlhf.cli import cli

    out_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(out_dir)
    run = cli(["-c", str(DEMO_CONFIGS / "dpo.yaml"), "--model.model_name_or_path", model, "--data.dataset", str(SHIPPED_ROWS),
               "--model.loss_type", loss, "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false",
               "--trainer.limit_val_batches", "0", "--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0",
               *LOSSES[loss], *extra], run=False)  # fmt: skip
    run.model.on_fit_end = lambda: None  # no export: the trained policy is judged in memory
    rows, pad_id = judged_pairs(run.datamodule), run.model.tokenizer.pad_token_id
    timer = StepTimer()
    run.trainer.callbacks.append(timer)
    start = time.perf_counter()
    run.trainer.fit(run.model, datamodule=run.datamodule)
    fit_seconds, peak = time.perf_counter() - start, peak_gib()
    reference_loaded = run.model.ref_model is not None
    context = run.trainer.precision_plugin.forward_context
    policy = pair_logps(run.model.model.eval(), rows, pad_id, context)
    reference = run.model.ref_model if reference_loaded else load_causal_lm(model).to(run.model.device).eval()
    per_step = [a + b for a, b in zip(timer.seconds[0::2], timer.seconds[1::2])]
    result = {
        "loss": loss, "seed": seed, "extra_flags": extra, "precision": str(run.trainer.precision), "reference_loaded": reference_loaded,
        "hparams": {k: run.model.hparams[k] for k in ("beta", "simpo_gamma", "rpo_alpha", "learning_rate")},
        "train_rows": len(run.datamodule.train_rows), "batches": len(timer.seconds), "optimizer_steps": run.trainer.global_step,
        "seconds_per_step": statistics.median(per_step[1:]), "fit_seconds": fit_seconds, "peak_gib": peak,
        "torch_threads": torch.get_num_threads(),
    } | judge(policy, pair_logps(reference, rows, pad_id, context))  # fmt: skip
    print(json.dumps(result))


def table(results: list[dict]) -> str:
    lines = ["| loss | seed | DPO implicit accuracy | mean-token log-prob accuracy | chosen / rejected log-prob change | s / optimizer step | peak RSS | reference loaded |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        if "error" in r:
            lines.append(f"| `{r['loss']}` | {r['seed']} | failed: `{r['error']}` | | | | | |")
            continue
        lines.append(f"| `{r['loss']}` | {r['seed']} | {r['dpo_implicit_accuracy']:.3f} | {r['mean_logp_accuracy']:.3f} | "
                     f"{r['chosen_logp_change']:+.1f} / {r['rejected_logp_change']:+.1f} | {r['seconds_per_step']:.1f} | {r['peak_gib']:.2f} GiB | "
                     f"{'yes' if r['reference_loaded'] else 'no'} |")  # fmt: skip
    ok = [r for r in results if "error" not in r]
    if ok:
        lines.append(f"| starting model | | | {ok[0]['reference_mean_logp_accuracy']:.3f} | | | | |")
        lines.append(f"\n{ok[0]['pairs']} held-out pairs judged, {ok[0]['precision']}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--model", default=str(DEFAULT_DIR), help="the policy to start from (default: `lit-rlhf fetch-smollm2`'s folder)")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42], help="--seed_everything of each run")
    parser.add_argument("--out", type=Path, default=Path("logs/losses"), help="where runs and results.json go")
    args, extra = parser.parse_known_args()  # any further lit-rlhf flags go to every run, e.g. --data.seed 7
    args.out.mkdir(parents=True, exist_ok=True)
    saved, results = args.out / "results.json", []
    for seed in args.seeds:  # every loss once before the next seed: a stopped benchmark leaves a whole comparison
        for loss in args.losses:
            run_dir = (args.out / f"{loss}_seed{seed}").resolve()
            if (run_dir / "result.json").is_file():  # a rerun keeps the runs that finished and does the rest
                results.append(json.loads((run_dir / "result.json").read_text()))
                continue
            done = subprocess.run([sys.executable, __file__, "_fit", loss, args.model, str(seed), str(run_dir), *extra], capture_output=True, text=True)
            (args.out / f"{loss}_seed{seed}.log").write_text(done.stderr)
            if done.returncode:
                error = next((line for line in reversed(done.stderr.strip().splitlines()) if line.strip()), f"exit {done.returncode}")
                results.append({"loss": loss, "seed": seed, "error": error.strip()})
            else:
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
                (run_dir / "result.json").write_text(json.dumps(results[-1]))
            print(table(results[-1:]).splitlines()[2], file=sys.stderr, flush=True)
            saved.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    if sys.argv[1:2] == ["_fit"]:
        fit(sys.argv[2], sys.argv[3], int(sys.argv[4]), Path(sys.argv[5]), sys.argv[6:])
    else:
        main()
