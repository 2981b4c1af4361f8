"""`lstmkit --help`, `--version` and `datasets` answer without importing the heavy parts, and the facts
they print without loading anything match the loaded data and modules."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "numpy", "scipy", "sklearn", "aeon", "numba", "matplotlib", "triton", "safetensors", "tqdm")

_PROBE = """
import json, sys
import lstmkit
after_import = set(sys.modules)
from lstmkit.cli import main
for argv in (["--help"], ["--version"], ["train", "--help"], ["evaluate", "--help"], ["datasets"]):
    try:
        main(argv)
    except SystemExit:
        pass
heavy = {heavy!r}
print(json.dumps({{
    "by_import": sorted(m for m in heavy if m in after_import),
    "by_cli": sorted(m for m in heavy if m in sys.modules and m not in after_import),
    "classify": sorted(m for m in sys.modules if m.startswith("lstmkit.classify.")),
}}))
"""


def test_help_version_and_datasets_import_nothing_heavy():
    """Whatever ``import lstmkit`` itself costs, the command line adds no heavy import for these."""
    r = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["by_cli"] == []
    assert report["classify"] == ["lstmkit.classify._datasets", "lstmkit.classify._defaults"]


def test_registry_facts_match_the_files():
    """`lstmkit datasets` prints the registry's counts; they are the bundled files' own."""
    from lstmkit.classify import DATASETS, load_dataset

    for name, info in DATASETS.items():
        Xtr, ytr = load_dataset(name, "train")
        Xte, _ = load_dataset(name, "test")
        lengths = [len(c) for c in Xtr + Xte]
        assert (len(Xtr), len(Xte)) == (info.n_train, info.n_test), name
        assert {c.shape[1] for c in Xtr + Xte} == {info.n_channels}, name
        assert (min(lengths), max(lengths)) == info.lengths, name
        assert len(set(ytr.tolist())) == info.n_classes, name


def test_cli_choices_are_the_modules_own():
    from lstmkit._classifier import POOLINGS
    from lstmkit.backends import BACKEND_MODULES
    from lstmkit.classify._defaults import CHOICES

    assert CHOICES["pooling"] == POOLINGS
    assert CHOICES["backend"] == ("auto", *BACKEND_MODULES)

