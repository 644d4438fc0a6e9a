"""Run every notebook headless and write ``results/REPORT.md``.

    python -m sae_kit.report                  # all notebooks at $SAE_KIT_SCALE (default lab)
    python -m sae_kit.report --scale ci 00    # only notebooks whose name starts with 00
    make reproduce                            # all at lab, into docs/results/lab/ (committed)

Each notebook is executed in place of a copy (the stored notebooks stay stripped), saved as HTML
under ``results/html/``, its figures land in ``results/figures/`` and its claims table in
``results/claims/``. The report gathers every claims table, with each notebook's run time, date,
commit and machine (kept in ``runs.json``, so a report can gather notebooks run at different times).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .claims import Claims


def provenance() -> dict:
    """When, from which commit and on what machine a notebook ran."""
    import datetime
    import platform
    import subprocess

    import torch

    from .config import cpu_name

    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--",
                                ":/", ":(exclude,top)docs/results"],  # a report's own results are not code
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit = (commit + (" + uncommitted changes" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
            "machine": f"{platform.machine()} ({cpu_name()}), {os.cpu_count()} CPU cores, torch {torch.__version__} with "
                       f"{os.environ.get('OMP_NUM_THREADS') or torch.get_num_threads()} threads, {gpu}"}


_CACHED = ("saes", "stores", "snmf", "evals")  # what a notebook computes once and then reads back
_KIND_WORDS = {"saes": ("SAE", "SAEs"), "stores": ("activation store", "activation stores"),
               "snmf": ("SNMF fit", "SNMF fits"), "evals": ("SAE evaluation", "SAE evaluations")}


def cache_contents() -> dict[str, set[str]]:
    """The entries of the kit's cache (SAEs, activation stores, SNMF fits), by kind."""
    from .config import cache_dir

    root = cache_dir()
    return {kind: {p.name for p in (root / kind).iterdir() if not p.name.endswith((".ckpt", ".tmp", ".lock"))}
            if (root / kind).is_dir() else set() for kind in _CACHED}


def cache_state(before: dict[str, set[str]], after: dict[str, set[str]]) -> dict:
    """What a run built against what it found: ``{"built": {kind: n}, "found": {kind: n}}``. A run
    that built nothing ran on a warm cache; its time is not a cold-start time."""
    return {"built": {k: len(after[k] - before[k]) for k in _CACHED},
            "found": {k: len(before[k]) for k in _CACHED}}


def _cache_words(state: dict | None) -> str:
    if not state:
        return ""
    built = sum(state["built"].values())
    if built == 0:
        if "evals" in state["built"]:  # (records from before evaluations were cached lack the key)
            return "warm cache: nothing trained, harvested or evaluated afresh"
        return "warm cache: nothing trained or harvested"
    return "built " + ", ".join(f"{n} {_KIND_WORDS[k][n != 1]}" for k, n in state["built"].items() if n) \
        + f" ({sum(state['found'].values())} cache entries were there already)"


def run_notebook(path: Path, out_dir: Path, timeout: int = 4 * 3600) -> float:
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    nb = nbformat.read(path, as_version=4)
    t0 = time.time()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    finally:
        html_dir = out_dir / "html"
        html_dir.mkdir(parents=True, exist_ok=True)
        body, _ = HTMLExporter().from_notebook_node(nb)
        (html_dir / f"{path.stem}.html").write_text(body)
    return time.time() - t0


