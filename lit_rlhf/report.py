"""The evaluation report: report.md, report.json, frontier.png and TensorBoard scalars."""

import json
import statistics
from pathlib import Path

from lit_rlhf.metrics import interval_text

#: first table: what a looping or reward-hacking policy cannot hide
QUALITY = [("judge_reward", "judge reward"), ("proxy_reward", "proxy reward"), ("win_rate", "win-rate vs {baseline}"),
           ("lc_win_rate", "length-controlled win-rate"), ("sampled_kl", "KL to {baseline} (sampled)"),
           ("loop_share", "looping answers"), ("distinct_2", "distinct-2"), ("length", "mean length (tokens)"),
           ("eos_share", "ends with EOS")]  # fmt: skip
#: second table
LIKELIHOOD = [("logprob_preference", "mean answer log-prob (preference)"), ("logprob_unseen", "mean answer log-prob (unseen)"),
              ("greedy_logratio", "greedy log-ratio to {baseline}"), ("sampled_kl_k3", "KL to {baseline} (sampled, k3)"),
              ("boilerplate", "boilerplate")]  # fmt: skip


#: the across-seeds table
SEEDED = [("win_rate", "win-rate vs {baseline}"), ("judge_reward", "judge reward"), ("sampled_kl", "KL to {baseline} (sampled)"),
          ("loop_share", "looping answers"), ("eos_share", "ends with EOS"), ("length", "mean length (tokens)")]  # fmt: skip


def seed_groups(names: list[str]) -> dict[str, list[str]]:
    """Runs of one recipe under several seeds, named `<recipe>@<seed>`: recipe -> its run names."""
    groups: dict[str, list[str]] = {}
    for name in names:
        if "@" in name:
            groups.setdefault(name.split("@")[0], []).append(name)
    return groups


def across_seeds(report: dict) -> dict[str, dict]:
    """Per recipe run under several seeds, each `SEEDED` metric's mean over the seeds, its standard
    deviation across seeds (0 for one seed) and range, and the lowest lower bound of the seeds'
    win-rate intervals (every seed's interval is above 0.5 when it is)."""
    out = {}
    for recipe, names in seed_groups(list(report["models"])).items():
        runs = [report["models"][n] for n in names]
        stats = {"seeds": [n.split("@", 1)[1] for n in names]}
        for key, _ in SEEDED:
            means = [run[key][0] for run in runs]
            sd = statistics.stdev(means) if len(means) > 1 else 0.0
            stats[key] = {"mean": statistics.fmean(means), "sd": sd, "min": min(means), "max": max(means)}
        stats["lowest_win_rate_bound"] = min(run["win_rate"][1] for run in runs)
        out[recipe] = stats
    return out


def seed_table(seeds: dict[str, dict], baseline: str) -> list[str]:
    header = "| recipe | seeds | " + " | ".join(title.format(baseline=baseline) for _, title in SEEDED) + " | lowest win-rate bound |"
    rows = [
        f"| {recipe} | {len(s['seeds'])} | "
        + " | ".join(f"{s[k]['mean']:.3f} ± {s[k]['sd']:.3f} ({s[k]['min']:.3f}–{s[k]['max']:.3f})" for k, _ in SEEDED)
        + f" | {s['lowest_win_rate_bound']:.3f} |"
        for recipe, s in seeds.items()
    ]
    return [header, "|" + " --- |" * (len(SEEDED) + 3), *rows]


def verdict(win_rate_low: float, win_rate_high: float) -> str:
    """Whether a win-rate interval says the model beats the baseline."""
    return "better" if win_rate_low > 0.5 else "worse" if win_rate_high < 0.5 else "no clear difference"


def points(value: float, reference: float) -> str:
    """A share and its difference from `reference` in percentage points: `0.750 (+4 points)`."""
    return f"{value:.3f} ({100 * (value - reference):+.0f} points)"


#: the first table's metrics (`answer_table`)
ANSWERED = ("win_rate", "sampled_kl", "loop_share", "eos_share", "length")


