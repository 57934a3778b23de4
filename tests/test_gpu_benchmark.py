"""benchmarks/gpu.sh on a machine without a GPU: it refuses in one line and touches nothing; its table is
built from the JSON lines its settings print, skipping whatever else a failed setting left."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import gpu_bench  # noqa: E402


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_sh_refuses_politely_without_a_gpu(tmp_path):
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "benchmarks/gpu.sh needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False): nothing was run"
    ]
    assert not (tmp_path / "out").exists()


def test_the_table_reads_the_settings_json_lines_and_skips_the_rest():
    results = [
        {"model": "smollm2-135m", "setting": "dpo", "trained_tokens_per_s": 51234.4, "generated_tokens_per_s": None,
         "mfu": 0.0912, "peak_gib": 3.26, "seconds_per_step": 0.4, "gpu": "NVIDIA A100"},
        {"model": "random-360m", "setting": "grpo-vllm", "trained_tokens_per_s": 8000.0, "generated_tokens_per_s": 20480.6,
         "mfu": None, "peak_gib": 12.0, "seconds_per_step": 6.25, "gpu": "NVIDIA A100"},
    ]  # fmt: skip
    lines = [json.dumps(results[0]), "Traceback (most recent call last):", "[1, 2]", json.dumps(results[1])]
    rows = gpu_bench.table(lines).splitlines()
    assert rows[0] == "| model | setting | trained tok/s | generated tok/s | MFU | peak GPU memory | s/step |"
    assert rows[2] == "| smollm2-135m | dpo | 51234 | — | 9.1% | 3.3 GiB | 0.40 |"
    assert rows[3] == "| random-360m | grpo-vllm | 8000 | 20481 | — | 12.0 GiB | 6.25 |"
    assert len(rows) == 4


def test_a_table_with_no_result_says_so():
    with pytest.raises(SystemExit, match="no result to tabulate"):
        gpu_bench.table(["Traceback (most recent call last):", "RuntimeError: CUDA out of memory"])


def test_every_setting_is_one_the_cli_accepts(tiny_model_dir, tiny_reward_dir, tmp_path, monkeypatch):
    """The settings' flags parse and build a run (on CPU, the tiny model): a typo would only show on the GPU."""
    from lit_rlhf.cli import cli

    monkeypatch.chdir(tmp_path)
    for name, flags in gpu_bench.SETTINGS.items():
        if "vllm" in name:  # the engine starts in on_fit_start, not when the run is built
            assert flags[-2:] == ["--model.rollout_engine", "vllm"]
        reward = ["--model.reward_model_path", tiny_reward_dir] if name.startswith(("ppo", "grpo")) else []
        run = cli([*flags, "--model.model_name_or_path", tiny_model_dir, *reward, "--data.dataset", str(gpu_bench.ROWS),
                   "--trainer.precision", "32-true"], run=False)  # fmt: skip
        assert type(run.model).__name__ == {"reward": "RewardModule", "dpo": "DPOModule"}.get(name, "PPOModule")
