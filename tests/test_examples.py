"""The copy-and-run example stays runnable, and meta-training through it actually helps few-shot fitting."""

import importlib.util
from pathlib import Path


def test_example_meta_trains_and_adaptation_improves():
    path = Path(__file__).resolve().parents[1] / "examples" / "own_model_own_tasks.py"
    spec = importlib.util.spec_from_file_location("example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(steps=150)
    assert result["20"] < 0.5 * result["0"]
