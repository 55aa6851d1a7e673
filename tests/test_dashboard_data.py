"""gradwatch.dashboard.data without a server: tag grouping, downsampling edge cases, findings parsing;
and the import costs TensorBoard pays at start-up."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from gradwatch import tags as T
from gradwatch.dashboard import data as D
from gradwatch.tensorboard import diagnosis_markdown


def test_run_tags_groups_by_metric_in_depth_order_and_strips_the_prefix() -> None:
    tags = ["gw/grad_norm/total", "gw/loss/total", "gw/grad_norm/10.head", "gw/grad_norm/02.body.0", "gw/dead_frac/00.act",
            "train_loss", "epoch", "gw/grad_to_weight/02.body.0"]
    grouped = D.run_tags(tags)
    assert grouped is not None and grouped.prefix == "gw/"
    assert [s.layer for s in grouped.series["grad_norm"]] == ["body.0", "head"]
    assert grouped.metrics == ["grad_to_weight", "dead_frac", "grad_norm"]
    assert grouped.totals == {"grad_norm": "gw/grad_norm/total", "loss": "gw/loss/total"}
    assert D.run_tags(["train_loss", "val/acc", "loss/total"]) is None  # not a gradwatch run


def test_downsample_ignores_missing_values_and_keeps_all_missing_cells_missing() -> None:
    m = np.array([[1, np.nan, 3, np.nan], [np.nan, np.nan, 5, 7]], dtype=np.float32)
    cells, r, k = D.downsample(m, rows=1, cols=2, agg="max")
    assert (r, k) == (2, 2)
    np.testing.assert_array_equal(cells, [[1, 7]])
    cells, _, _ = D.downsample(m, rows=2, cols=2, agg="median")
    np.testing.assert_array_equal(cells, [[1, 3], [np.nan, 6]])
    cells, r, k = D.downsample(np.zeros((0, 0), dtype=np.float32), 10, 10, "min")
    assert cells.shape == (0, 0)
    with pytest.raises(ValueError, match="agg must be one of median, min, max, got 'mean'"):
        D.downsample(m, 1, 1, "mean")


def test_decades_cover_the_positive_values_in_whole_decades() -> None:
    assert D.decades(np.array([0.0, 3e-7, 2.0, np.inf, np.nan])) == (-7.0, 1.0)
    assert D.decades(np.array([0.0, -1.0])) is None
    assert D.decades(np.array([1.0])) == (0.0, 1.0)


def test_findings_are_parsed_from_the_text_gradwatch_writes() -> None:
    from gradwatch.findings import Diagnosis, Finding

    names = [f"blocks.{i}.fc" for i in range(12)]
    diagnosis = Diagnosis(findings=(Finding(kind="vanishing", layers=tuple(names[:10]), severity="critical",
                                            message="Gradients vanish", evidence={}, fixes=()),))
    healthy = Diagnosis(findings=())
    parsed = D.parse_findings([(40, diagnosis_markdown(healthy, 40)), (20, diagnosis_markdown(diagnosis, 20))], names)
    assert [f.step for f in parsed] == [20, 40]
    assert parsed[0].kinds == ["vanishing"] and parsed[0].layers == names[:8] and parsed[0].more == 2
    assert parsed[1].kinds == [] and parsed[1].layers == [] and "healthy" in parsed[1].headline


def test_tensorboard_start_up_does_not_import_torch_and_gradwatch_does_not_import_the_plugin() -> None:
    code = ("import sys\n"
            "import gradwatch.dashboard.plugin\n"
            "print('torch' in sys.modules)\n"
            "del sys.modules['gradwatch.dashboard.plugin'], sys.modules['gradwatch.dashboard']\n"
            "import gradwatch\n"
            "gradwatch.watch\n"
            "print('gradwatch.dashboard' in sys.modules, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.split() == ["False", "False", "True"]


def test_layer_tags_written_by_gradwatch_parse_back() -> None:
    tag = T.layer_tag("grad_norm", 3, "net.4", T.depth_width(12))
    grouped = D.run_tags([tag, T.total_tag("grad_norm")])
    assert grouped is not None and grouped.series["grad_norm"] == [D.Series(tag, "grad_norm", "net.4", 3)]


@pytest.mark.parametrize("agg", ["min", "median", "max"])
@pytest.mark.parametrize(("rows", "cols"), [(3, 7), (64, 9), (1, 1), (100, 100)])
def test_downsample_equals_numpy_nan_reductions_per_block(agg: str, rows: int, cols: int) -> None:
    """Random values with missing ones (sampled activation steps), blocks of unequal size at the edges."""
    import math
    import warnings

    rng = np.random.default_rng(rows * cols)
    m = rng.lognormal(0, 3, size=(37, 251)).astype(np.float32)
    m[rng.random(m.shape) < 0.3] = np.nan
    m[:5, :40] = np.nan  # whole cells missing
    cells, r, k = D.downsample(m, rows, cols, agg)
    assert (r, k) == (math.ceil(37 / rows), math.ceil(251 / cols))
    reduce = {"min": np.nanmin, "max": np.nanmax, "median": np.nanmedian}[agg]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.array([[reduce(m[i:i + r, j:j + k].astype(np.float64)) for j in range(0, 251, k)] for i in range(0, 37, r)])
    np.testing.assert_allclose(cells, want, rtol=1e-6)


def test_every_static_asset_is_declared_as_package_data() -> None:
    """The wheel carries the frontend (TensorBoard's CSP blocks CDNs; users run no build step)."""
    import fnmatch
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["gradwatch.dashboard"]
    static = root / "gradwatch" / "dashboard" / "static"
    files = [p.relative_to(static.parent).as_posix() for p in static.iterdir() if p.is_file()]
    assert {"static/index.js", "static/style.css"} <= set(files)
    for f in files:
        assert any(fnmatch.fnmatch(f, g) for g in globs), f"{f} is not in [tool.setuptools.package-data] 'gradwatch.dashboard'"
    tb_entry = tomllib.loads((root / "pyproject.toml").read_text())["project"]["entry-points"]["tensorboard_plugins"]
    assert tb_entry == {"gradwatch": "gradwatch.dashboard.plugin:GradWatchLoader"}


def test_bare_import_still_reaches_submodules_and_public_names() -> None:
    code = ("import gradwatch.preflight, gradwatch.diagnose\n"  # submodules named like the functions they export
            "import gradwatch\n"
            "print(gradwatch.models.create.__name__, gradwatch.watch.__name__, hasattr(gradwatch, 'nope'),\n"
            "      callable(gradwatch.preflight), callable(gradwatch.diagnose))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.split() == ["create", "watch", "False", "True", "True"]
