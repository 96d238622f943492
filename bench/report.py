"""The text the benchmarks print: the header lines every report starts with, the targets block it ends
with, and tables whose columns are declared once, so that a title and its cells always share a width."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from machine import SKEW_CORES


# ----------------------------------------------------------------------------- header lines

def load_line(m: dict[str, Any]) -> str:
    """The report's "load" line from the JSON meta, with a warning when the run was skewed."""
    return ("load        " + ("other processes used n/a" if m["other_processes_cores"] is None else
                              f"other processes used {m['other_processes_cores']:.2f} cores on average while measuring")
            + f" (1-min load average {m['loadavg_1min_before']:.2f} before, {m['loadavg_1min_after']:.2f} after)"
            + (f"\n            WARNING: other processes competed for the {m['cpu_count']} cores; the numbers are skewed"
               if (m["other_processes_cores"] or 0) > SKEW_CORES else ""))


def machine_line(m: dict[str, Any], rest: str = "") -> str:
    """The "machine" line: the CPU and its logical cores, then ``rest``."""
    return f"machine     {m['cpu']} ({m['cpu_count']} logical cores){rest}"


def torch_lines(m: dict[str, Any]) -> list[str]:
    """The device, thread and version lines of a benchmark whose meta is ``machine.torch_meta``'s."""
    return [f"device      {m['device']}: {m['device_name']}",
            f"threads     torch.get_num_threads() = {m['threads']}"
            + (" (the default on CPU: rates are per core)" if m["device"] == "cpu" and m["threads_default"] else ""),
            f"versions    torch {m['torch']}, diffusers {m['diffusers']}, transformers {m['transformers']}"]


# ----------------------------------------------------------------------------- targets

def target_line(t: dict[str, Any]) -> str:
    """A report line for one ``common.target``: status, name, value against the goal, detail."""
    value = "" if t["value"] is None else f": {t['value']:.3g} (goal {t['op']} {t['goal']:g})"
    return f"  {t['status']:<17} {t['name']}{value}" + (f"; {t['detail']}" if t["detail"] else "")


def targets_block(targets: Iterable[dict[str, Any]], title: str = "Targets") -> list[str]:
    """A blank line, ``title`` and a line per target: how every report ends."""
    return ["", title, *(target_line(t) for t in targets)]


# ----------------------------------------------------------------------------- tables

@dataclass(frozen=True)
class Column:
    """One column of a ``Table``: its title, the text of a row's cell, both aligned (``align``, a format
    alignment) to ``width``; ``gap`` goes before it, unless it is the first."""

    title: str
    width: int
    text: Callable[[Any], str]
    align: str = ">"
    gap: str = "  "


class Table:
    """Lines of a fixed-width table, each starting with ``indent``: ``header()`` and ``row(record)``."""

    def __init__(self, *columns: Column, indent: str = "  ") -> None:
        self.columns, self.indent = columns, indent

    def _line(self, cells: Iterable[str]) -> str:
        return self.indent + "".join((c.gap if i else "") + f"{text:{c.align}{c.width}}"
                                     for i, (c, text) in enumerate(zip(self.columns, cells, strict=True)))

    def header(self) -> str:
        """The titles' line."""
        return self._line(c.title for c in self.columns)

    def row(self, record: Any) -> str:
        """The line of one record: each column's text of it."""
        return self._line(c.text(record) for c in self.columns)


def on_off(value: bool) -> str:
    """A setting as the reports show it."""
    return "on" if value else "off"


# ----------------------------------------------------------------------------- summaries

def cell(text: str) -> str:
    """``text`` in a Markdown table cell (a "|" in it escaped)."""
    return text.replace("|", r"\|")


def last_line(text: str) -> str:
    """The last non-blank line of a process's output (its error, when it failed), or ""."""
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
