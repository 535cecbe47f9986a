"""OBS Studio: a native filter plugin (C, libobs, in this folder) and its Python helpers.

- ``build``: builds the plugin with CMake and installs it into OBS's per-user plugin folder
  (``livediffusion obs install``).
- ``websocket``: obs-websocket set-up through obsws-python (``livediffusion obs setup``,
  ``prompt``, ``status``): add the filter to a source, or the plugin-free Media Source path.
"""
