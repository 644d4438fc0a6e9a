"""Run every notebook headless and write ``results/REPORT.md``.

    python -m sae_kit.report                  # all notebooks at $SAE_KIT_SCALE (default lab)
    python -m sae_kit.report --scale ci 00    # only notebooks whose name starts with 00

Each notebook is executed in place of a copy (the stored notebooks stay stripped), saved as HTML
under ``results/html/``, its figures land in ``results/figures/`` and its claims table in
``results/claims/``. The report gathers every claims table, with run times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .claims import Claims


def run_notebook(path: Path, out_dir: Path, timeout: int = 3600) -> float:
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


def write_report(out_dir: Path, timings: dict[str, float], scale: str) -> Path:
    lines = ["# sae-kit results", "",
             f"Scale `{scale}`. Each section is one notebook's claims table: what the paper says, "
             f"what the notebook measured on the kit's model, and whether it held. Executed notebooks "
             f"are in `html/`, figures in `figures/`.", ""]
    for path in sorted((out_dir / "claims").glob("*.json")):
        c = Claims.load(path)
        t = timings.get(c.notebook)
        lines += [f"## {c.notebook}" + (f" ({t / 60:.1f} min)" if t else ""), "",
                  f"scale `{c.scale}`", "", c.to_markdown(), ""]
    report = out_dir / "REPORT.md"
    report.write_text("\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("only", nargs="*", help="notebook name prefixes (default: all)")
    ap.add_argument("--scale", default=None, help="ci | lab | paper (default: $SAE_KIT_SCALE or lab)")
    ap.add_argument("--notebooks", default="notebooks")
    ap.add_argument("--out", default="results")
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
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    failed = []
    for nb in nbs:
        print(f"running {nb.name} at scale {scale} ...", flush=True)
        try:
            timings[nb.stem] = run_notebook(nb.resolve(), out)
            print(f"  done in {timings[nb.stem] / 60:.1f} min", flush=True)
        except Exception as e:  # keep going: the report says which failed
            failed.append(nb.name)
            print(f"  FAILED: {e.__class__.__name__}: {str(e)[-2000:]}", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    timings_file.write_text(json.dumps(timings, indent=1))
    report = write_report(out, timings, scale)
    print(f"wrote {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