def answer_table(report: dict, baseline: str) -> list[str]:
    """The report's first table: did alignment help (the judge's win-rate against the baseline and what its interval
    says), and at what cost (KL, looping and EOS share against the baseline's, length against the preferred answers').
    With seeds, one row per recipe: means over the seeds; better when every seed's interval lies above 0.5, worse when
    every one lies below."""
    base, chosen = report["models"][baseline], report.get("preferred")
    rows = []
    for recipe, stats in (report.get("seeds") or {}).items():
        low, high = stats["lowest_win_rate_bound"], max(report["models"][f"{recipe}@{s}"]["win_rate"][2] for s in stats["seeds"])
        mean = {key: stats[key]["mean"] for key in ANSWERED}
        rows.append((f"{recipe} ({len(stats['seeds'])} seeds)", mean, f"{mean['win_rate']:.3f} ± {stats['win_rate']['sd']:.3f}", verdict(low, high)))
    for name, m in report["models"].items():
        if name != baseline and "@" not in name:
            mean = {key: m[key][0] for key in ANSWERED}
            rows.append((name, mean, interval_text(m["win_rate"]), verdict(*m["win_rate"][1:])))
    eos_reference = f", chosen {chosen['eos_share'][0]:.3f}" if chosen else ""
    length_reference = f", chosen {chosen['length'][0]:.0f}" if chosen else ""
    return [
        f"| model | better than {baseline}? | win-rate vs {baseline} | KL to {baseline} (nats) | looping ({baseline} {base['loop_share'][0]:.3f})"
        f" | ends with EOS ({baseline} {base['eos_share'][0]:.3f}{eos_reference}) | mean length ({baseline} {base['length'][0]:.0f}{length_reference}) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *[f"| {name} | {said} | {win} | {m['sampled_kl']:.2f} | {points(m['loop_share'], base['loop_share'][0])}"
          f" | {points(m['eos_share'], base['eos_share'][0])} | {m['length']:.0f} |" for name, m, win, said in rows],
    ]  # fmt: skip


def cell(value) -> str:
    """A number, or `mean [low, high]` for a (mean, low, high) triple."""
    return interval_text(value) if isinstance(value, (list, tuple)) else f"{value:.3f}"


def table(report: dict, columns: list[tuple[str, str]], baseline: str) -> list[str]:
    header = "| model | " + " | ".join(title.format(baseline=baseline) for _, title in columns) + " |"
    rows = [f"| {name} | " + " | ".join(cell(m[key]) for key, _ in columns) + " |" for name, m in report["models"].items()]
    return [header, "|" + " --- |" * (len(columns) + 1), *rows]


