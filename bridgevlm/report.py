"""A run report: `report.json` (machine-readable) and `report.md` (for people), built in sections
so that each stage of a pipeline adds its own metrics, tables and figures."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .io import atomic_write_text, write_json


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[str] = field(default_factory=list)  # markdown tables
    figures: list[str] = field(default_factory=list)  # paths relative to the report directory


class Report:
    def __init__(self, out_dir: str | Path, title: str):
        self.out_dir, self.title = Path(out_dir), title
        self.data: dict = {"metrics": {}, "timings_s": {}}
        self.sections: list[Section] = []

    def add_metrics(self, group: str, metrics: dict) -> None:
        """metrics.<group>.<name> in report.json."""
        self.data["metrics"].setdefault(group, {}).update(metrics)

    def add_timing(self, step: str, seconds: float) -> None:
        self.data["timings_s"][step] = round(seconds, 2)

    def set(self, key: str, value) -> None:
        self.data[key] = value

    def add_section(self, section: Section) -> None:
        self.sections.append(section)

    def write(self) -> tuple[Path, Path]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        json_path, md_path = self.out_dir / "report.json", self.out_dir / "report.md"
        write_json(json_path, self.data)
        lines = [f"# {self.title}", ""]
        for section in self.sections:
            lines += [f"## {section.title}", ""]
            if section.text:
                lines += [section.text, ""]
            for table in section.tables:
                lines += [table, ""]
            lines += [f"![{Path(f).stem}]({f})" for f in section.figures]
            if section.figures:
                lines.append("")
        if self.data["timings_s"]:
            lines += ["## Wall time", "", markdown_table(["step", "seconds"], list(self.data["timings_s"].items()))]
        atomic_write_text(md_path, "\n".join(lines) + "\n")
        return json_path, md_path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def plot_curves(path: str | Path, curves: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str,
                title: str, log_y: bool = False) -> Path:
    """Line plot of named (x, y) curves to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
