"""The notebooks run: each executes top to bottom at ``SMALL = True`` in a fresh kernel,
with every figure titled and its axes labelled; each stored ``.ipynb`` is its ``.py``
source (jupytext pairing) without outputs. ``pytest -k notebooks`` runs these."""

from __future__ import annotations

import jupytext
import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

from experiments import notebooks
from ssmjax.data.paths import default_data_dir

SOURCES = notebooks.sources()
#: Notebooks that read real data (never downloaded): skipped, with the reason, where it is absent.
NEEDS_DATA = {"06_forecasting": "ETTh1.csv"}


def test_notebooks_exist():
    assert [p.stem[:2] for p in SOURCES] == [f"{i:02d}" for i in range(1, len(SOURCES) + 1)] and SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_notebook_runs_small(path):
    if path.stem in NEEDS_DATA:
        data = default_data_dir()
        if data is None or not (data / NEEDS_DATA[path.stem]).exists():
            pytest.skip(f"{path.stem} reads {NEEDS_DATA[path.stem]} ($SSMJAX_DATA or ../shared/data), absent here")
    notebooks.execute(notebooks.load(path, small=True, check_figures=True), timeout=600)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_notebook_is_stored_paired_and_without_outputs(path):
    stored = nbformat.read(path.with_suffix(".ipynb"), as_version=4)
    for cell in stored.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{path.stem}.ipynb stores outputs: run python -m experiments.notebooks --sync")
    source = jupytext.read(path)
    assert [(c.cell_type, c.source) for c in stored.cells] == [(c.cell_type, c.source) for c in source.cells], (
        f"{path.stem}.ipynb differs from {path.name}: run python -m experiments.notebooks --sync")


def test_figure_check_catches_an_unlabelled_axes(tmp_path):
    bad = tmp_path / "01_bad.py"
    bad.write_text('# %% tags=["parameters"]\nSMALL = False\n\n# %%\nimport matplotlib.pyplot as plt\n'
                   'plt.plot([0, 1]); plt.title("no axis labels")\n')
    with pytest.raises(CellExecutionError, match="unlabelled axes"):
        notebooks.execute(notebooks.load(bad, small=True, check_figures=True), timeout=120)


def test_parameters_cell_is_required(tmp_path):
    bad = tmp_path / "01_bad.py"
    bad.write_text("# %%\nx = 1\n")
    with pytest.raises(ValueError, match="parameters"):
        notebooks.load(bad, small=True)
