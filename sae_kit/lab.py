"""Course-lab mode: the student notebooks, built from the solution notebooks.

    python -m sae_kit.lab build        # notebooks/NN_*.ipynb -> labs/NN_*.ipynb  (make labs)
    python -m sae_kit.lab list         # the exercises: id, difficulty, minutes, objective
    python -m sae_kit.lab check        # exit 1 if labs/ is not what `build` writes now
    python -m sae_kit.lab timings --scale ci --report results/runs.json
                                       # record a report run's per-notebook times in labs/timings.json

The notebooks in ``notebooks/`` stay the single source: they hold the solutions, and nbval runs them.
What the build reads there:

- **Exercise cells**: code cells tagged ``exercise``, with ``metadata.sae_kit.exercise`` =
  ``{"id": "00.topk_select", "difficulty": 1-3, "minutes": 10, "objective": "..."}``. The solution
  is the region between ``### BEGIN SOLUTION`` and ``### END SOLUTION``; the cell ends with
  ``sae_kit.checks.check("<id>", <function>)``.
- **Hint / answer cells**: markdown cells tagged ``hint`` or ``answer``; in the student notebook
  they become collapsed ``<details>`` blocks (an answer to a "predict, then run" question stays
  hidden until the student opens it).

What it writes: ``labs/NN_*.ipynb`` where each solution region is replaced by a stub that raises
``NotImplementedError("exercise <id>: <task>")`` (nbgrader's ``ClearSolutions`` preprocessor does
the blanking: it is the maintained tool for exactly this, keeps each stub at the solution's
indentation, and leaves the rest of the cell alone), plus a header cell after the title: the
learning objectives, the exercises with their difficulty and minutes, and the notebook's compute
time at each scale (``labs/timings.json``). The build is deterministic, and `insert` puts the
solutions back: ``insert(build(nb), solutions(nb)) == nb`` (tests/test_lab.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

import nbformat

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
DETAILS = {"hint": "Hint", "answer": "Answer"}
STUB_MARK = "# YOUR CODE HERE"
HEADER_TAG = "lab-header"
SCALES = ("ci", "lab", "paper")


class LabError(ValueError):
    """A solution notebook's exercise markup is malformed; the message names the cell."""


# ---- reading the source notebooks ---------------------------------------------------------------
def exercises(nb) -> list[dict]:
    """The exercise metadata of a notebook, in order, each checked."""
    out = []
    for i, cell in enumerate(nb.cells):
        if "exercise" not in cell.get("metadata", {}).get("tags", []):
            continue
        meta = cell.metadata.get("sae_kit", {}).get("exercise")
        where = f"cell {i} ({cell.source.strip().splitlines()[0][:60] if cell.source.strip() else 'empty'})"
        if cell.cell_type != "code":
            raise LabError(f"{where} is tagged 'exercise' but is not a code cell")
        if not isinstance(meta, dict):
            raise LabError(f"{where} is tagged 'exercise' but has no metadata.sae_kit.exercise")
        missing = {"id", "difficulty", "minutes", "objective"} - set(meta)
        if missing:
            raise LabError(f"{where}: metadata.sae_kit.exercise lacks {sorted(missing)}")
        if meta["difficulty"] not in (1, 2, 3):
            raise LabError(f"{where}: difficulty must be 1, 2 or 3, got {meta['difficulty']!r}")
        if cell.source.count(BEGIN) != 1 or cell.source.count(END) != 1 \
                or cell.source.index(BEGIN) > cell.source.index(END):
            raise LabError(f"{where}: an exercise cell needs exactly one {BEGIN!r} … {END!r} region")
        if f'check("{meta["id"]}"' not in cell.source:
            raise LabError(f"{where}: the cell must end with sae_kit.checks.check(\"{meta['id']}\", <function>)")
        out.append(dict(meta))
    ids = [m["id"] for m in out]
    if len(set(ids)) != len(ids):
        raise LabError(f"exercise ids repeat: {ids}")
    return out


def solutions(nb) -> dict[str, str]:
    """{exercise id: the solution region's lines, markers included, as written}."""
    out = {}
    for cell in nb.cells:
        if "exercise" in cell.get("metadata", {}).get("tags", []):
            lines = cell.source.split("\n")
            a = next(i for i, ln in enumerate(lines) if BEGIN in ln)
            b = next(i for i, ln in enumerate(lines) if END in ln)
            out[cell.metadata["sae_kit"]["exercise"]["id"]] = "\n".join(lines[a:b + 1])
    return out


