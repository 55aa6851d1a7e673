"""The ``gradwatch`` command: ``gradwatch report LOGDIR`` and ``gradwatch demo``.

``gradwatch report LOGDIR [--out DIR]`` reads the TensorBoard event files under LOGDIR (every
directory holding event files is a run), rebuilds each run's per-layer history, runs the same
diagnosis the live watcher runs (same thresholds, same window), prints the report, and writes the
gradient-flow figure (``gradient_flow.png``) and the history (``history.csv``, long format) per run.

Exit status: 0 when at least one run was reported, 1 when LOGDIR holds no gradwatch events,
2 on usage errors (a path that does not exist, bad options).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_OK, EXIT_NO_DATA, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    from gradwatch import __version__

    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="Gradient-flow diagnostics for PyTorch: diagnose runs from their TensorBoard logs, run the demo.",
    )
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    rep = sub.add_parser(
        "report", help="diagnose the runs under a TensorBoard log directory",
        description="Read gradwatch's TensorBoard events under LOGDIR, diagnose each run offline, print the "
                    "report and write gradient_flow.png and history.csv per run.",
    )
    rep.add_argument("logdir", metavar="LOGDIR", help="a TensorBoard log directory (runs are searched recursively)")
    rep.add_argument("--out", metavar="DIR", default="gradwatch-report",
                     help="where to write <run>/gradient_flow.png and <run>/history.csv (default: ./gradwatch-report)")
    rep.add_argument("--window", metavar="N", type=int, default=None,
                     help="diagnose the last N collected steps (default: the window the run used, 50)")
    rep.add_argument("--no-files", action="store_true", help="print the report only, write no PNG/CSV")
    sub.add_parser("demo", help="run the demo (arguments are passed on; see `gradwatch demo --help`)", add_help=False)
    return parser


def _safe_name(name: str) -> str:
    name = name.strip("./\\") or "run"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("/", "__").replace("\\", "__"))


def _changes(texts: list[tuple[int, str]]) -> list[str]:
    """First line of each diagnosis text logged during the run (``step N: ...``)."""
    out = []
    for _, text in texts:
        first = text.strip().splitlines()[0] if text.strip() else ""
        out.append(first.strip("* "))
    return out


def report(logdir: str, out: str | None = "gradwatch-report", window: int | None = None) -> int:
    """Print the offline report of every run under ``logdir``; returns the exit status."""
    from gradwatch.figure import figure_from_dataframe, figure_from_diagnosis, save_figure
    from gradwatch.logs import describe_steps, read_logdir

    root = Path(logdir)
    if not root.exists():
        print(f"gradwatch report: {logdir} does not exist. Pass the directory given to "
              "gradwatch.watch(log_dir=...) or to TensorBoard's --logdir.", file=sys.stderr)
        return EXIT_USAGE
    if window is not None and window < 1:
        print(f"gradwatch report: --window must be >= 1, got {window}", file=sys.stderr)
        return EXIT_USAGE
    runs = read_logdir(root)
    reported = 0
    skipped: list[str] = []
    for run in runs:
        if not run.has_gradwatch_data:
            why = "; ".join(run.problems) if run.problems else "its events hold no gradwatch tags"
            skipped.append(f"{run.name}: {why}")
            continue
        reported += 1
        th = run.thresholds()
        if window is not None:
            th = th.updated(window=window)
        diagnosis = run.diagnose(th)
        n_layers = len(run.meta.get("layers", [])) or run.frame.loc[run.frame["depth"] >= 0, "layer"].nunique()
        title = run.name if run.name != "." else root.resolve().name
        print(f"== run {title} ({run.path}) - {describe_steps(run)}, {n_layers} layers ==")
        for problem in run.problems:
            print(f"warning: {problem}")
        print(diagnosis)
        changes = _changes(run.texts)
        if changes:
            print("diagnosis as logged during the run:")
            for line in changes:
                print(f"  {line}")
        if out is not None:
            target = Path(out) / _safe_name(title)
            try:
                target.mkdir(parents=True, exist_ok=True)
                fig = figure_from_diagnosis(diagnosis, name=title) if diagnosis.layers else \
                    figure_from_dataframe(run.frame, diagnosis, last=th.window)
                save_figure(fig, target / "gradient_flow.png")
                run.frame.to_csv(target / "history.csv", index=False)
                print(f"wrote {target / 'gradient_flow.png'} and {target / 'history.csv'}")
            except OSError as exc:
                print(f"warning: could not write the figure and history to {target}: {exc}", file=sys.stderr)
        print()
    if not reported:
        print(f"gradwatch report: no gradwatch events under {logdir}.", file=sys.stderr)
        if not runs:
            print("  No TensorBoard event files (events.out.tfevents.*) were found there.", file=sys.stderr)
        for line in skipped:
            print(f"  {line}", file=sys.stderr)
        print("  Write them with gradwatch.watch(model, log_dir=...) (or the Lightning GradWatchCallback), "
              "then point this command at that directory.", file=sys.stderr)
        return EXIT_NO_DATA
    if skipped:
        print(f"{len(skipped)} other run(s) without gradwatch data: " + "; ".join(skipped))
    return EXIT_OK


def demo(argv: Sequence[str]) -> int:
    """Run ``gradwatch.demo.main(argv)`` (written separately); say so cleanly if it is not there."""
    import importlib

    try:
        demo_module = importlib.import_module("gradwatch.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "gradwatch.demo":
            raise
        print("gradwatch demo: the demo is not part of this installation (gradwatch/demo.py is missing). "
              "Try `python examples/quickstart.py`, or update gradwatch.", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = demo_module.main(list(argv))
    except SystemExit as exc:  # the demo's own argparse (--help, usage errors)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradwatch`` console script and ``python -m gradwatch``."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args_list and args_list[0] == "demo":
        return demo(args_list[1:])
    parser = _parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse exits on --help/--version (0) and on usage errors (2)
        return int(exc.code or 0)
    if args.command == "report":
        return report(args.logdir, out=None if args.no_files else args.out, window=args.window)
    parser.print_help()
    return EXIT_USAGE


__all__ = ["main", "report", "demo"]
