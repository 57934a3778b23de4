"""Losses and estimators by name: a built-in from its table, or `module:function` from the user's own file.

A flag such as `--model.loss_type` takes a table key (`simpo`) or an import path: `my_losses:my_loss`
(a module importable from the working directory) or `path/to/my_losses.py:my_loss` (a file). The
function is called with the keyword arguments it declares, out of the ones its kind provides, so it
names what it needs and nothing more (a preference loss that declares no reference log-probs loads no
reference model). Its other keyword arguments with a default are its hyperparameters, set by the table's
`_args` flag (`--model.estimator_args '{alpha: 0.5}'`): an entry with a new hyperparameter is its function alone.
"""

import importlib
import importlib.util
import inspect
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Mapping, Optional

from lit_rlhf.errors import UserError


def import_function(spec: str, flag: str):
    """What an import path `module:function` or `file.py:function` names (a function, or a table entry)."""
    module_name, _, name = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise UserError(f"{flag} {spec}: no such file {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            sys.path.insert(0, str(Path.cwd()))  # a console script's path lacks the working directory
            try:
                module = importlib.import_module(module_name)
            finally:
                sys.path.remove(str(Path.cwd()))
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{flag} {spec}: could not import {module_name} ({type(err).__name__}: {err})") from None
    function = getattr(module, name, None)
    if function is None:
        raise UserError(f"{flag} {spec}: {module_name} has no {name!r}")
    return function


def resolve(name: str, table: Mapping[str, object], flag: str):
    """The table entry `name`, or what its import path names: a function, or an entry of the table's kind."""
    if name in table:
        return table[name]
    if ":" in name:
        return import_function(name, flag)
    raise UserError(f"{flag} {name}: not one of {', '.join(table)}, nor an import path module:function")


def declared_arguments(function: Callable, provided: tuple[str, ...], flag: str, contract: str) -> tuple[str, ...]:
    """The names of `provided` that `function` declares (all of them if it takes **kwargs); a UserError if it
    requires an argument outside `provided`, stating the contract."""
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return provided
    unknown = [p.name for p in parameters if p.name not in provided and p.default is p.empty and p.kind is not p.VAR_POSITIONAL]
    if unknown:
        name = getattr(function, "__qualname__", str(function))
        raise UserError(
            f"{flag}: {name}({', '.join(p.name for p in parameters)}) requires {', '.join(unknown)}, which is not"
            f" provided; {contract}"
        )
    return tuple(p.name for p in parameters if p.name in provided)


def hyperparameters(function: Callable, provided: tuple[str, ...]) -> dict[str, object]:
    """The keyword arguments of `function` outside the contract `provided` that have a default: name -> default."""
    return {p.name: p.default for p in inspect.signature(function).parameters.values()
            if p.name not in provided and p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}  # fmt: skip


def hyperparameter_text(function: Callable, provided: tuple[str, ...]) -> str:
    """`; alpha=0.5, ...`: a table entry's hyperparameters and defaults as `--help` lists them after its paper, or ""."""
    own = hyperparameters(function, provided)
    return "; " + ", ".join(f"{name}={value!r}" for name, value in own.items()) if own else ""


def with_hyperparameters(function: Callable, provided: tuple[str, ...], given: Optional[Mapping[str, object]], flag: str) -> Callable:
    """`function` with the values `given` by `flag` (e.g. `--model.estimator_args`) bound to its `hyperparameters`; a
    UserError naming `flag` for a name that is none of them."""
    own = hyperparameters(function, provided)
    unknown = sorted(set(given or {}) - set(own))
    if unknown:
        name = getattr(function, "__qualname__", str(function))
        raise UserError(f"{flag}: {', '.join(unknown)} is not a hyperparameter of {name}; its hyperparameters (keyword arguments"
                        f" with a default, outside the contract): {hyperparameter_text(function, provided).removeprefix('; ') or 'none'}")  # fmt: skip
    return partial(function, **given) if given else function


def check_shape(value, shape: tuple[int, ...], plugin: str, expected: str) -> None:
    """A UserError naming `plugin` (its flag and value) unless `value` is a tensor of `shape`; `expected` says what
    the contract asks for, e.g. `the (B,) per-pair losses`."""
    found = tuple(value.shape) if hasattr(value, "shape") else None
    if found != tuple(shape):
        got = f"a {type(value).__name__}" + ("" if found is None else f" of shape {found}")
        raise UserError(f"{plugin} returned {got} where it must return {expected}, here of shape {tuple(shape)}")
