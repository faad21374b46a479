"""The README's snippet runs, and CI runs the README's test command."""

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_losses_snippet_runs_and_trains():
    namespace: dict = {}
    exec(compile(_blocks("python")[0], "README.md", "exec"), namespace)
    loss = float(namespace["loss"])
    assert np.isfinite(loss) and loss > 0
    first = namespace["params"]
    # A second step from the snippet's own function lowers the loss on the same batch.
    args = (namespace["x"], namespace["labels"], namespace["teacher_logits"])
    _, _, loss2 = namespace["train_step"](first, namespace["opt_state"], *args)
    assert float(loss2) < loss


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    commands = [b.strip() for b in _blocks("bash")[:2]]
    assert "examples/distill_mnist.py" in commands[0]
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci
