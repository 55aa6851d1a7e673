"""The "gradwatch" TensorBoard tab: a depth x time heatmap of gradient flow, with drill-downs.

TensorBoard loads :class:`GradWatchLoader` through the ``tensorboard_plugins`` entry point. The
plugin reads gradwatch's per-layer scalars through TensorBoard's data provider (so it works with
``--load_fast`` true or false, and for plain, Lightning and ``gradwatch demo`` runs) and serves:

==================  =========================================================================
``/index.js``       the frontend (an ES module TensorBoard loads in an iframe), ``/style.css``
``/runs``           gradwatch runs, their per-layer metrics and layer counts
``/heatmap``        ``run, metric, width, height, agg``: layers (input first) x steps, reduced on
                    the server to at most ``height x width`` cells (min/median/max per cell)
``/layer``          ``run, layer``: every metric of one layer over time
``/profile``        ``run, metric, step``: the depth profile at the collected step nearest ``step``
``/findings``       ``run``: the diagnosis changes gradwatch logged, and the layers they name
==================  =========================================================================

Bad requests answer 4xx with ``{"error": "..."}``. The dense matrix of a (run, metric) is read
once and cached until the run's scalars change (TensorBoard reports each tag's last step), so
redrawing, zooming into another aggregate or another pixel grid costs only the reduction.

TensorBoard keeps at most ``--samples_per_plugin scalars=N`` points per tag (default 1000, a
reservoir sample of the steps); start it with ``--samples_per_plugin scalars=1000000`` (above the
step count) to see every collected step of long runs.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections import OrderedDict
from importlib import resources
from typing import Any

import numpy as np
from tensorboard import context as tb_context
from tensorboard import errors as tb_errors
from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from gradwatch import tags as T
from gradwatch.dashboard import data as D

log = logging.getLogger("gradwatch")

PLUGIN_NAME = T.META_PLUGIN
#: Upper bound of points asked from the data provider per tag: "everything it kept".
_READ_ALL = 1 << 30
#: Largest pixel grid a request may ask for (a 4K screen is 3840 wide).
MAX_CELLS_PER_SIDE = 8192
_MATRIX_CACHE_SIZE = 16
_STATIC = {"index.js": "text/javascript", "style.css": "text/css"}


class BadRequest(Exception):
    """A request the plugin cannot answer: ``code`` and a message naming the bad value."""

    def __init__(self, message: str, code: int = 400):
        super().__init__(message)
        self.code = code


def _json(request: Any, payload: Any, code: int = 200) -> Any:
    return http_util.Respond(request, payload, "application/json", code=code)


def _route(handler: Any) -> Any:
    """Turn :class:`BadRequest` (and TensorBoard's public errors) into a 4xx JSON answer."""

    @wrappers.Request.application
    def wrapped(self: GradWatchPlugin, request: Any) -> Any:
        try:
            return handler(self, request)
        except BadRequest as exc:
            return _json(request, {"error": str(exc)}, exc.code)
        except tb_errors.PublicError as exc:
            return _json(request, {"error": str(exc)}, getattr(exc, "http_code", 400))

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


def _int_arg(request: Any, name: str, default: int | None, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        if default is None:
            raise BadRequest(f"missing query parameter {name!r} (an integer in [{lo}, {hi}])")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer in [{lo}, {hi}], got {raw!r}") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _str_arg(request: Any, name: str) -> str:
    value = request.args.get(name)
    if not value:
        raise BadRequest(f"missing query parameter {name!r}")
    return value


def _b64(values: np.ndarray) -> str:
    """Little-endian float32, row-major, base64: 20x smaller and faster than a JSON list of numbers
    (NaN, inf survive; TensorBoard stores scalars as float32, so nothing is lost)."""
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii")


class GradWatchPlugin(base_plugin.TBPlugin):
    """Serves the gradwatch tab (see the module docstring for the routes)."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext):
        self._provider: provider.DataProvider | None = context.data_provider
        self._lock = threading.Lock()
        self._matrices: OrderedDict[tuple[str, str, str], tuple[Any, np.ndarray, np.ndarray, list[D.Series]]] = OrderedDict()
        self._active = False

    # -- TensorBoard's plugin protocol --------------------------------------------------------------
    def get_plugin_apps(self) -> dict[str, Any]:
        return {
            "/index.js": self._serve_static,
            "/style.css": self._serve_static,
            "/runs": self._serve_runs,
            "/heatmap": self._serve_heatmap,
            "/layer": self._serve_layer,
            "/profile": self._serve_profile,
            "/findings": self._serve_findings,
        }

    def is_active(self) -> bool:
        """Active once any run holds gradwatch scalars (remembered: runs do not disappear often)."""
        if not self._active and self._provider is not None:
            try:
                self._active = bool(self._runs(tb_context.RequestContext(), ""))
            except Exception as exc:  # the listing must not fail because of one plugin
                log.debug("gradwatch plugin: is_active failed: %s", exc)
        return self._active

    def data_plugin_names(self) -> tuple[str, ...]:
        return (PLUGIN_NAME,)

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="gradwatch", disable_reload=False)

    # -- reading ------------------------------------------------------------------------------------
    def _runs(self, ctx: Any, eid: str) -> dict[str, tuple[D.RunTags, int]]:
        """Gradwatch runs: their series and their last step (the frontend redraws when it moves)."""
        if self._provider is None:
            return {}
        listing = self._provider.list_scalars(ctx, experiment_id=eid, plugin_name="scalars")
        runs = {}
        for run, tags in listing.items():
            grouped = D.run_tags(tags)
            if grouped is not None and grouped.series:
                runs[run] = (grouped, max(int(meta.max_step) for meta in tags.values()))
        return runs

    def _run(self, ctx: Any, eid: str, run: str) -> tuple[D.RunTags, dict[str, Any]]:
        listing = self._provider.list_scalars(
            ctx, experiment_id=eid, plugin_name="scalars", run_tag_filter=provider.RunTagFilter(runs=[run])
        ) if self._provider is not None else {}
        tags = listing.get(run)
        grouped = D.run_tags(tags or {})
        if grouped is None or not grouped.series:
            raise BadRequest(f"no gradwatch run named {run!r}; GET runs lists them", 404)
        return grouped, tags

    def _metric(self, grouped: D.RunTags, request: Any) -> str:
        metric = request.args.get("metric") or D.DEFAULT_METRIC
        if metric not in grouped.series:
            raise BadRequest(f"unknown metric {metric!r}; this run has: {', '.join(grouped.metrics)}", 404)
        return metric

    def _read(self, ctx: Any, eid: str, run: str, tags: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        result = self._provider.read_scalars(
            ctx, experiment_id=eid, plugin_name="scalars", downsample=_READ_ALL,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=tags),
        ).get(run, {})
        out = {}
        for tag in tags:
            points = result.get(tag, [])
            out[tag] = (np.fromiter((p.step for p in points), dtype=np.int64, count=len(points)),
                        np.fromiter((p.value for p in points), dtype=np.float64, count=len(points)))
        return out

    def _matrix(self, ctx: Any, eid: str, run: str, metric: str, grouped: D.RunTags,
                listing: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, list[D.Series]]:
        """``(steps, layers x steps matrix, rows)``, cached until a tag of the metric gets new steps."""
        rows = grouped.series[metric]
        signature = tuple((s.tag, listing[s.tag].max_step, listing[s.tag].max_wall_time) for s in rows)
        key = (eid, run, metric)
        with self._lock:
            hit = self._matrices.get(key)
            if hit is not None and hit[0] == signature:
                self._matrices.move_to_end(key)
                return hit[1], hit[2], hit[3]
        series = self._read(ctx, eid, run, [s.tag for s in rows])
        steps, matrix = D.dense([series[s.tag] for s in rows])
        with self._lock:
            self._matrices[key] = (signature, steps, matrix, rows)
            while len(self._matrices) > _MATRIX_CACHE_SIZE:
                self._matrices.popitem(last=False)
        return steps, matrix, rows

    def _texts(self, ctx: Any, eid: str, run: str, grouped: D.RunTags) -> list[tuple[int, str]]:
        tag = grouped.prefix + T.DIAGNOSIS_TAG + "/text_summary"
        found = self._provider.read_tensors(
            ctx, experiment_id=eid, plugin_name="text", downsample=_READ_ALL,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=[tag]),
        ).get(run, {}).get(tag, [])
        texts = []
        for datum in found:
            array = np.asarray(datum.numpy).reshape(-1)
            if array.size:
                raw = array[0]
                texts.append((int(datum.step), raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)))
        return texts

    # -- routes -------------------------------------------------------------------------------------
    @wrappers.Request.application
    def _serve_static(self, request: Any) -> Any:
        name = request.path.rsplit("/", 1)[-1]
        body = resources.files("gradwatch.dashboard").joinpath("static", name).read_bytes()
        return http_util.Respond(request, body, _STATIC[name])

    @_route
    def _serve_runs(self, request: Any) -> Any:
        """Every gradwatch run: its metrics (default first) and layer counts, for the run pickers."""
        ctx, eid = _ctx(request)
        runs = self._runs(ctx, eid)
        return _json(request, {
            "runs": [{"run": run, "metrics": g.metrics, "layers": {m: len(s) for m, s in g.series.items()},
                      "totals": sorted(g.totals), "last_step": last}
                     for run, (g, last) in sorted(runs.items(), key=lambda item: D.run_order(item[0]))],
            "aggregates": list(D.AGGREGATES), "default_metric": D.DEFAULT_METRIC,
        })

    @_route
    def _serve_heatmap(self, request: Any) -> Any:
        """Layers (input first) x steps of one metric, reduced to the caller's pixel grid."""
        ctx, eid = _ctx(request)
        run = _str_arg(request, "run")
        grouped, listing = self._run(ctx, eid, run)
        metric = self._metric(grouped, request)
        width = _int_arg(request, "width", 1000, 1, MAX_CELLS_PER_SIDE)
        height = _int_arg(request, "height", 1000, 1, MAX_CELLS_PER_SIDE)
        agg = request.args.get("agg") or "median"
        if agg not in D.AGGREGATES:
            raise BadRequest(f"agg must be one of {', '.join(D.AGGREGATES)}, got {agg!r}")
        steps, matrix, rows = self._matrix(ctx, eid, run, metric, grouped, listing)
        cells, r, k = D.downsample(matrix, height, width, agg)
        first, last = D.step_bins(steps, k)
        return _json(request, {
            "run": run, "metric": metric, "agg": agg, "layers_per_row": r, "steps_per_column": k,
            "n_layers": len(rows), "n_steps": len(steps), "shape": list(cells.shape),
            "rows": [{"layer": rows[i].layer, "depth": rows[i].depth, "last_layer": rows[min(i + r, len(rows)) - 1].layer}
                     for i in range(0, len(rows), r)],
            "step_first": first, "step_last": last, "decades": D.decades(cells), "values": _b64(cells),
        })

    @_route
    def _serve_layer(self, request: Any) -> Any:
        """Every per-layer metric of one layer over time (the row drill-down)."""
        ctx, eid = _ctx(request)
        run, layer = _str_arg(request, "run"), _str_arg(request, "layer")
        grouped, _ = self._run(ctx, eid, run)
        tags = {s.metric: s.tag for rows in grouped.series.values() for s in rows if s.layer == layer}
        if not tags:
            raise BadRequest(f"run {run!r} has no layer {layer!r}", 404)
        series = self._read(ctx, eid, run, list(tags.values()))
        return _json(request, {"run": run, "layer": layer,
                               "series": D.total_series({m: series[t] for m, t in sorted(tags.items())})})

    @_route
    def _serve_profile(self, request: Any) -> Any:
        """One metric of every layer at the collected step nearest ``step`` (the column drill-down)."""
        ctx, eid = _ctx(request)
        run = _str_arg(request, "run")
        grouped, listing = self._run(ctx, eid, run)
        metric = self._metric(grouped, request)
        wanted = _int_arg(request, "step", None, 0, 2**63 - 1)
        steps, matrix, rows = self._matrix(ctx, eid, run, metric, grouped, listing)
        if not len(steps):
            raise BadRequest(f"run {run!r} has no steps of {metric!r}", 404)
        i = int(np.argmin(np.abs(steps - wanted)))
        return _json(request, {"run": run, "metric": metric, "step": int(steps[i]),
                               "layers": [s.layer for s in rows], "values": D.finite_list(matrix[:, i])})

    @_route
    def _serve_findings(self, request: Any) -> Any:
        """The diagnosis changes of a run: step, headline, full text, kinds, layers named."""
        ctx, eid = _ctx(request)
        run = _str_arg(request, "run")
        grouped, _ = self._run(ctx, eid, run)
        names = {s.layer for rows in grouped.series.values() for s in rows}
        findings = D.parse_findings(self._texts(ctx, eid, run, grouped), names)
        return _json(request, {"run": run, "findings": [f.__dict__ for f in findings]})


def _ctx(request: Any) -> tuple[Any, str]:
    return plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)


class GradWatchLoader(base_plugin.TBLoader):
    """The ``tensorboard_plugins`` entry point: builds :class:`GradWatchPlugin`."""

    def load(self, context: base_plugin.TBContext) -> GradWatchPlugin:
        return GradWatchPlugin(context)
