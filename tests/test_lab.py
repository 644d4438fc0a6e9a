"""Course-lab mode: the student notebooks are built deterministically from the solution notebooks,
every stub raises with its exercise id, and putting the solutions back gives the sources again."""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from sae_kit import lab
from sae_kit.checks import CHECKS

ROOT = Path(__file__).resolve().parent.parent
SOURCES = lab.notebooks(ROOT / "notebooks")


def exercise_cell(eid="00.fvu", body="    return 1.0", indent="    "):
    src = (f"def fvu(x, x_hat):\n    \"\"\"doc\"\"\"\n{indent}{lab.BEGIN}\n{body}\n{indent}{lab.END}\n\n"
           f"sae_kit.checks.check(\"{eid}\", fvu)")
    return nbformat.v4.new_code_cell(src, metadata={"tags": ["exercise"], "sae_kit": {"exercise": {
        "id": eid, "difficulty": 1, "minutes": 5, "objective": "write the FVU"}}})


def small_notebook():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import sae_kit\nsae_kit.setup(seed=0)"),
                nbformat.v4.new_markdown_cell("# 99 · A title"),
                exercise_cell(),
                nbformat.v4.new_markdown_cell("Use `.mean(0)`.", metadata={"tags": ["hint"]}),
                nbformat.v4.new_markdown_cell("It grows.", metadata={"tags": ["answer"]})]
    return nb


def test_stub_replaces_only_the_solution_region():
    student = lab.build_notebook(small_notebook(), source="notebooks/99_x.ipynb")
    src = student.cells[3].source
    assert lab.BEGIN not in src and "return 1.0" not in src
    assert src.startswith('def fvu(x, x_hat):\n    """doc"""\n    # YOUR CODE HERE\n    raise NotImplementedError("exercise 00.fvu: ')
    assert src.endswith('sae_kit.checks.check("00.fvu", fvu)')
    assert student.cells[2].metadata["tags"] == [lab.HEADER_TAG]  # the header follows the title
    assert student.cells[4].source.startswith("<details><summary><b>Hint</b>")
    assert student.cells[5].source.startswith("<details><summary><b>Answer</b>")
    nbformat.validate(student)


def test_the_stub_raises_with_its_id():
    student = lab.build_notebook(small_notebook())
    ns = {}
    code = student.cells[3].source.split("\n\nsae_kit.checks")[0]
    exec(code, ns)
    with pytest.raises(NotImplementedError, match=r"^exercise 00\.fvu: " + CHECKS["00.fvu"].task[:20]):
        ns["fvu"](None, None)


def test_insert_is_the_inverse_of_build():
    nb = small_notebook()
    assert lab.insert(lab.build_notebook(nb), lab.solutions(nb)) == nb


@pytest.mark.parametrize("cell,msg", [
    (exercise_cell(body="    return 1.0").copy() | {"metadata": {"tags": ["exercise"]}}, "no metadata.sae_kit.exercise"),
    (nbformat.v4.new_code_cell("def f():\n    pass\nsae_kit.checks.check(\"00.fvu\", f)", metadata={
        "tags": ["exercise"], "sae_kit": {"exercise": {"id": "00.fvu", "difficulty": 1, "minutes": 5,
                                                       "objective": "o"}}}), "needs exactly one"),
])
def test_malformed_exercises_are_named(cell, msg):
    nb = small_notebook()
    nb.cells[2] = nbformat.from_dict(cell)
    with pytest.raises(lab.LabError, match=msg):
        lab.build_notebook(nb)


def test_wrong_difficulty_and_missing_check_are_refused():
    nb = small_notebook()
    nb.cells[2].metadata["sae_kit"]["exercise"]["difficulty"] = 5
    with pytest.raises(lab.LabError, match="difficulty must be 1, 2 or 3"):
        lab.exercises(nb)
    nb = small_notebook()
    nb.cells[2].source = nb.cells[2].source.replace('check("00.fvu"', 'check("00.other"')
    with pytest.raises(lab.LabError, match="must end with"):
        lab.exercises(nb)


# ---- the real notebooks --------------------------------------------------------------------------
def test_every_exercise_of_the_notebooks_has_a_check_and_there_are_at_least_twelve():
    ids = [m["id"] for p in SOURCES for m in lab.exercises(nbformat.read(p, as_version=4))]
    assert len(ids) >= 12
    assert set(ids) == set(CHECKS), "every check belongs to a notebook exercise and vice versa"
    for p in SOURCES:  # at least one "predict, then run" question with its answer per notebook
        tags = [t for c in nbformat.read(p, as_version=4).cells for t in c.metadata.get("tags", [])]
        assert "predict" in tags and "answer" in tags, p.name


