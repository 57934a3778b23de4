"""`lit-rlhf`: the console script. Training subcommands go to LightningCLI; the others are ours.

Every command exits 0 on success. A failure prints one line, `lit-rlhf: error: ...`, and exits 1;
`--debug` (anywhere on the command line) or `LIT_RLHF_DEBUG=1` shows the traceback instead.
"""

import errno
import os
import sys
from pathlib import Path

import yaml

from lit_rlhf import demo, evaluate, self_play, smollm2, tasks
from lit_rlhf.cli import cli
from lit_rlhf.errors import UserError

COMMANDS = {"evaluate": evaluate.main, "fetch-smollm2": smollm2.main, "demo": demo.main, "demo-verifiable": demo.verifiable, "arithmetic": tasks.write_arithmetic,
            "task-accuracy": tasks.main, "self-play-pairs": self_play.main}  # fmt: skip


def configured_model_class(args: list[str]):
    """The `model.class_path` of the last `-c/--config` file in `args` that names one."""
    found = None
    for flag, value in zip(args, args[1:]):
        if flag in ("-c", "--config") and Path(value).is_file():
            model = (yaml.safe_load(Path(value).read_text()) or {}).get("model")
            found = model.get("class_path", found) if isinstance(model, dict) else found
    return found


def root_cause(err: BaseException) -> BaseException:
    """The error a user can act on: our own UserError anywhere in the chain (the config parser wraps
    what a class raises while it is built), else the innermost explicit cause (`raise ... from`). An
    error raised while another was being handled (`__context__`) is the one that stopped the run:
    the handled one is not followed."""
    chain = [err]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    if user_error := next((e for e in chain if isinstance(e, UserError)), None):
        return user_error
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def one_line(err: BaseException) -> str:
    """The root cause in one line, and the failure checkpoint a run wrote for it (`runs.StopCheckpoint`)."""
    cause = root_cause(err)
    text = " ".join(str(cause).split()) or "(no message)"
    if isinstance(cause, OSError) and cause.errno in errno.errorcode:  # ENOSPC: no space left on device: PATH
        text = f"{errno.errorcode[cause.errno]}: {(cause.strerror or text).lower()}" + (f": {cause.filename}" if cause.filename else "")
    if not isinstance(cause, UserError):
        text = f"{type(cause).__name__}: {text} (run again with --debug for the traceback)"
    note = getattr(err, "checkpoint_note", None)
    return f"{text}; {note}" if note else text


def run(argv: list[str]) -> None:
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "lit-rlhf commands: fit, validate, test (LightningCLI, below); evaluate (compare models);"
            " fetch-smollm2 (offline model); demo (offline pipeline); demo-verifiable (RL from a verifiable reward, offline); arithmetic (write a verifiable task);"
            " task-accuracy (pass@1 and pass@k on one); self-play-pairs (preference rows whose rejected answer is a model's own, for DPO). `lit-rlhf COMMAND --help` explains each;"
            " --debug shows the traceback of an error.\n"
        )
    if {"-h", "--help"} & set(argv) and (model_class := configured_model_class(argv)):
        try:  # subclass mode hides --model.* flags from --help; print them after the rest
            cli(argv)
        except SystemExit:
            pass
        argv = [a for a in argv if a not in ("-h", "--help")] + ["--model.help", model_class]
    cli(argv)


def main(args=None) -> None:
    """Run one command: returns None on success (exit status 0); on failure exits 1 with one line."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("LIT_RLHF_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    try:
        run(argv)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as err:
        if debug:
            raise
        sys.exit(f"lit-rlhf: error: {one_line(err)}")


if __name__ == "__main__":
    main()
