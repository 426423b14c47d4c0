"""Plain-text tables for the terminal."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

WIDTH = 100


@dataclass
class Table:
    title: str
    columns: list[str]  # the first names the row labels
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, label: str, *cells: str) -> None:
        self.rows.append([label, *cells])

    def render(self) -> str:
        # Short rows (a ratio row with nothing to compare in the last columns) end blank.
        rows = [row + [""] * (len(self.columns) - len(row)) for row in self.rows]
        widths = [
            max(len(row[i]) for row in [self.columns, *rows]) for i in range(len(self.columns))
        ]

        def line(cells: list[str]) -> str:
            label = cells[0].ljust(widths[0])
            rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
            return "  " + "   ".join([label, *rest]).rstrip()

        rule = "  " + "-" * (sum(widths) + 3 * (len(widths) - 1))
        out = [*textwrap.wrap(self.title, WIDTH, subsequent_indent="   ")]
        out += [line(self.columns), rule, *(line(row) for row in rows)]
        for note in self.notes:
            out += textwrap.wrap(note, WIDTH, initial_indent="  · ", subsequent_indent="    ")
        return "\n".join(out)


def ms(value: float) -> str:
    if value < 10:
        return f"{value:.2f}"
    if value < 1000:
        return f"{value:.1f}"
    return f"{value:.0f}"


def ratio(numerator: float, denominator: float) -> str:
    if denominator <= 0:
        return "n/a"
    value = numerator / denominator
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"