def _assigned_names(code: str) -> set[str]:
    """The names a cell's top-level statements assign."""
    import ast

    names = set()
    for node in ast.parse(code).body:
        for target in getattr(node, "targets", [getattr(node, "target", None)]):
            if target is not None:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def run_notebook_plain(path: Path) -> float:
    """Run a notebook's code cells in this Python process, in order, without a Jupyter kernel (for a
    machine that has the kit but no Jupyter, such as a GPU node). Cells share one namespace and run
    with the notebook's folder as the working directory, as under a kernel; figures go to files only
    (matplotlib's Agg backend). No executed HTML is written. A cell that needs the interactive widgets
    (the explorer) is skipped when ipywidgets is missing; any other error stops the notebook."""
    import json as _json
    import traceback

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [("".join(c["source"]) if isinstance(c["source"], list) else c["source"])
             for c in _json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    namespace: dict = {"__name__": "__main__"}
    skipped: set[str] = set()  # names that a skipped cell would have defined
    here = os.getcwd()
    t0 = time.time()
    os.chdir(path.parent)
    try:
        for i, source in enumerate(cells, 1):
            code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
            try:
                exec(compile(code, f"<{path.stem} cell {i}>", "exec"), namespace)
            except ModuleNotFoundError as e:
                if e.name and e.name.split(".")[0] in ("ipywidgets", "IPython"):
                    print(f"  cell {i} skipped: it needs {e.name}, which is not installed", flush=True)
                    skipped |= _assigned_names(code)
                    continue
                raise
            except NameError as e:
                if e.name in skipped:  # it reads what a skipped widget cell would have made
                    print(f"  cell {i} skipped: it uses {e.name!r} from a skipped cell", flush=True)
                    skipped |= _assigned_names(code)
                    continue
                raise RuntimeError(f"{path.name}, code cell {i}: NameError: {e}") from e
            except Exception as e:
                raise RuntimeError(f"{path.name}, code cell {i}: {e.__class__.__name__}: {e}\n"
                                   f"{traceback.format_exc()[-3000:]}") from e
            finally:
                plt.close("all")
    finally:
        os.chdir(here)
        namespace.clear()
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next notebook starts with the GPU's memory free
    return time.time() - t0


def write_report(out_dir: Path, timings: dict, scale: str) -> Path:
    """Gather every claims table under `out_dir` into ``REPORT.md``; `timings` maps a notebook to its
    run record (seconds, date, commit, machine) or, from older runs, to its seconds."""
    lines = ["# sae-kit results", "",
             f"Scale `{scale}`. Each section is one notebook's claims table: what the paper says (and where), "
             f"what the notebook measured on the kit's model (and the figure that shows it), the verdict, why, "
             f"and the decision rule. Figures are in `figures/`; executed notebooks in `html/` (not committed).", ""]
    for path in sorted((out_dir / "claims").glob("*.json")):
        c = Claims.load(path)
        run = timings.get(c.notebook)
        run = {"seconds": run} if isinstance(run, (int, float)) else (run or {})
        where = ", ".join(f"{k} {run[k]}" for k in ("date", "commit", "machine") if k in run)
        if run.get("cache"):
            where += "; " + _cache_words(run["cache"])
        lines += [f"## {c.notebook}" + (f" ({run['seconds'] / 60:.1f} min)" if "seconds" in run else ""), "",
                  f"scale `{c.scale}`" + (f"; ran {where}" if where else ""), "", c.to_markdown(), ""]
    book = Path(__file__).resolve().parent.parent / "notebooks"  # the kit's own notebooks, when in a checkout
    have = {p.stem for p in (out_dir / "claims").glob("*.json")}
    missing = sorted(p.stem for p in book.glob("[0-9]*.ipynb") if p.stem not in have) if book.is_dir() else []
    if missing:
        lines += ["## Not in this report", "", "Not yet run into this folder: " + ", ".join(f"`{m}`" for m in missing)
                  + f" (`make reproduce SCALE={scale} ONLY=<number>` adds one).", ""]
    report = out_dir / "REPORT.md"
    report.write_text("\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("only", nargs="*", help="notebook name prefixes (default: all)")
    ap.add_argument("--scale", default=None, help="ci | lab | paper (default: $SAE_KIT_SCALE or lab)")
    ap.add_argument("--notebooks", default="notebooks")
    ap.add_argument("--out", default="results")
    ap.add_argument("--no-kernel", dest="kernel", action="store_false",
                    help="run the code cells in this process, without Jupyter (no executed HTML)")
    args = ap.parse_args(argv)
    if args.scale:
        os.environ["SAE_KIT_SCALE"] = args.scale
    scale = os.environ.get("SAE_KIT_SCALE", "lab")
    out = Path(args.out).resolve()
    os.environ["SAE_KIT_RESULTS"] = str(out)
    nbs = sorted(p for p in Path(args.notebooks).glob("[0-9]*.ipynb")
                 if not args.only or any(p.name.startswith(o) for o in args.only))
    if not nbs:
        print(f"no notebooks matched {args.only} in {args.notebooks}", file=sys.stderr)
        return 2
    timings_file = out / "runs.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    failed = []
    for nb in nbs:
        print(f"running {nb.name} at scale {scale} ...", flush=True)
        try:
            before = cache_contents()
            seconds = run_notebook(nb.resolve(), out) if args.kernel else run_notebook_plain(nb.resolve())
            timings[nb.stem] = {"seconds": round(seconds, 1), **provenance(),
                                "cache": cache_state(before, cache_contents())}
            print(f"  done in {seconds / 60:.1f} min", flush=True)
            out.mkdir(parents=True, exist_ok=True)  # after each notebook: a long run stopped later keeps it
            timings_file.write_text(json.dumps(timings, indent=1))
        except Exception as e:  # keep going: the report says which failed
            failed.append(nb.name)
            print(f"  FAILED: {e.__class__.__name__}: {str(e)[-2000:]}", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    timings_file.write_text(json.dumps(timings, indent=1))  # (a run record per notebook)
    report = write_report(out, timings, scale)
    print(f"wrote {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