# ---- building the student version ---------------------------------------------------------------
def stub_message(meta: dict) -> str:
    """What the stub raises: the exercise id and its task (the check's, else the objective)."""
    from .checks import CHECKS

    task = CHECKS[meta["id"]].task if meta["id"] in CHECKS else meta["objective"]
    return f"exercise {meta['id']}: {task}"


def build_notebook(nb, timings: dict | None = None, source: str = ""):
    """The student version of solution notebook `nb` (a new object; `nb` is not changed)."""
    try:
        from nbgrader.preprocessors import ClearSolutions
    except ImportError as e:
        raise ImportError("building the labs needs nbgrader: pip install -e '.[lab]' (or make setup)") from e

    ex = exercises(nb)
    nb = copy.deepcopy(nb)
    resources = {"language": "python"}
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if "exercise" in tags:
            meta = cell.metadata["sae_kit"]["exercise"]
            stub = f"{STUB_MARK}\nraise NotImplementedError({json.dumps(stub_message(meta), ensure_ascii=False)})"
            clear = ClearSolutions(code_stub={"python": stub}, begin_solution_delimeter=BEGIN,
                                   end_solution_delimeter=END, enforce_metadata=False)
            clear.preprocess_cell(cell, resources, 0)
        for tag, title in DETAILS.items():
            if tag in tags and cell.cell_type == "markdown":
                cell.source = f"<details><summary><b>{title}</b> (click to open)</summary>\n\n{cell.source}\n\n</details>"
    name = Path(source).stem if source else ""
    nb.cells.insert(_title_index(nb) + 1, _header_cell(ex, (timings or {}).get(name, {})))
    nb.metadata["sae_kit_lab"] = {"source": source, "exercises": [m["id"] for m in ex]}
    return nb


def _title_index(nb) -> int:
    """Index of the notebook's title (its first markdown cell starting with '# ')."""
    return next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith("# ")), 0)


def _header_cell(ex: list[dict], timing: dict):
    stars = {1: "★☆☆", 2: "★★☆", 3: "★★★"}
    lines = ["## This is the lab version", "",
             "The notebook runs as before, with exercises: each is a function to write, checked right away by "
             "`sae_kit.checks.check`, which compares it with the kit's own implementation and, when it "
             "differs, tells you which known mistake it matches. Hints and answers are folded; open them "
             "when you are stuck, or after you have predicted.", ""]
    if ex:
        lines += ["**You will practise**", ""] + [f"- {m['objective']}" for m in ex] + [""]
        lines += ["| exercise | difficulty | minutes |", "|---|---|---|"]
        lines += [f"| `{m['id']}` | {stars[m['difficulty']]} | {m['minutes']} |" for m in ex]
        lines += ["", f"Exercises: about {sum(m['minutes'] for m in ex)} minutes in all.", ""]
    if timing:
        cells = [f"`{s}`: {_minutes(timing[s])}" for s in SCALES if s in timing]
        lines += ["**Compute time** of the whole notebook on 2 CPU cores (set `SAE_KIT_SCALE` before "
                  "starting JupyterLab): " + "; ".join(cells) + ".", ""]
    return nbformat.v4.new_markdown_cell("\n".join(lines).rstrip() + "\n", id=HEADER_TAG,
                                         metadata={"tags": [HEADER_TAG]})


def _minutes(t) -> str:
    if isinstance(t, dict):
        if t.get("minutes") is None:
            return t.get("note", "not measured")
        warm = f", {_num(t['warm_minutes'])} min with a warm cache" if t.get("warm_minutes") is not None else ""
        return f"{_num(t['minutes'])} min{warm}"
    return f"{_num(t)} min"


def _num(minutes: float) -> str:
    return f"{minutes:.1f}" if minutes < 10 else f"{minutes:.0f}"


