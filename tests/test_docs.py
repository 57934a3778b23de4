"""The docs name every entry of the tables the flags read (estimators, policy losses, preference losses) and say
what each entry's record says: an entry added to a table and not to the docs fails here."""

import inspect
import re
from pathlib import Path

import pytest

from lit_rlhf.estimators import ESTIMATORS
from lit_rlhf.losses import LOSS_FLAGS, PREFERENCE_LOSSES
from lit_rlhf.ops import KL_ESTIMATORS
from lit_rlhf.policy_losses import POLICY_LOSSES

ROOT = Path(__file__).resolve().parents[1]


def table_rows(path: str, header: str) -> dict[str, str]:
    """The rows of the markdown table in `path` whose header row opens with `| header |`, by the backticked name
    that opens each row: {name: row}."""
    lines = (ROOT / path).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("| `"):
            break
        rows[line.split("`")[1]] = line
    return rows


def flag_row(flag: str) -> str:
    """The row of docs/cli.md's flags table whose first cell names `flag`."""
    return next(line for line in (ROOT / "docs/cli.md").read_text().splitlines() if f"`{flag}`" in line.split(" | ")[0])


def readme_section(heading: str) -> str:
    """The text of README.md from `heading` to the next heading of the same level."""
    text = (ROOT / "README.md").read_text()
    return text[text.index(heading):].split("\n## ")[0]


def test_the_estimator_table_has_a_row_per_estimator_saying_where_its_kl_goes():
    rows = table_rows("docs/cli.md", "estimator")
    assert list(rows) == list(ESTIMATORS)
    wrong = [name for name, estimator in ESTIMATORS.items() if f"(`{str(estimator.kl_in_loss).lower()}`)" not in rows[name]]
    assert not wrong, f"docs/cli.md says another KL placement than the record for {wrong}"


def test_the_policy_loss_table_has_a_row_per_policy_loss():
    assert list(table_rows("docs/cli.md", "policy loss")) == list(POLICY_LOSSES)


def test_the_kl_estimator_table_has_a_row_per_estimator_with_its_paper_and_the_flags_row_names_each():
    rows = table_rows("docs/cli.md", "KL estimator")
    assert list(rows) == list(KL_ESTIMATORS)
    row = flag_row("--model.kl_estimator")
    assert [name for name in KL_ESTIMATORS if f"`{name}`" not in row] == []
    wrong = [name for name, (_, paper) in KL_ESTIMATORS.items() if rows[name].split(" | ")[1] != paper]
    assert not wrong, f"docs/cli.md names another paper than the record for {wrong}"


def test_the_preference_loss_table_has_a_row_per_loss_saying_its_reference_rows_and_flags():
    rows = table_rows("docs/losses.md", "`--model.loss_type`")
    assert list(rows) == list(PREFERENCE_LOSSES)
    for name, loss in PREFERENCE_LOSSES.items():
        parameters = inspect.signature(loss.function).parameters
        reference, rows_read, flags = (cell.strip() for cell in rows[name].split("|")[3:6])
        assert reference == ("yes" if any(p.startswith("ref_") for p in parameters) else "no"), name
        assert rows_read.startswith("unpaired" if "labels" in parameters else "pairs"), name
        assert re.findall(r"`--model\.(\w+)`", flags) == list(loss.flags), name


@pytest.mark.parametrize("table, flag", [(ESTIMATORS, "advantage_estimator"), (POLICY_LOSSES, "policy_loss"), (PREFERENCE_LOSSES, "loss_type")])
def test_the_flags_table_and_the_readme_name_every_entry(table, flag):
    row, stages = flag_row(f"--model.{flag}"), readme_section("## The stages")
    assert [name for name in table if f"`{name}`" not in row] == [], f"docs/cli.md's --model.{flag} row"
    assert [name for name in table if f"`{name}`" not in stages] == [], "README.md, The stages"


def test_the_flags_table_names_every_flag_of_the_loss_records():
    row = flag_row("--model.loss_type")
    assert [name for name in LOSS_FLAGS if f"`--model.{name}`" not in row] == []
