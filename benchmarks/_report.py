"""Writes one benchmark's results into its own delimited section of BENCHMARKS.md (other sections kept)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Every number here is written by a script under `benchmarks/`; each section names the command, date and "
    "machine. Medians of several runs; ratios are measured side by side in one run.\n"
)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def preamble() -> str:
    cmd = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"- command: `{cmd}`\n- date: {now}\n- machine: {machine()}\n"


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section ``name`` of BENCHMARKS.md with ``body`` under ``title``."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n## {title}\n\n{preamble()}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)


def speed_quality_axes(ax, xlabel: str, ylabel: str, title: str, floor: float = -1.0, legend_size: int = 7,
                       legend_cols: int = 1, legend_loc: str = "best") -> None:
    """Label a quality-vs-speed plot and draw the speed-up target (2x) and the quality floor as dotted lines."""
    ax.axvline(2.0, color="grey", ls=":", lw=1)
    ax.axhline(floor, color="grey", ls=":", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend_loc == "below":  # outside the axes, where no point can hide behind it
        ax.legend(fontsize=legend_size, ncol=max(legend_cols, 2), loc="upper center", bbox_to_anchor=(0.5, -0.16))
    else:
        ax.legend(fontsize=legend_size, ncol=legend_cols, loc=legend_loc)
    ax.grid(alpha=0.3)


def save_figure(fig, path: Path, title: str = "") -> None:
    """Title (when given), lay out, write and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
