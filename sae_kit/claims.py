"""The claims table every notebook ends with: what the paper says, what we measured, did it hold.

    claims = Claims("00_quickstart")
    claims.add("k sets L0 exactly", paper="L0 = k", measured=f"L0 = {m['l0']:.2f}", held=m["l0"] <= k)
    claims  # renders as a table in Jupyter; claims.save() writes results/claims/<name>.json

`held` is True / False for a claim checked at this scale, or None when the scale is too small
to decide (say why in `note`). The report (``python -m sae_kit.report``) gathers every JSON.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import get_scale


@dataclass
class Claim:
    claim: str
    paper: str
    measured: str
    held: bool | None
    note: str = ""

    @property
    def verdict(self) -> str:
        return {True: "held", False: "did not hold", None: "not decided"}[self.held]


class Claims:
    """An ordered list of claims for one notebook."""

    def __init__(self, notebook: str, scale: str | None = None):
        self.notebook = notebook
        self.scale = scale or get_scale().name
        self.items: list[Claim] = []

    def add(self, claim: str, paper: str, measured: str, held: bool | None, note: str = "") -> Claim:
        c = Claim(claim, paper, measured, None if held is None else bool(held), note)
        self.items.append(c)
        return c

    def to_markdown(self) -> str:
        rows = ["| claim | paper | measured | verdict | note |", "|---|---|---|---|---|"]
        for c in self.items:
            cells = [c.claim, c.paper, c.measured, f"**{c.verdict}**", c.note]
            rows.append("| " + " | ".join(s.replace("|", "\\|").replace("\n", " ") for s in cells) + " |")
        return "\n".join(rows)

    def _repr_html_(self) -> str:
        colour = {True: "#1a7f37", False: "#cf222e", None: "#9a6700"}
        head = "".join(f"<th style='text-align:left'>{h}</th>" for h in ("claim", "paper", "measured", "verdict", "note"))
        body = "".join(
            "<tr>" + "".join(f"<td style='text-align:left'>{html.escape(s)}</td>" for s in (c.claim, c.paper, c.measured))
            + f"<td style='color:{colour[c.held]};font-weight:bold'>{c.verdict}</td>"
            + f"<td style='text-align:left'>{html.escape(c.note)}</td></tr>"
            for c in self.items)
        return (f"<p><b>Claims — {html.escape(self.notebook)}</b> (scale <code>{self.scale}</code>)</p>"
                f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def __repr__(self) -> str:
        return f"Claims({self.notebook}, scale={self.scale})\n" + self.to_markdown()

    def save(self, folder: str | Path | None = None) -> Path:
        """Write ``<folder>/claims/<notebook>.json`` (default folder: `config.results_dir`)."""
        from .config import results_dir
        from .fsutil import atomic_write_text

        folder = Path(folder or results_dir()) / "claims"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.notebook}.json"
        atomic_write_text(path, json.dumps({"notebook": self.notebook, "scale": self.scale,
                                            "claims": [asdict(c) for c in self.items]}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Claims":
        data = json.loads(Path(path).read_text())
        out = cls(data["notebook"], data["scale"])
        out.items = [Claim(**c) for c in data["claims"]]
        return out


def bootstrap_ci(values, n_boot: int = 5000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): a percentile bootstrap interval for the mean of `values` (e.g. paired
    differences, one per concept). Fewer than two values give (mean, -inf, inf): nothing is decided."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return (float(v.mean()) if len(v) else float("nan"), float("-inf"), float("inf"))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(v.mean()), float(lo), float(hi)
