"""The notebooks use only the public API and plotting, are stored with their outputs, and run
top to bottom against the library (executed with nbclient)."""

from __future__ import annotations

import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, TEST_XLA_FLAGS

NOTEBOOKS = os.path.join(ROOT, "notebooks")
NAMES = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))


def code(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


def test_the_four_notebooks_are_there():
    assert NAMES == ["01_train_and_inspect.ipynb", "02_transfer_learning.ipynb",
                     "03_inspect_a_trained_model.ipynb", "04_a_sweep.ipynb"]


@pytest.mark.parametrize("name", NAMES)
def test_a_notebook_uses_no_private_names_and_is_stored_with_its_outputs(name):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    source = code(nb)
    assert "__globals__" not in source and "importlib" not in source
    assert not re.findall(r"(?:\.|\bimport |\bfrom )_(?!_)\w", source), "private names"
    assert "resnet_jax.training.loop" not in source and "Checkpointer" not in source
    assert all(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "run it and save"
    assert images(nb) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    env_path, flags = os.environ.get("PYTHONPATH", ""), os.environ["XLA_FLAGS"]
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + env_path if env_path else "")
    # the kernel runs as a user's does, at XLA's default optimization level: the notebooks
    # train and predict on thousands of images (at the tests' level 0, 236.6 s against 190.8)
    os.environ["XLA_FLAGS"] = flags.replace(TEST_XLA_FLAGS, "").strip()
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": NOTEBOOKS}}).execute()
    finally:
        os.environ["PYTHONPATH"], os.environ["XLA_FLAGS"] = env_path, flags
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert images(nb) >= 3
