"""``gradwatch demo``: every reference problem diagnosed, fixed by gradwatch, and retrained.

For each problem case of :mod:`gradwatch.models` (or the ones named with ``--model``):

1. **before** — build the case from its seed and train it for ``case.default_steps`` steps,
   watched by :func:`gradwatch.watch` (TensorBoard logs under ``<logdir>/<case>/before``);
   diagnose the last window;
2. **fix** — build the case again from the same seed (the same initial weights and data) and
   apply the diagnosis' recommended fixes with :func:`gradwatch.apply_fixes` (the policy there
   picks the first applicable fix of each finding); nothing is hand-picked;
3. **after** — train the fixed model for the same number of steps on the same batches, watched
   again (``<logdir>/<case>/after``), and diagnose it;
4. print a before/after table: smoothed final loss, first-layer/last-layer gradient-norm ratio,
   what gradwatch reported, the fixes applied, and the time taken.

A case *behaves* when the diagnosis finds exactly the case's problem (no other finding kind), at
least one fix is applied, and the fixed model reaches at most half the unfixed model's final loss
in the same number of steps. Healthy controls and fixed twins (``--model resnet_bn``) behave when
nothing is found. The exit status is 0 when every case behaves, 1 when one does not (the message
says which check failed and the numbers), 2 on usage errors.

``--quick`` runs the cases that train in a few seconds (the MLPs; CI uses it); the default runs
every problem case. Progress is drawn with ``rich`` when it is installed, else ``tqdm``, else
plain lines.

The pieces: :mod:`gradwatch.demo_cases` runs and judges a case (:func:`run_case`,
:func:`train_watched`, :func:`check`; also what ``examples/reproduce_table.py`` uses to generate the
README gallery), :mod:`gradwatch.demo_console` shows it, and this module is the command. The
public names of both are importable from here.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence

import torch

from gradwatch import models
from gradwatch.demo_cases import (
    CASE_ORDER,
    LOSS_WINDOW,
    CaseResult,
    ProgressFn,
    RunResult,
    check,
    describe,
    first_last_ratio,
    format_loss,
    format_ratio,
    problem_cases,
    run_case,
    train_watched,
)
from gradwatch.demo_console import DemoConsole, plain_table, print_case, table_rows

EXIT_OK, EXIT_MISBEHAVED, EXIT_USAGE = 0, 1, 2

#: Default TensorBoard root of the demo (one run per case and phase below it).
DEFAULT_LOGDIR = os.path.join("runs", "gradwatch-demo")

#: ``--quick``: the cases that train in a few seconds on one core (the MLPs).
QUICK_CASES: tuple[str, ...] = (
    "sigmoid_mlp", "tanh_tiny_init", "overscaled_relu_mlp", "dead_relu_mlp", "saturated_sigmoid",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch demo",
        description="Train each reference problem model watched by gradwatch, show the diagnosis, apply the "
                    "recommended fixes, retrain from the same starting state and compare.",
    )
    parser.add_argument("--model", metavar="NAME", action="append", default=None,
                        help="run only this case (repeatable); one of: " + ", ".join(models.list_models()))
    parser.add_argument("--quick", action="store_true",
                        help=f"only the cases that train in seconds ({', '.join(QUICK_CASES)}); for CI")
    parser.add_argument("--logdir", default=DEFAULT_LOGDIR,
                        help=f"TensorBoard root; runs go to <logdir>/<case>/{{before,after}} (default: {DEFAULT_LOGDIR})")
    parser.add_argument("--no-logs", action="store_true", help="write no TensorBoard logs")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: each case's own)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every model and data set (default: 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: 1; the models are tiny, one thread is fastest)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status (0: every case behaved, 1: one did not, 2: usage error)."""
    parser = _parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    available = models.list_models()
    if args.model:
        unknown = [n for n in args.model if n not in available]
        if unknown:
            print(f"gradwatch demo: unknown model(s) {unknown}; available: {', '.join(available)}", file=sys.stderr)
            return EXIT_USAGE
        names = list(dict.fromkeys(args.model))
    elif args.quick:
        names = [n for n in QUICK_CASES if n in available]
    else:
        names = problem_cases()
    if args.steps is not None and args.steps < 1:
        print(f"gradwatch demo: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return EXIT_USAGE
    if args.threads < 1:
        print(f"gradwatch demo: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return EXIT_USAGE
    logdir = None if args.no_logs else args.logdir

    console = DemoConsole(progress=not args.no_progress)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results: list[CaseResult] = []
    try:
        for i, name in enumerate(names, 1):
            case = models.create(name, seed=args.seed)
            console.rule(f"[{i}/{len(names)}] {name}: {case.problem or 'healthy (control)'}")
            console.print(case.description)
            result = run_case(name, seed=args.seed, steps=args.steps, logdir=logdir, progress=console.progress)
            print_case(console, result)
            results.append(result)
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - start

    steps_note = f"{args.steps} steps each" if args.steps else "each case's default steps"
    console.table(table_rows(results), title=f"gradwatch demo: before / after the recommended fixes ({steps_note}, seed {args.seed})")
    console.print("loss = mean of the last 10 training losses; grad ratio = first layer's gradient norm / last layer's "
                  "(medians over the diagnosis window); time = both runs, training and watching.")
    console.print(f"total time {elapsed:.1f}s")
    if logdir is not None:
        console.print("TensorBoard logs: see the gradient flow before and after with")
        console.print(f"  tensorboard --logdir {shlex.quote(str(logdir))}", style="bold")
    bad = [r for r in results if not r.ok]
    if bad:
        console.print(f"{len(bad)} of {len(results)} case(s) did not behave:", style="bold red")
        for r in bad:
            for failure in r.failures:
                console.print(f"  {r.name}: {failure}", style="red")
        return EXIT_MISBEHAVED
    said = []
    if any(r.problem is not None for r in results):
        said.append("gradwatch found each problem and its recommended fixes at least halved the loss")
    if any(r.problem is None for r in results):
        said.append("the healthy model(s) were reported healthy")
    console.print(f"all {len(results)} case(s) behaved: {'; '.join(said)}.", style="bold green")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = [
    "CASE_ORDER", "DEFAULT_LOGDIR", "EXIT_MISBEHAVED", "EXIT_OK", "EXIT_USAGE", "LOSS_WINDOW", "QUICK_CASES",
    "CaseResult", "ProgressFn", "RunResult", "check", "describe", "first_last_ratio", "format_loss", "format_ratio",
    "main", "plain_table", "problem_cases", "run_case", "table_rows", "train_watched",
]
