"""The docstring examples and the digits study run, and use the public API only."""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import optuna
import pytest

import optuna_triage
from optuna_triage.examples import digits

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _code_blocks(doc: str) -> list[str]:
    """The bodies of the ``.. code-block:: python`` directives in a docstring."""
    lines = doc.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != ".. code-block:: python":
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            body.append(nxt)
        blocks.append(textwrap.dedent("\n".join(body)).strip())
    return blocks


_PUBLIC_CLASSES = [optuna_triage.RankCollapsePruner, optuna_triage.SignalPruner, optuna_triage.RankTriage]


@pytest.mark.parametrize("cls", _PUBLIC_CLASSES, ids=lambda c: c.__name__)
def test_examples_docstring_example_runs(cls: type) -> None:
    blocks = _code_blocks(inspect.getdoc(cls) or "")
    assert blocks, f"{cls.__name__} has no runnable example"
    for code in blocks:
        exec(compile(code, f"<{cls.__name__} docstring>", "exec"), {"__name__": "__doc_example__"})


def test_examples_public_names_are_documented() -> None:
    for name in optuna_triage.__all__:
        obj = getattr(optuna_triage, name)
        assert inspect.getdoc(obj), name


def test_examples_digits_uses_public_api_only() -> None:
    tree = ast.parse(Path(digits.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optuna_triage"):
            assert node.module == "optuna_triage"
            assert all(alias.name in optuna_triage.__all__ for alias in node.names)
        if isinstance(node, ast.Attribute):
            assert not node.attr.startswith("_") or node.attr.startswith("__"), node.attr


def test_examples_digits_prunes_collapse_keeps_healthy() -> None:
    study = digits.make_study(seed=0)
    study.enqueue_trial({"lr": 0.1, "hidden": 64})
    study.enqueue_trial({"lr": 20.0, "hidden": 64})
    study.optimize(digits.make_objective(digits.load_data(0), epochs=4), n_trials=2)
    healthy, collapsed = study.trials
    assert healthy.state == optuna.trial.TrialState.COMPLETE and healthy.value > 0.8
    assert collapsed.state == optuna.trial.TrialState.PRUNED
    assert collapsed.user_attrs["prune_reason"] == "rank_collapse"
    assert collapsed.user_attrs["prune_step"] == digits.CHECKPOINT


def test_examples_digits_cli_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert digits.main(["--trials", "2", "--epochs", "4"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["trial", "state", "lr"]
    assert "best val_acc" in out


@pytest.mark.parametrize(
    "argv",
    [["--trials", "0"], ["--epochs", "2"], ["--threshold", "1.5"], ["--trials", "x"]],
)
def test_examples_digits_cli_rejects_bad_input(argv, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        digits.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m optuna_triage.examples.digits: error:")


def _readme_example(name: str) -> str:
    """The ```python block that follows ``<!-- readme-example: NAME -->`` in README.md."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = text.split(f"<!-- readme-example: {name} -->", 1)[1]
    return after.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_examples_readme_digits_study_runs_as_printed(capsys: pytest.CaptureFixture[str]) -> None:
    namespace = {"__name__": "__readme__"}
    exec(compile(_readme_example("digits"), "<README digits example>", "exec"), namespace)
    study = namespace["study"]
    states = {t.state for t in study.trials}
    assert len(study.trials) == 20
    assert optuna.trial.TrialState.COMPLETE in states
    # lr spans 1e-3..30: the large ones collapse and must be pruned, with the reason on the trial.
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(t.user_attrs.get("prune_reason") for t in pruned)
    assert "PRUNED" in capsys.readouterr().out
