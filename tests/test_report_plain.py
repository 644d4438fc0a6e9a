"""`python -m sae_kit.report --no-kernel`: a notebook's code cells run in this process, without Jupyter."""

import json
import sys

import pytest

from sae_kit import report


def _notebook(path, *cells):
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# title"]}]
          + [{"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": c}
             for c in cells], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))
    return path


def test_cells_share_a_namespace_and_run_in_the_notebook_folder(tmp_path, monkeypatch):
    nb = _notebook(tmp_path / "01_demo.ipynb", "%matplotlib inline\nx = 2", ["y = x * 21\n", "!echo skipped\n"],
                   "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nopen('out.txt', 'w').write(str(y))")
    monkeypatch.chdir(tmp_path.parent)
    seconds = report.run_notebook_plain(nb)
    assert (tmp_path / "out.txt").read_text() == "42"
    assert seconds >= 0
    assert str(tmp_path.parent) == str(__import__("pathlib").Path.cwd())  # the caller's folder is restored


def test_an_error_names_the_notebook_and_cell(tmp_path):
    nb = _notebook(tmp_path / "02_bad.ipynb", "a = 1", "b = 1 / 0")
    with pytest.raises(RuntimeError, match=r"02_bad.ipynb, code cell 2: ZeroDivisionError"):
        report.run_notebook_plain(nb)


def test_widget_cells_are_skipped_without_ipywidgets(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # as on a machine without it
    nb = _notebook(tmp_path / "03_widgets.ipynb", "import ipywidgets as W\napp = W.Button()", "app.card()",
                   "open('done.txt', 'w').write('ok')")
    report.run_notebook_plain(nb)
    assert (tmp_path / "done.txt").read_text() == "ok"
    out = capsys.readouterr().out
    assert "cell 1 skipped" in out and "cell 2 skipped: it uses 'app'" in out


def test_an_unknown_name_is_still_an_error(tmp_path):
    nb = _notebook(tmp_path / "04_typo.ipynb", "z = undefined_name + 1")
    with pytest.raises(RuntimeError, match="code cell 1: NameError"):
        report.run_notebook_plain(nb)


def test_main_without_a_kernel_writes_the_run_record(tmp_path, monkeypatch):
    book = tmp_path / "nbs"
    book.mkdir()
    _notebook(book / "07_tiny.ipynb", "v = 3")
    monkeypatch.setenv("SAE_KIT_RESULTS", str(tmp_path))  # main() sets both; monkeypatch restores them
    monkeypatch.setenv("SAE_KIT_SCALE", "ci")
    rc = report.main(["--scale", "ci", "--no-kernel", "--notebooks", str(book), "--out", str(tmp_path / "res")])
    assert rc == 0
    runs = json.loads((tmp_path / "res" / "runs.json").read_text())
    assert "07_tiny" in runs and runs["07_tiny"]["seconds"] >= 0
    assert not (tmp_path / "res" / "html").exists()
