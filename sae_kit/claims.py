"""The claims table every notebook ends with: what the paper says, what we measured, did it hold.

    claims = Claims("00_quickstart")
    claims.add("k sets L0 exactly", paper="L0 = k", measured=f"L0 = {m['l0']:.2f}", held=m["l0"] <= k,
               rule="held: L0 ≤ k on every held-out token", source="Gao et al. §2.3", figure="Fig. 2")
    claims  # renders as a table in Jupyter; claims.save() writes results/claims/<name>.json

`held` is True / False for a claim checked at this scale, or None when the scale is too small
to decide. Each row keeps the decision *rule* (the same for every run) apart from the *reason* for
this run's verdict (``note``), so a row never reads as a contradiction. The decision helpers below
(`interval`, `beats_noise`, `threshold`, `monotone`) return a `Verdict` — the held value and the
reason — which `Claims.add` accepts in place of `held`. The report (``python -m sae_kit.report``)
gathers every JSON.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .config import get_scale


class Verdict(NamedTuple):
    """What a decision helper returns: ``held`` (True / False / None) and the reason, in words."""

    held: bool | None
    reason: str


@dataclass
class Claim:
    claim: str
    paper: str  # what the paper says
    measured: str  # what this run measured
    held: bool | None
    note: str = ""  # why this run got its verdict (the reason), or other context
    rule: str = ""  # the decision rule, the same for every run
    source: str = ""  # where the paper says it (section / figure)
    figure: str = ""  # the notebook figure or table that shows it

    @property
    def verdict(self) -> str:
        return Claims._word(self.held)


class Claims:
    """An ordered list of claims for one notebook."""

    @staticmethod
    def _word(held: bool | None) -> str:
        return {True: "held", False: "did not hold", None: "not decided"}[held]

    def __init__(self, notebook: str, scale: str | None = None):
        self.notebook = notebook
        self.scale = scale or get_scale().name
        self.items: list[Claim] = []

    def add(self, claim: str, paper: str, measured: str, held: "bool | None | Verdict", note: str = "",
            rule: str = "", source: str = "", figure: str = "") -> Claim:
        """Append a row. `held` may be a `Verdict`; its reason fills `note` unless `note` is given."""
        if isinstance(held, Verdict):
            held, note = held.held, note or held.reason
        c = Claim(claim, paper, measured, None if held is None else bool(held), note, rule, source, figure)
        self.items.append(c)
        return c

    @staticmethod
    def _cells(c: Claim) -> list[str]:
        paper = c.paper + (f" ({c.source})" if c.source else "")
        measured = c.measured + (f" [{c.figure}]" if c.figure else "")
        return [c.claim, paper, measured, c.verdict, c.note, c.rule]

    HEADERS = ("claim", "paper (where)", "measured [shown in]", "verdict", "why this verdict", "rule")

    def to_markdown(self) -> str:
        rows = ["| " + " | ".join(self.HEADERS) + " |", "|" + "---|" * len(self.HEADERS)]
        for c in self.items:
            cells = self._cells(c)
            cells[3] = f"**{cells[3]}**"
            rows.append("| " + " | ".join(s.replace("|", "\\|").replace("\n", " ") for s in cells) + " |")
        return "\n".join(rows)

    def _repr_html_(self) -> str:
        colour = {True: "#1a7f37", False: "#cf222e", None: "#9a6700"}
        head = "".join(f"<th style='text-align:left'>{h}</th>" for h in self.HEADERS)
        td = lambda s, style="": f"<td style='text-align:left;{style}'>{html.escape(s)}</td>"
        body = "".join(
            "<tr>" + "".join(td(s) for s in cells[:3])
            + td(cells[3], f"color:{colour[c.held]};font-weight:bold")
            + td(cells[4]) + td(cells[5], "color:#57606a") + "</tr>"
            for c in self.items for cells in [self._cells(c)])
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


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def interval(lo: float, hi: float, above: float = 0.0, below: float | None = None, what: str = "the interval") -> Verdict:
    """Held when the whole interval [lo, hi] lies above `above`; did not hold when it lies below
    `below` (default: `above`); else not decided. E.g. a bootstrap interval of a paired difference."""
    below = above if below is None else below
    span = f"{what} [{_fmt(lo)}, {_fmt(hi)}]"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return Verdict(None, f"{what} is unbounded (too few samples to decide)")
    if lo > above:
        return Verdict(True, f"{span} lies above {_fmt(above)}")
    if hi < below:
        return Verdict(False, f"{span} lies below {_fmt(below)}")
    return Verdict(None, f"{span} reaches from below {_fmt(above)} to above {_fmt(below)}" if above != below
                   else f"{span} contains {_fmt(above)}")


def beats_noise(gaps, noise: float, better: str = "lower", what: str = "the gap") -> Verdict:
    """Is a variant better than a reference at every point (e.g. every k), beyond seed noise?

    Args:
        gaps: log ratios variant / reference, one per point (negative: the variant is lower).
        noise: the seed noise a gap must beat, as a log ratio (nan or inf: no estimate, e.g. one seed).
        better: ``"lower"`` when a negative gap is the paper's direction, ``"higher"`` when positive.
    """
    g = np.asarray(list(gaps), dtype=float)
    sign = -1.0 if better == "lower" else 1.0
    if g.size == 0:
        return Verdict(None, f"no {what} to judge")
    if not np.isfinite(g).all():
        return Verdict(None, f"{what} is not finite at {int((~np.isfinite(g)).sum())} of {g.size} points "
                             f"(a metric at or below zero)")
    if not np.isfinite(noise):
        return Verdict(None, "one seed only: no estimate of seed noise to beat")
    n_for, n_against = int((sign * g > noise).sum()), int((sign * g < -noise).sum())
    if n_for == g.size:
        return Verdict(True, f"{what} beats seed noise (±{100 * noise:.1f}%) in the paper's direction at {_all_points(g.size)}")
    if n_against == g.size:
        return Verdict(False, f"{what} beats seed noise (±{100 * noise:.1f}%) against the paper at {_all_points(g.size)}")
    return Verdict(None, f"{n_for} of {g.size} points beat seed noise (±{100 * noise:.1f}%) in the paper's direction, "
                         f"{n_against} against it, {g.size - n_for - n_against} within it")


def _all_points(n: int) -> str:
    return "its one point" if n == 1 else f"all {n} points"


def threshold(value: float, held_above: float, failed_below: float, what: str = "the value") -> Verdict:
    """Held when `value` > `held_above`, did not hold when it is < `failed_below`, else not decided
    (for a lower-is-better value, pass negatives)."""
    if not np.isfinite(value):
        return Verdict(None, f"{what} is not finite")
    if value > held_above:
        return Verdict(True, f"{what} {_fmt(value)} > {_fmt(held_above)}")
    if value < failed_below:
        return Verdict(False, f"{what} {_fmt(value)} < {_fmt(failed_below)}")
    return Verdict(None, f"{what} {_fmt(value)} is between {_fmt(failed_below)} and {_fmt(held_above)}")


def share_below(share: float, held_below: float, failed_above: float, what: str = "the share") -> Verdict:
    """For a share where lower is what the paper says (dead latents): held when `share` < `held_below`,
    did not hold when it is > `failed_above`, else not decided. The reason reads in percent."""
    pct = lambda v: f"{100 * v:.2f}%"
    if not np.isfinite(share):
        return Verdict(None, f"{what} is not finite")
    if share < held_below:
        return Verdict(True, f"{what} {pct(share)} is under {pct(held_below)}")
    if share > failed_above:
        return Verdict(False, f"{what} {pct(share)} is over {pct(failed_above)}")
    return Verdict(None, f"{what} {pct(share)} is between {pct(held_below)} and {pct(failed_above)}")


def monotone(values, noise: float = 0.0, increasing: bool = True, what: str = "the values") -> Verdict:
    """Does a sequence move one way within noise? Held when no step goes against the direction by
    more than `noise` (absolute) and the net change beats `noise`; did not hold when some step goes
    against it by more than `noise`; not decided when the net change is within noise."""
    v = np.asarray(list(values), dtype=float)
    if v.size < 2:
        return Verdict(None, f"{what}: fewer than two points")
    steps = np.diff(v) * (1 if increasing else -1)
    word = "rise" if increasing else "fall"
    worst = int(np.argmin(steps))
    if steps[worst] < -noise:
        return Verdict(False, f"{what} go against the direction between points {worst} and {worst + 1} "
                              f"by {_fmt(-steps[worst])} (> noise {_fmt(noise)})")
    if (v[-1] - v[0]) * (1 if increasing else -1) <= noise:
        return Verdict(None, f"{what} change by {_fmt(v[-1] - v[0])} in all, within noise {_fmt(noise)}")
    return Verdict(True, f"{what} {word} at every step (within noise {_fmt(noise)})")


SHARE_NOISE_FLOOR = 0.002  # 0.2 points (~10 of 4,608 latents): equal seeds give sd 0, and one latent must not decide


def share_noise(sds) -> float:
    """The noise a difference of two shares (dead %, under-used %) must beat: twice the largest seed
    sd, floored at `SHARE_NOISE_FLOOR`; nan when no sd was measured (one seed)."""
    sds = [float(v) for v in sds if np.isfinite(v)]
    return max(2 * max(sds), SHARE_NOISE_FLOOR) if sds else float("nan")


def agreement(verdict: Verdict, other: Verdict) -> str:
    """How a second metric's verdict reads beside the first: "the same verdict" or "verdict '<word>'"."""
    return "the same verdict" if other.held == verdict.held else f"verdict '{Claims._word(other.held)}'"


def with_second(verdict: Verdict, other: Verdict, on: str) -> Verdict:
    """`verdict`, unchanged, with the same rule's verdict on a second metric (`on`) in its reason."""
    return Verdict(verdict.held, f"{verdict.reason}; the same rule on {on} gives {agreement(verdict, other)} "
                                 f"({other.reason})")


def noise_text(noise: float) -> str:
    """'seed noise ±x%' for a relative noise, or 'one seed' when there is no estimate (never '±nan%')."""
    return f"seed noise ±{100 * noise:.1f}%" if np.isfinite(noise) else "one seed (no noise estimate)"


def bootstrap_ci(values, n_boot: int = 5000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): a percentile bootstrap interval for the mean of `values` (e.g. paired
    differences, one per concept). Fewer than two values give (mean, -inf, inf): nothing is decided."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return (float(v.mean()) if len(v) else float("nan"), float("-inf"), float("inf"))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(v.mean()), float(lo), float(hi)
