"""Equal time against TRL: lit-rlhf's demo recipes, then TRL's trainers given the same wall time, then one judge.

    pip install -e ".[bench]"      # TRL 1.16.0 (DPOTrainer); its PPOTrainer was removed after 1.12.0, so for PPO:
    python -m venv --system-site-packages /work/trl112env && /work/trl112env/bin/pip install --no-deps trl==1.12.0
    python benchmarks/equal_time.py --model $(lit-rlhf fetch-smollm2) --reward-model R --judge J \
        --trl-ppo-python /work/trl112env/bin/python --out logs/equal_time

A faster library sees more data in the same time: this is where that must show. One after the other, on one machine:
1. lit_dpo: as `lit-rlhf demo` runs it: `lit-rlhf self-play-pairs` writes the rows (base's greedy answers become the
   rejected ones), then `lit-rlhf fit -c lit_rlhf/configs/demo/dpo.yaml` trains on them (no checkpoints). The rows are
   both libraries' input and on neither clock (run.json keeps their time). lit-rlhf's wall time T is the fit
   process's, as a user sees it: start-up, loading, tokenizing, training, the recipe's validation and the export.
2. trl_dpo: TRL's DPOTrainer on lit-rlhf's training rows (of the rows lit_dpo wrote, the same --data.* split, as chat
   messages) with the settings of lit-rlhf's run, read from its saved config.yaml: learning rate and warmup, weight
   decay, beta, rpo_alpha (TRL's "sft" loss term, the same per-token mean), batch size, gradient accumulation,
   clipping, max length, precision, gradient checkpointing, seed. A callback stops it at the end of its first
   optimizer step that ends T seconds or more after its process started (model loading counts for both; its last step
   may pass T, the table shows by how much), or at lit-rlhf's step count under its decaying schedule (below); the rows
   cycle until then. The policy is saved with save_pretrained.
3. lit_ppo, trl_ppo: the same for PPO (configs/demo/ppo.yaml; --reward-model scores the rollouts and starts the value
   model in both) and TRL's PPOTrainer (trl.experimental.ppo) on lit-rlhf's training prompts (the same tokens): prompts
   per rollout, micro-batch, PPO epochs, response length, temperature, KL coefficient and estimator, missing-EOS
   penalty, clip ranges, value coefficient, gamma, lambda, learning rate, precision, seed. Its loop never reads the
   callbacks' stop flag, so the callback raises at the end of the PPO step instead, and the policy is saved.
4. judge: `lit-rlhf evaluate` as `lit-rlhf demo` runs it on the final prompts (configs/demo/evaluate.yaml: greedy
   answers of its max_new_tokens), --judge judging, for base and every trained model; a stopped evaluation resumes.
5. report: OUT/equal_time.md: per algorithm and library the wall time, optimizer steps, rows seen (optimizer steps x
   rows per step: DPO pairs, PPO rollouts), peak RSS of the training process, win-rate against base, and lit-rlhf
   against TRL head to head by the judge (ties count half; 95 % bootstrap interval over the prompts).

The learning-rate schedule: where lit-rlhf's decays linearly to 0 at its last step (`--model.lr_scheduler linear`, the
demo's), TRL's DPO decays over the same steps and stops at the last of them if time allows; TRL's PPO rate stays at its
peak after warmup (it cannot know when time is up). Not matched: TRL's DPO does not cut prompts to
--data.max_prompt_length (the report counts the rows lit-rlhf truncated) and keeps the template's newline after each
answer's end-of-turn token; TRL's PPO loop clips no gradient and never turns on gradient checkpointing (turned on by
hand, it would generate without a KV cache); lit-rlhf batches rows of similar length, samples with its own decode loop
and validates at the end of its run.

Each training stage writes OUT/<stage>/ and, last, its run.json: a stage with a run.json is skipped, so running the
same command again resumes an interrupted benchmark. TRL's processes import nothing of lit-rlhf (lit_rlhf is imported
inside the functions of the parent process): their clocks count TRL's own start-up only. On 2 cores the whole benchmark
takes about an hour, most of it the evaluation of five models.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import yaml
from transformers import TrainerCallback

TRAINING = ("lit_dpo", "trl_dpo", "lit_ppo", "trl_ppo")
STAGES = (*TRAINING, "judge", "report")
FOREVER = 10**7  # TRL's max_steps and total_episodes: never the limit that stops it


class TimeUp(Exception):
    """Raised by a hard `Deadline`: the end of a training loop that never reads `control.should_training_stop`."""


class Deadline(TrainerCallback):
    """Stops training at the end of the first optimizer step (TRL's PPO: PPO step) that ends at or after `deadline`
    (`clock()` seconds); `hard`: by raising TimeUp, for a loop that ignores `control.should_training_stop` (TRL's PPO)."""

    def __init__(self, deadline: float, hard: bool = False, clock=time.time):
        self.deadline, self.hard, self.clock = deadline, hard, clock

    def on_step_end(self, args, state, control, **kwargs):
        if self.clock() >= self.deadline:
            control.should_training_stop = True
            if self.hard:
                raise TimeUp
        return control


def head_to_head(report: dict, name: str, other: str) -> tuple[float, float, float]:
    """Per prompt of `report` (lit-rlhf evaluate's report.json): 1 where the judge scores `name`'s answer above `other`'s,
    0.5 on a tie, else 0; the mean with its 95 % bootstrap interval, (mean, low, high)."""
    import torch
    from lit_rlhf.metrics import bootstrap_ci, wins

    return bootstrap_ci(wins(*(torch.tensor(report["models"][n]["judge_scores"]) for n in (name, other))))


def rows_per_step(algorithm: str, config: dict) -> float:
    """Rows each optimizer step of lit-rlhf's run `config` (its config.yaml) reads, which TRL's matched run reads too:
    DPO pairs; PPO rollouts (one PPO step's rollouts over its ppo_epochs x num_minibatches optimizer steps)."""
    model, data = config["model"]["init_args"], config["data"]
    if algorithm == "dpo":
        return data["batch_size"] * config["trainer"]["accumulate_grad_batches"]
    return data["batch_size"] * model["num_generations"] / (model["ppo_epochs"] * model["num_minibatches"])


def fail(message: str):
    sys.exit(f"equal_time.py: error: {message}")


def timed(command: list[str], log: Path, start: float) -> dict:
    """Run `command` to its end, its output to `log`: the seconds since `start` and its peak RSS (os.wait4: the process
    and the children it waited for)."""
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds, child.returncode = time.time() - start, os.waitstatus_to_exitcode(status)
    if child.returncode:
        fail(f"`{shlex.join(command)}` failed; the end of {log}:\n" + "".join(log.read_text().splitlines(True)[-25:]))
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def finished(stage: str, opts) -> dict:
    """The run.json of a training stage that finished."""
    path = opts.out / stage / "run.json"
    if not path.is_file():
        fail(f"{path} does not exist: run its stage first (--stages {stage})")
    return json.loads(path.read_text())


def lit_stage(algorithm: str, opts, folder: Path) -> dict:
    """`lit-rlhf fit` of the demo's config, timed as a user sees it; its steps from the exported model card."""
    from lit_rlhf.demo import DEMO_CONFIGS, NO_CHECKPOINTS, SHIPPED_ROWS, self_play_args

    lit = shutil.which("lit-rlhf", path=sysconfig.get_path("scripts")) or fail(f"no `lit-rlhf` beside {sys.executable}: pip install -e .")
    rows, pairs = str(SHIPPED_ROWS), {}
    if algorithm == "dpo":  # the demo's DPO reads base's own answers as its rejected ones: both libraries' input, on no clock
        rows = str(folder / "self_play_rows.jsonl")
        pairs = {"self_play": timed([lit, "self-play-pairs", *self_play_args(opts.model, rows)], folder / "self_play.log", time.time())}
    flags = ["--model.model_name_or_path", opts.model, "--data.dataset", rows, "--trainer.default_root_dir", str(folder), *NO_CHECKPOINTS]
    flags += ["--model.reward_model_path", opts.reward_model] if algorithm == "ppo" else []
    run = timed([lit, "fit", "-c", str(DEMO_CONFIGS / f"{algorithm}.yaml"), *flags, *shlex.split(opts.fit_flags)], folder / "fit.log", time.time())
    (version,) = (folder / "logs" / algorithm).glob("version_*")
    steps = re.search(r"(\d+) optimizer steps", (version / "hf" / "README.md").read_text())
    config = yaml.safe_load((version / "config.yaml").read_text())
    return run | pairs | {"model": str(version / "hf"), "steps": int(steps.group(1)), "config": config, "library": "lit-rlhf"}


def matchable(model: dict, required: dict, algorithm: str) -> None:
    """Refuse a lit-rlhf run whose `--model.*` flags TRL's trainer cannot match."""
    changed = [f"--model.{k} {model[k]!r}" for k, v in required.items() if model[k] != v]
    if changed:
        fail(f"TRL's {algorithm} cannot match {', '.join(changed)}; this benchmark needs {required}")


def trl_spec(algorithm: str, config: dict, steps: int) -> dict:
    """What TRL trains, on what and how, from lit-rlhf's run `config` of `steps` optimizer steps: the models, the training
    rows of the same --data.* split (DPO: chat messages; PPO: lit-rlhf's prompt tokens) and TRL's config arguments."""
    from lit_rlhf.data import PreferenceDataModule
    from lit_rlhf.precision import auto_precision
    from lit_rlhf.rows import load_rows
    from lit_rlhf.tokenization import row_messages

    model, data, trainer = config["model"]["init_args"], config["data"], config["trainer"]
    dm = PreferenceDataModule(**data | {"tokenizer_name_or_path": model["model_name_or_path"]})
    dm.setup("fit")
    precision = trainer["precision"] or auto_precision()[0]
    if precision not in ("bf16-mixed", "32-true"):
        fail(f"--trainer.precision {precision}: TRL is matched in bf16-mixed or 32-true only")
    spec = {"model": model["model_name_or_path"], "config": {
        "learning_rate": model["learning_rate"], "lr_scheduler_type": "constant_with_warmup", "warmup_steps": model["warmup_steps"],
        "weight_decay": model["weight_decay"], "bf16": precision == "bf16-mixed", "seed": config["seed_everything"], "use_cpu": True,
        "report_to": "none", "save_strategy": "no", "disable_tqdm": True}}  # fmt: skip
    if algorithm == "dpo":
        matchable(model, {"loss_type": "sigmoid", "lora_r": 0}, algorithm)
        rows = load_rows(data["dataset"])[data["offset"] :][: data["limit"]]
        if dm.num_rows != len(rows):  # a row's `index` is then no longer its place in the file
            fail(f"lit-rlhf dropped {len(rows) - dm.num_rows} of {data['dataset']}'s rows: TRL's rows could not be matched")
        spec["rows"] = [row_messages(rows[i][1], rows[i][0], ("chosen", "rejected")) for i in (row["index"] for row in dm.train_rows)]
        spec["truncated"] = sum(row["truncated"] for row in dm.train_rows)
        sft = [model["rpo_alpha"]] if model["rpo_alpha"] else []  # null or 0: no NLL term
        spec["config"] |= {"per_device_train_batch_size": data["batch_size"], "gradient_accumulation_steps": trainer["accumulate_grad_batches"],
                           "max_grad_norm": trainer["gradient_clip_val"] or 0.0, "beta": model["beta"], "max_length": data["max_length"],
                           "loss_type": ["sigmoid"] + ["sft"] * len(sft), "loss_weights": [1.0] + sft,
                           "gradient_checkpointing": model["gradient_checkpointing"], "max_steps": FOREVER}  # fmt: skip
        if model["lr_scheduler"] == "linear":  # lit-rlhf's rate decays to 0 at its last step: TRL's too, over the same steps
            spec["config"] |= {"lr_scheduler_type": "linear", "max_steps": steps}
        return spec
    matchable(model, {"advantage_estimator": "gae", "policy_loss": "ppo", "num_generations": 1, "num_minibatches": 1, "reward_funcs": None}, algorithm)
    micro, remainder = divmod(data["batch_size"], model["gradient_accumulation_steps"])
    if remainder:
        fail(f"--data.batch_size {data['batch_size']} is not a multiple of --model.gradient_accumulation_steps")
    spec["rows"] = [{"input_ids": row["prompt"]} for row in dm.train_rows]
    same = ("response_length", "temperature", "kl_coef", "kl_estimator", "missing_eos_penalty", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam")
    spec["config"] |= {k: model[k] for k in same} | {
        "per_device_train_batch_size": micro, "gradient_accumulation_steps": model["gradient_accumulation_steps"], "num_mini_batches": 1,
        "num_ppo_epochs": model["ppo_epochs"], "local_rollout_forward_batch_size": model["rollout_batch_size"], "stop_token": "eos",
        "total_episodes": FOREVER, "num_sample_generations": 0}  # fmt: skip
    return spec | {"reward_model": model["reward_model_path"], "value_model": model["value_model_path"] or model["reward_model_path"]}


def trl_stage(algorithm: str, opts, folder: Path) -> dict:
    """TRL's run in a process of its own, given lit-rlhf's wall time from the moment it is started."""
    lit = finished(f"lit_{algorithm}", opts)
    spec = trl_spec(algorithm, lit["config"], lit["steps"])
    (folder / "spec.json").write_text(json.dumps(spec, indent=1))
    python, start = opts.trl_ppo_python if algorithm == "ppo" else sys.executable, time.time()
    run = timed([python, __file__, "_trl", algorithm, str(folder), str(start + lit["seconds"])], folder / "train.log", start)
    # DPO rows lit-rlhf truncated: TRL reads them whole (PPO's TRL reads lit-rlhf's tokens, cut the same)
    return run | json.loads((folder / "trained.json").read_text()) | {"truncated_by_lit": spec.get("truncated", 0)}


def trl_train(algorithm: str, folder: Path, deadline: float) -> None:
    """In TRL's process: train what `folder`/spec.json says until `deadline`, save the policy to `folder`/hf, write trained.json."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    spec = json.loads((folder / "spec.json").read_text())
    rows, config = Dataset.from_list(spec["rows"]), spec["config"] | {"output_dir": str(folder / "trainer")}
    causal_lm = lambda: AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)  # noqa: E731 (lit-rlhf's too: fp32)
    if algorithm == "dpo":
        tokenizer = AutoTokenizer.from_pretrained(spec["model"])
        trainer = trl.DPOTrainer(model=causal_lm(), args=trl.DPOConfig(**config), train_dataset=rows, processing_class=tokenizer,
                                 callbacks=[Deadline(deadline)])
        trainer.train()
        policy, steps = trainer.model, trainer.state.global_step
    else:
        try:
            from trl.experimental.ppo import PPOConfig, PPOTrainer
        except ImportError:
            fail(f"TRL {trl.__version__} in {sys.executable} has no trl.experimental.ppo (removed after 1.12.0): see --trl-ppo-python")
        tokenizer = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")
        scalar = lambda path: AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)  # noqa: E731
        trainer = PPOTrainer(args=PPOConfig(**config), processing_class=tokenizer, model=causal_lm(), ref_model=causal_lm(),
                             reward_model=scalar(spec["reward_model"]), value_model=scalar(spec["value_model"]), train_dataset=rows,
                             eval_dataset=rows, callbacks=[Deadline(deadline, hard=True)])  # eval_dataset: a loader it builds, unused  # fmt: skip
        try:
            trainer.train()
        except TimeUp:
            pass
        policy, steps = trainer.policy_model, trainer.state.global_step * config["num_ppo_epochs"]  # one optimizer step per PPO epoch
    policy.save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    (folder / "trained.json").write_text(json.dumps({"model": str(folder / "hf"), "steps": steps, "library": f"TRL {trl.__version__}"}))


def judge(opts) -> None:
    """`lit-rlhf evaluate` exactly as `lit-rlhf demo` runs it on the final prompts, for base and every trained model."""
    from lit_rlhf import evaluate
    from lit_rlhf.demo import DEMO_CONFIGS, FINAL_ROWS, SHIPPED_ROWS, UNSEEN_ROWS

    models = {"base": opts.model} | {stage: finished(stage, opts)["model"] for stage in TRAINING if (opts.out / stage / "run.json").is_file()}
    evaluate.main([
        "-c", str(DEMO_CONFIGS / "evaluate.yaml"), "--models", json.dumps(models), "--reward_model", opts.reward_model, "--judge_model", opts.judge,
        "--data.dataset", str(SHIPPED_ROWS), "--unseen_dataset", str(UNSEEN_ROWS), "--heldout_dataset", str(FINAL_ROWS), "--prompts", "[]",
        "--output_dir", str(opts.out / "evaluate"), "--resume", "true", *shlex.split(opts.evaluate_flags),
    ])  # fmt: skip


def write_report(opts) -> str:
    """The table of OUT/equal_time.md from the stages' run.json files and the evaluation's report.json."""
    from lit_rlhf.metrics import interval_text

    runs = {stage: finished(stage, opts) for stage in TRAINING if (opts.out / stage / "run.json").is_file()}
    if not runs:
        fail(f"no training stage has finished in {opts.out}: nothing to report")
    path = opts.out / "evaluate" / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else {"models": {}}
    lines = ["| algorithm | library | wall time | optimizer steps | rows seen | peak RSS | win-rate vs base | lit-rlhf vs TRL |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for stage, run in runs.items():
        algorithm = stage.split("_")[1]
        rows = run["steps"] * rows_per_step(algorithm, runs[f"lit_{algorithm}"]["config"])
        versus = f"trl_{algorithm}"
        both = stage.startswith("lit") and {stage, versus} <= report["models"].keys()
        h2h = interval_text(head_to_head(report, stage, versus), 2) if both else ""
        win = interval_text(report["models"][stage]["win_rate"], 2) if stage in report["models"] else "not judged"
        seen = f"{rows:.0f} {'pairs' if algorithm == 'dpo' else 'rollouts'}"
        lines.append(f"| {algorithm.upper()} | {run['library']} | {run['seconds']:.0f} s | {run['steps']} | {seen} | {run['peak_rss_gib']:.1f} GiB | {win} | {h2h} |")
    cut = runs.get("trl_dpo", {}).get("truncated_by_lit")
    notes = [f"lit-rlhf truncated {cut} DPO training rows (--data.max_prompt_length, max_length); TRL cuts at max_length only."] if cut else []
    judged = f"Judge: {report['judge']['path']}." if "judge" in report else "Not judged yet (--stages judge)."
    title = f"Equal wall time: each TRL run stops at the end of its first step at or after lit-rlhf's wall time. {judged}"
    text = "\n".join([title, "", *lines, "", *notes])
    (opts.out / "equal_time.md").write_text(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--model", required=True, help="the policy both libraries start from and the evaluation's base (`lit-rlhf fetch-smollm2`)")
    parser.add_argument("--reward-model", help="reward model folder: PPO's reward and its value model's start in both libraries, and the"
                        " evaluation's proxy (needed by lit_ppo and judge; trl_ppo reads it from lit_ppo's config)")  # fmt: skip
    parser.add_argument("--judge", help="reward model folder that judges the answers, trained on rows no policy saw, like the demo's judge (needed by judge)")
    parser.add_argument("--out", type=Path, default=Path("logs/equal_time"), help="folder of every stage's output and of equal_time.md")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="the stages to run (always in the order listed"
                        " here); a training stage whose run.json exists is skipped, e.g. `--stages judge report` re-judges")  # fmt: skip
    parser.add_argument("--trl-ppo-python", default=sys.executable, help="Python with TRL <= 1.12.0, whose trl.experimental.ppo"
                        " has PPOTrainer, for trl_ppo (default: this one)")  # fmt: skip
    parser.add_argument("--fit-flags", default="", help="more flags for both `lit-rlhf fit` runs, e.g. '--seed_everything 43'; TRL's runs follow"
                        " lit-rlhf's saved config")  # fmt: skip
    parser.add_argument("--evaluate-flags", default="", help="more flags for `lit-rlhf evaluate`, e.g. '--num_generation_prompts 32'")
    opts = parser.parse_args()
    for flag, stages in (("--reward-model", {"lit_ppo", "judge"}), ("--judge", {"judge"})):
        if stages & set(opts.stages) and not getattr(opts, flag[2:].replace("-", "_")):
            parser.error(f"{flag} is needed by --stages {' '.join(sorted(stages & set(opts.stages)))}")
    trl_ppo_due = "trl_ppo" in opts.stages and not (opts.out / "trl_ppo" / "run.json").is_file()
    if trl_ppo_due and subprocess.run([opts.trl_ppo_python, "-c", "import trl.experimental.ppo"], capture_output=True).returncode:
        parser.error(f"{opts.trl_ppo_python} cannot import trl.experimental.ppo (TRL's PPOTrainer, removed after TRL 1.12.0): see --help")
    for stage in (s for s in STAGES if s in opts.stages):
        folder = opts.out / stage
        if stage == "judge":
            judge(opts)
        elif stage == "report":
            print(write_report(opts))
        elif (folder / "run.json").is_file():
            print(f"{stage}: done already ({folder / 'run.json'})", file=sys.stderr)
        elif folder.exists():
            fail(f"{folder} is left by an interrupted run of {stage}: delete it to run the stage again")
        else:
            folder.mkdir(parents=True)
            library, algorithm = stage.split("_")
            run = (lit_stage if library == "lit" else trl_stage)(algorithm, opts, folder)
            (folder / "run.json").write_text(json.dumps(run, indent=1))
            print(f"{stage}: {run['seconds']:.0f} s, {run['steps']} optimizer steps, peak RSS {run['peak_rss_gib']} GiB", file=sys.stderr, flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_trl"]:  # TRL's training process, started by trl_stage
        trl_train(sys.argv[2], Path(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