def insert(student, sols: dict[str, str]):
    """Put the solutions back into a built student notebook: the inverse of `build_notebook`."""
    nb = copy.deepcopy(student)
    nb.cells = [c for c in nb.cells if HEADER_TAG not in c.get("metadata", {}).get("tags", [])]
    nb.metadata.pop("sae_kit_lab", None)
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if "exercise" in tags:
            lines = cell.source.split("\n")
            a = next(i for i, ln in enumerate(lines) if ln.strip() == STUB_MARK)
            indent = lines[a][: len(lines[a]) - len(lines[a].lstrip())]
            sol = sols[cell.metadata["sae_kit"]["exercise"]["id"]]
            if not sol.startswith(indent + BEGIN):
                raise LabError("the solution's indentation does not match the stub's")
            cell.source = "\n".join(lines[:a] + sol.split("\n") + lines[a + 2:])
        for tag in DETAILS:
            if tag in tags and cell.cell_type == "markdown":
                m = re.fullmatch(r"<details><summary>.*?</summary>\n\n(.*)\n\n</details>", cell.source, re.S)
                cell.source = m.group(1) if m else cell.source
    return nb


# ---- the command line ---------------------------------------------------------------------------
def notebooks(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("[0-9][0-9]_*.ipynb"))


def load_timings(labs: Path) -> dict:
    f = Path(labs) / "timings.json"
    return json.loads(f.read_text())["notebooks"] if f.exists() else {}


def build(src: Path, out: Path) -> dict[Path, str]:
    """{path: text} of every student notebook, built from the solution notebooks in `src`."""
    timings = load_timings(out)
    texts = {}
    for p in notebooks(src):
        nb = nbformat.read(p, as_version=4)
        student = build_notebook(nb, timings, source=f"{Path(src).name}/{p.name}")
        nbformat.validate(student)
        texts[Path(out) / p.name] = nbformat.writes(student) + "\n"
    return texts


def record_timings(labs: Path, scale: str, report: Path, note: str = "") -> dict:
    """Put a report run's per-notebook wall times (``runs.json``, as `sae_kit.report` writes it:
    ``{notebook: {"seconds": ...}}``, or plain seconds from older runs) into ``labs/timings.json``
    under `scale`, in minutes."""
    from .fsutil import atomic_write_text

    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    seconds = json.loads(Path(report).read_text())
    f = Path(labs) / "timings.json"
    data = json.loads(f.read_text()) if f.exists() else {"measured": {}, "notebooks": {}}
    for name, t in seconds.items():
        t = t["seconds"] if isinstance(t, dict) else t
        data["notebooks"].setdefault(name, {})[scale] = {"minutes": round(t / 60, 1)}
    if note:
        data["measured"][scale] = note
    atomic_write_text(f, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sae_kit.lab", description="Build the student lab notebooks.")
    ap.add_argument("command", choices=("build", "list", "check", "timings"))
    ap.add_argument("--notebooks", default="notebooks", help="the solution notebooks (default: notebooks)")
    ap.add_argument("--out", default="labs", help="where the student notebooks go (default: labs)")
    ap.add_argument("--scale", help="timings: the scale the report ran at")
    ap.add_argument("--report", default="results/runs.json", help="timings: the report's runs.json")
    ap.add_argument("--note", default="", help="timings: how they were measured (machine, cache state)")
    a = ap.parse_args(argv)
    src, out = Path(a.notebooks), Path(a.out)
    if a.command == "timings":
        if not a.scale:
            ap.error("timings needs --scale (ci, lab or paper)")
        record_timings(out, a.scale, Path(a.report), a.note)
        print(f"recorded {a.scale} times from {a.report} in {out / 'timings.json'}; run `build` to update the headers")
        return 0
    if not notebooks(src):
        print(f"no NN_*.ipynb notebooks in {src.resolve()}; run from the kit's folder or pass --notebooks",
              file=sys.stderr)
        return 2
    if a.command == "list":
        for p in notebooks(src):
            for m in exercises(nbformat.read(p, as_version=4)):
                print(f"{m['id']:28s} {'★' * m['difficulty']:3s} {m['minutes']:3d} min  {m['objective']}")
        return 0
    texts = build(src, out)
    extra = sorted(p for p in notebooks(out) if p not in texts)  # labs whose source notebook is gone
    if a.command == "check":
        stale = [str(p) for p, t in texts.items() if not p.exists() or p.read_text() != t] + [str(p) for p in extra]
        if stale:
            print("out of date (run `python -m sae_kit.lab build`): " + ", ".join(stale), file=sys.stderr)
            return 1
        print(f"{len(texts)} lab notebooks are up to date")
        return 0
    from .fsutil import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    for p, t in texts.items():
        atomic_write_text(p, t)
        print(f"wrote {p}")
    for p in extra:
        if nbformat.read(p, as_version=4).metadata.get("sae_kit_lab") is not None:  # only labs the build wrote
            p.unlink()
            print(f"removed {p} (its notebook is gone)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