def test_build_is_deterministic_and_round_trips(tmp_path):
    a, b = lab.build(ROOT / "notebooks", tmp_path), lab.build(ROOT / "notebooks", tmp_path)
    assert a == b
    for p in SOURCES:
        src = nbformat.read(p, as_version=4)
        student = nbformat.reads(a[tmp_path / p.name], as_version=4)
        nbformat.validate(student)
        assert lab.insert(student, lab.solutions(src)) == src


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_every_stub_in_the_student_notebooks_raises_its_id(path):
    """Run each stubbed exercise cell (its function definition, then its check) in a fresh namespace."""
    import sae_kit

    student = lab.build_notebook(nbformat.read(path, as_version=4))
    for cell in student.cells:
        if "exercise" in cell.metadata.get("tags", []):
            eid = cell.metadata["sae_kit"]["exercise"]["id"]
            ns = {"sae_kit": sae_kit}
            with pytest.raises(NotImplementedError, match=rf"^exercise {eid}: "):
                exec(cell.source, ns)


def test_the_committed_labs_are_up_to_date():
    out = subprocess.run([sys.executable, "-m", "sae_kit.lab", "check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_timings_cover_every_notebook():
    t = json.loads((ROOT / "labs" / "timings.json").read_text())["notebooks"]
    assert set(t) == {p.stem for p in SOURCES}
    for name, scales in t.items():
        assert scales["ci"]["minutes"] > 0, name


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_every_solution_passes_its_check(path, capsys):
    """Each exercise cell of the solution notebooks, run up to its check, passes it (fast; nbval runs
    the whole notebooks)."""
    import sae_kit

    for cell in nbformat.read(path, as_version=4).cells:
        if "exercise" in cell.metadata.get("tags", []):
            src = cell.source
            end = src.index("\n", src.index("sae_kit.checks.check(")) if "\n" in src[src.index("sae_kit.checks.check("):] \
                else len(src)
            exec(src[:end], {"sae_kit": sae_kit})
            assert capsys.readouterr().out.startswith("✔ ")


def test_the_instructor_table_matches_the_exercises():
    text = (ROOT / "labs" / "README.md").read_text()
    for p in SOURCES:
        for m in lab.exercises(nbformat.read(p, as_version=4)):
            row = next((ln for ln in text.splitlines() if ln.startswith(f"| `{m['id']}` |")), None)
            assert row is not None, m["id"]
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert cells[2] == "★" * m["difficulty"] and cells[3] == str(m["minutes"]), row


def test_build_removes_its_own_stale_labs_but_never_a_users_notebook(tmp_path):
    src, out = tmp_path / "notebooks", tmp_path / "labs"
    src.mkdir()
    out.mkdir()
    nbformat.write(small_notebook(), src / "99_small.ipynb")
    gone = lab.build_notebook(small_notebook(), source="notebooks/97_gone.ipynb")
    nbformat.write(gone, out / "97_gone.ipynb")
    nbformat.write(small_notebook(), out / "98_mine.ipynb")  # a user's own notebook, not built by the kit
    assert lab.main(["build", "--notebooks", str(src), "--out", str(out)]) == 0
    assert (out / "99_small.ipynb").exists() and (out / "98_mine.ipynb").exists()
    assert not (out / "97_gone.ipynb").exists()
    assert lab.main(["check", "--notebooks", str(src), "--out", str(out)]) == 1  # 98_mine is not a lab of these


def test_timings_are_recorded_from_a_report_run(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"00_quickstart": 90.0, "01_x": {"seconds": 30.0, "commit": "abc"}}))
    data = lab.record_timings(tmp_path, "ci", tmp_path / "t.json", note="2 cores, cold cache")
    assert data["notebooks"]["00_quickstart"]["ci"] == {"minutes": 1.5}
    assert data["notebooks"]["01_x"]["ci"] == {"minutes": 0.5}
    assert data["measured"]["ci"] == "2 cores, cold cache"
    with pytest.raises(ValueError, match="scale must be"):
        lab.record_timings(tmp_path, "huge", tmp_path / "t.json")
