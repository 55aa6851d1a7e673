"""gradwatch's own TensorBoard dashboard: the "gradwatch" tab (a TensorBoard plugin).

TensorBoard finds it through the ``tensorboard_plugins`` entry point, so it is active as soon as
gradwatch is installed. Nothing here is imported by ``import gradwatch``: the plugin is loaded by
TensorBoard only, and it reads the runs through TensorBoard's data provider (the same data the
SCALARS tab shows), never from the training process.

- :mod:`gradwatch.dashboard.data`: pure numpy: tags to a layers x steps matrix, downsampling to a
  pixel grid, findings parsed from the diagnosis texts (testable without a server).
- :mod:`gradwatch.dashboard.plugin`: the ``TBPlugin``: routes, caching, request validation.
- ``static/``: the frontend (plain ES module + CSS, no build step, no CDN).
"""