def markdown(report: dict, baseline: str, unseen: str, dataset: str) -> str:
    judge, proxy, n = report["judge"], report["proxy"], len(report["prompts"])
    independence = "" if judge["independent"] else " **The judge is the proxy itself: pass --judge_model for an independent judge.**"
    lines = [
        "# lit-rlhf evaluation", "",
        f"Prompts and preference pairs: {dataset}; unseen set: `{unseen}`; judge: `{judge['path']}`; proxy (the"
        f" reward model the policies trained on): `{proxy['path']}`.{independence}", "",
        f"Every per-prompt mean is over the same {n} prompts, with a bootstrap 95 % interval in brackets. Win-rates",
        f"are by the judge against {baseline}'s greedy answer (ties count one half); the length-controlled win-rate is",
        "the win probability at equal length (logistic regression on the length difference). KL is",
        f"KL(model || {baseline}) in nats per response, from one temperature-1 sample per prompt (k1 estimator;",
        "k3 below). A looping answer repeats some 4-word sequence at least 3 times.", "",
        "## Did alignment help, and at what cost", "",
        f"Better: the win-rate's interval (every seed's, with seeds) lies above 0.5; worse: below it. The cost: the KL to {baseline}",
        f"and the share of looping and of ended answers, in points against {baseline}'s.", "",
        *answer_table(report, baseline), "",
        "## Quality and degeneration", "", *table(report, QUALITY, baseline), "",
        *([f"The preferred (chosen) answers of the {report['preferred']['rows']} held-out prompts, at the same length limit: ends"
           f" with EOS {cell(report['preferred']['eos_share'])}, mean length {cell(report['preferred']['length'])} tokens"
           " (counted to the limit): a model that answers like them shows these two columns.", ""] if report.get("preferred") else []),
        *(["## Across seeds", "",
            "Each cell: the mean over the seeds of the per-seed means above ± their standard deviation across seeds (min–max):",
            "the spread from training again, beside the intervals above, which are over prompts for one run. The last column",
            "is the lowest lower bound of the seeds' win-rate intervals: above 0.5, every seed beat the baseline.", "",
            *seed_table(report["seeds"], baseline), ""] if report.get("seeds") else []),
        "## Likelihood", "", *table(report, LIKELIHOOD, baseline), "",
        "The greedy log-ratio is `log p_model(y|x) - log p_base(y|x)` summed over each model's own greedy answer y:",
        "KL-like, but not a KL estimate, and it can be negative.", "",
        "## Reward models", "",
        f"On {judge['rows']} held-out preference pairs: judge accuracy (chosen > rejected) {judge['accuracy']:.1%}, mean"
        f" margin {judge['margin']:.3f}; proxy accuracy {proxy['accuracy']:.1%}, mean margin {proxy['margin']:.3f}.", "",
        *([f"## Verifiable task: `{report['task']}`", "", "Greedy pass@1 (an answer passes when the task's reward functions sum to 1 or more):", "",
           *table(report, [("task_pass_at_1", "greedy pass@1")], baseline), ""] if report.get("task") else []),
        "## Reward against KL", "", "![frontier](frontier.png)", "",
        "| model | KL (sampled) | judge reward |", "| --- | --- | --- |",
        *[f"| {name} | {cell(m['sampled_kl'])} | {cell(m['judge_reward'])} |" for name, m in report["models"].items()], "",
        "## Generations (greedy)", "",
    ]  # fmt: skip
    for i, prompt in enumerate(report["prompts"]):
        lines += [f"### {i + 1}. {prompt.strip()}", ""]
        lines += [f"- **{name}**: {m['generations'][i]}" for name, m in report["models"].items()] + [""]
    lines.append(f"Evaluation took {report['seconds']:.0f} s; every model generated and scored with {report['precision']} weights.")
    return "\n".join(lines)


def frontier_figure(report: dict):
    """Judge reward against sampled KL, one point (with both intervals) per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6, 4))
    for name, m in report["models"].items():
        (kl, kl_low, kl_high), (reward, r_low, r_high) = m["sampled_kl"], m["judge_reward"]
        ax.errorbar(kl, reward, xerr=[[kl - kl_low], [kl_high - kl]], yerr=[[reward - r_low], [r_high - reward]], fmt="o", capsize=3)
        ax.annotate(name, (kl, reward), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("KL to baseline (nats per response, sampled)")
    ax.set_ylabel("judge reward")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def write_report(report: dict, output_dir: str, baseline: str, unseen: str, dataset: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(report, baseline, unseen, dataset)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    figure = frontier_figure(report)
    figure.savefig(out / "frontier.png", dpi=120)
    with SummaryWriter(str(out)) as writer:
        writer.add_text("report", text)
        writer.add_figure("frontier", figure)
        for role in ("judge", "proxy"):
            writer.add_scalar(f"reward_model/{role}_accuracy", report[role]["accuracy"])
        for name, m in report["models"].items():
            for key, _ in QUALITY + LIKELIHOOD:
                writer.add_scalar(f"{name}/{key}", m[key][0] if isinstance(m[key], (list, tuple)) else m[key])
    print(f"report: {(out / 'report.md').resolve()}")
