"""Run the notebooks in ``notebooks/``: execute them and render HTML, or pair their sources.

Each notebook is a jupytext percent-format ``.py`` file (the reviewed source) paired with an
``.ipynb`` stored without outputs. One cell tagged ``parameters`` holds ``SMALL = False``;
``--small`` sets ``SMALL = True`` there, the size the test suite runs
(``tests/test_notebooks.py``)::

    python -m experiments.notebooks                  # every notebook, full size -> notebooks/_build/*.html
    python -m experiments.notebooks --small 01_scans # one notebook at test size
    python -m experiments.notebooks --sync           # rewrite every .ipynb from its .py (no outputs)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
BUILD = NOTEBOOKS / "_build"

#: Appended under test: every figure still open (the test kernel draws with Agg, so none is
#: closed by the inline backend) must have a title and, on each axes it shows, axis labels.
FIGURE_CHECK = """\
import matplotlib.pyplot as _plt
for _num in _plt.get_fignums():
    _fig = _plt.figure(_num)
    _suptitle = _fig._suptitle.get_text() if _fig._suptitle else ""
    for _ax in _fig.axes:
        assert _ax.get_title() or _suptitle, f"figure {_num}: an axes without a title"
        if _ax.axison and _ax.get_label() != "<colorbar>":
            assert _ax.get_xlabel() and _ax.get_ylabel(), f"figure {_num} ({_ax.get_title()!r}): unlabelled axes"
"""


def sources() -> list[Path]:
    """The notebooks' ``.py`` sources, in reading order (``NN_name.py``)."""
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def load(path: Path, *, small: bool, check_figures: bool = False) -> nbformat.NotebookNode:
    """The notebook of ``path`` with its ``parameters`` cell set to ``SMALL = small``."""
    nb = jupytext.read(path)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(params) != 1:
        raise ValueError(f"{path.name}: expected one cell tagged 'parameters', found {len(params)}")
    params[0].source = f"SMALL = {small}"
    if check_figures:
        nb.cells.insert(0, nbformat.v4.new_code_cell('import matplotlib\nmatplotlib.use("agg")'))
        nb.cells.append(nbformat.v4.new_code_cell(FIGURE_CHECK))
    return nb


def execute(nb: nbformat.NotebookNode, *, timeout: int = 1200) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel started in ``notebooks/``; a failing cell raises."""
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def render_html(nb: nbformat.NotebookNode, out: Path) -> None:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nb)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(body)


def stripped(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """``nb`` without outputs or execution counts (what is stored), with cell ids by
    position so that re-syncing an unchanged source rewrites the same file."""
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def sync(path: Path) -> Path:
    """Write ``path``'s paired ``.ipynb`` from the ``.py`` source, without outputs."""
    target = path.with_suffix(".ipynb")
    jupytext.write(stripped(jupytext.read(path)), target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (file stems; default: all)")
    parser.add_argument("--small", action="store_true", help="SMALL = True: the test-suite size")
    parser.add_argument("--sync", action="store_true", help="only rewrite each .ipynb from its .py")
    parser.add_argument("--out", type=Path, default=BUILD, help="folder for the rendered HTML")
    args = parser.parse_args(argv)
    paths = [p for p in sources() if not args.names or p.stem in args.names]
    if args.names and len(paths) != len(args.names):
        parser.error(f"unknown notebook among {args.names}; have {[p.stem for p in sources()]}")
    for path in paths:
        if args.sync:
            print(f"{path.name} -> {sync(path).name}")
            continue
        start = time.perf_counter()
        nb = execute(load(path, small=args.small))
        render_html(nb, args.out / f"{path.stem}.html")
        print(f"{path.stem}: {time.perf_counter() - start:.0f} s -> {args.out / path.stem}.html")


if __name__ == "__main__":
    main()
