"""`lit-rlhf`: the console script. Training subcommands go to LightningCLI; the others are ours."""

import sys
from pathlib import Path

import yaml

from lit_rlhf import demo, evaluate, smollm2
from lit_rlhf.cli import cli
from lit_rlhf.errors import UserError

COMMANDS = {"evaluate": evaluate.main, "fetch-smollm2": smollm2.main, "demo": demo.main}


def configured_model_class(args: list[str]):
    """The `model.class_path` of the last `-c/--config` file in `args` that names one."""
    found = None
    for flag, value in zip(args, args[1:]):
        if flag in ("-c", "--config") and Path(value).is_file():
            model = (yaml.safe_load(Path(value).read_text()) or {}).get("model")
            found = model.get("class_path", found) if isinstance(model, dict) else found
    return found


def main(args=None) -> None:
    """Run one command; returns None on success (exit status 0), exits non-zero with one line on a user error."""
    argv = sys.argv[1:] if args is None else args
    try:
        if argv and argv[0] in COMMANDS:
            COMMANDS[argv[0]](argv[1:])
            return
        if not argv or argv[0] in ("-h", "--help"):
            print(
                "lit-rlhf commands: fit, validate, test (LightningCLI, below); evaluate (compare models);"
                " fetch-smollm2 (offline model); demo (offline pipeline). `lit-rlhf COMMAND --help` explains each.\n"
            )
        if {"-h", "--help"} & set(argv) and (model_class := configured_model_class(argv)):
            try:  # subclass mode hides --model.* flags from --help; print them after the rest
                cli(args)
            except SystemExit:
                pass
            args = [a for a in argv if a not in ("-h", "--help")] + ["--model.help", model_class]
        cli(args)
    except UserError as err:
        sys.exit(f"lit-rlhf: error: {err}")


if __name__ == "__main__":
    main()
