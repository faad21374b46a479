"""Kill, interrupt and resume real training runs of both examples; the results are exact.

Each test drives ``examples/distill_mnist.py`` or ``examples/vae_mnist.py`` in
subprocesses through ``scripts/fault_injection.py`` (see its docstring for the fault
points) on a 6000-row IDX dataset (42 steps an epoch), and compares the finished run's
``results.json`` and ``metrics.jsonl`` with an uninterrupted run of the same seed: equal
bit for bit, timing fields aside.

* SIGKILL at six points in a row, each followed by ``--resume``: from outside as the
  first metrics row appears; inside a checkpoint save (data written, not committed);
  with half a metrics row written; (a SIGINT at a known step: a mid-epoch checkpoint);
  halfway through deleting an old checkpoint; from outside at a random-ish moment.
* SIGTERM from outside mid-epoch: exit 143, stderr names the step and gives the
  command that continues, which then finishes the run.
* SIGINT from outside as an epoch's checkpoint is being written: exit 130, likewise.

Run ``python scripts/fault_injection.py`` for every scenario on both examples, with a
report.
"""

from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_faults():
    name = "fault_injection"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "fault_injection.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


faults = _load_faults()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Data, workdirs and logs; a compilation cache the subprocesses share."""
    root = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDVAE_CACHE_DIR", str(root / "jax-cache"))
        yield root


@pytest.fixture(scope="module")
def data_dir(root) -> Path:
    return faults.write_dataset(root / "data")


@pytest.fixture(scope="module")
def reference(root, data_dir):
    """The uninterrupted run of each example (made on first use)."""
    done: dict[str, Path] = {}

    def get(example: str) -> Path:
        if example not in done:
            done[example] = faults.baseline(example, root, data_dir)
        return done[example]

    return get


@pytest.mark.parametrize("example", ["distill", "vae"])
def test_sigkill_anywhere_then_resume_is_exact(example, root, data_dir, reference):
    outcome = faults.kill_chain(example, root, data_dir, reference(example))
    print(outcome.report())
    assert not outcome.diffs, outcome.report()
    # The kill inside the save left orbax's temporary folder and no checkpoint of that
    # step; the next resume cleaned it away and used the previous checkpoint.
    assert any(p.endswith(".orbax-checkpoint-tmp") for p in outcome.tmp_folders), outcome.report()
    assert outcome.tmp_folders_at_end == []


def test_sigterm_mid_epoch_then_the_printed_command_finishes_exactly(root, data_dir, reference):
    outcome, code, stderr = faults.interrupt(
        "distill", root, data_dir, reference("distill"), signal.SIGTERM, after="checkpoint"
    )
    print(outcome.report())
    assert code == 143, stderr
    first, second = stderr.strip().splitlines()
    # The run is past its first checkpoint (end of epoch 1): it stops in epoch 2, after
    # the step in flight and a checkpoint, or (if the signal came late) at its end.
    assert first.startswith("distill_mnist.py: teacher: SIGTERM at ")
    assert first.endswith("; checkpoint written.")
    assert second.startswith("To continue: ") and second.endswith(" --resume")
    assert not outcome.diffs, outcome.report()


def test_sigint_then_the_printed_command_finishes_exactly(root, data_dir, reference):
    outcome, code, stderr = faults.interrupt(
        "vae", root, data_dir, reference("vae"), signal.SIGINT, after="row"
    )
    print(outcome.report())
    assert code == 130, stderr
    first, second = stderr.strip().splitlines()
    assert first.startswith("vae_mnist.py: vae: SIGINT at ") and "checkpoint written" in first
    assert second.startswith("To continue: ") and "examples/vae_mnist.py" in second
    assert not outcome.diffs, outcome.report()
