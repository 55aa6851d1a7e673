"""The demo's console: the before/after table, progress bars, and each case's story.

Rich draws colours and live progress bars when it is installed, else tqdm bars, else plain lines;
the library logs, only this command prints.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from gradwatch.demo_cases import CaseResult, ProgressFn, describe, format_loss, format_ratio
from gradwatch.findings import Diagnosis


def _fixes_cell(result: CaseResult) -> str:
    if result.report is None:
        return "-"
    if not result.report.applied:
        return "none applicable"
    return " + ".join(result.fixes_applied)


def table_rows(results: Sequence[CaseResult]) -> list[dict[str, str]]:
    """One dict of display strings per case (the columns of the before/after table)."""
    rows = []
    for r in results:
        after = r.after
        rows.append({
            "case": r.name,
            "gradwatch reported": describe(r.before.diagnosis),
            "fixes applied": _fixes_cell(r),
            "loss before -> after": f"{format_loss(r.before.final_loss)} -> {format_loss(after.final_loss) if after else '-'}",
            "grad ratio before -> after": f"{format_ratio(r.before.grad_ratio)} -> {format_ratio(after.grad_ratio) if after else '-'}",
            "after the fixes": describe(after.diagnosis) if after else "-",
            "time": f"{r.before.seconds + (after.seconds if after else 0.0):.1f}s",
            "ok": "yes" if r.ok else "NO",
        })
    return rows


def plain_table(rows: Sequence[dict[str, str]]) -> str:
    """Fixed-width text table of :func:`table_rows`."""
    if not rows:
        return ""
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(row[c].ljust(widths[c]) for c in cols) for row in rows]
    return "\n".join(lines)


class DemoConsole:
    """Prints with rich when available (colours, live progress bars), else plainly (tqdm bars if installed)."""

    def __init__(self, progress: bool = True) -> None:
        self.show_progress = progress
        try:
            from rich.console import Console

            # a pipe or CI log gets a wide console instead of rich's 80-column default
            self.rich: Any = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
        except ImportError:  # rich is optional
            self.rich = None

    def print(self, text: str = "", style: str | None = None) -> None:
        if self.rich is not None:
            self.rich.print(text, style=style, markup=False, soft_wrap=True)
        else:
            print(text, flush=True)

    def rule(self, title: str) -> None:
        if self.rich is not None:
            self.rich.rule(title, style="bold")
        else:
            print(f"\n== {title} ==", flush=True)

    @contextlib.contextmanager
    def progress(self, label: str, total: int) -> Iterator[ProgressFn | None]:
        if not self.show_progress:
            yield None
            return
        if self.rich is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn())
            with Progress(*columns, console=self.rich, transient=False) as bar:
                task = bar.add_task(label, total=total, loss="-")

                def on_step(step: int, loss: float) -> None:
                    bar.update(task, advance=1, loss=f"{loss:.3g}")

                yield on_step
            return
        try:
            from tqdm import tqdm
        except ImportError:
            print(f"{label}: training {total} steps ...", flush=True)
            yield None
            return
        with tqdm(total=total, desc=label, file=sys.stdout, leave=True, dynamic_ncols=True) as bar:

            def on_step_tqdm(step: int, loss: float) -> None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss:.3g}")

            yield on_step_tqdm

    def table(self, rows: Sequence[dict[str, str]], title: str) -> None:
        if self.rich is None or not rows:
            print(f"\n{title}\n{plain_table(rows)}", flush=True)
            return
        from rich.table import Table

        table = Table(title=title, show_lines=False)
        for col in rows[0]:
            numeric = col.startswith(("loss ", "grad ratio", "time"))
            table.add_column(col, overflow="fold", no_wrap=numeric or col == "case", justify="right" if numeric else "left")
        for row in rows:
            style = None if row["ok"] == "yes" else "red"
            table.add_row(*row.values(), style=style)
        self.rich.print(table)


def _print_diagnosis(console: DemoConsole, diagnosis: Diagnosis, heading: str) -> None:
    console.print(f"{heading}: {describe(diagnosis)}", style="bold")
    for f in diagnosis.findings:
        console.print(f"  [{f.severity}] {f.kind}: {f.message}", style="red" if f.severity == "critical" else "yellow")
        layers = ", ".join(f.layers[:6]) + (f" (+{len(f.layers) - 6} more)" if len(f.layers) > 6 else "")
        console.print(f"    layers: {layers}")
        if f.fixes:
            console.print(f"    recommended fixes: {', '.join(f.fixes)}")


def print_case(console: DemoConsole, result: CaseResult) -> None:
    """One case's story: the diagnosis, what ``apply_fixes`` did, the numbers before and after, the verdict."""
    _print_diagnosis(console, result.before.diagnosis, "gradwatch reports")
    if result.report is not None:
        console.print("apply_fixes:", style="bold")
        for change in result.report.changes:
            console.print(f"  {change.summary()}", style="green" if change.applied else None)
    if result.after is not None:
        console.print(
            f"loss {format_loss(result.before.final_loss)} -> {format_loss(result.after.final_loss)} "
            f"(x{format_ratio(result.loss_ratio)}), first/last gradient {format_ratio(result.before.grad_ratio)} -> "
            f"{format_ratio(result.after.grad_ratio)}; after the fixes: {describe(result.after.diagnosis)}"
        )
    for note in result.notes:
        console.print(f"note: {note}", style="yellow")
    for failure in result.failures:
        console.print(f"DID NOT BEHAVE: {failure}", style="bold red")

