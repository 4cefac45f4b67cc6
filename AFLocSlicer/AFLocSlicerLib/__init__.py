"""AFLocSlicer's library, one idea per file.

- ``Logic``: :class:`AFLocLogic`, what the module does (the list of its steps), no GUI;
- ``Tasks``: background jobs and what happens when they end; ``Process`` (one-shot engine runs)
  and ``Server`` (the warm engine of the session, ``afloc serve``);
- ``SceneResults``: engine results in the scene (import, runs, re-threshold, remove);
  ``Display``: how they are shown; ``Terminology``: colours and codes; ``Scene``: MRML helpers;
- ``Parameters``: the settings and their parameter node; ``Widget``: the panel's controller;
  ``InstallLogic``: the Python packages the engine needs; ``Errors``: what the user is shown.

Nothing here imports the AFLoc engine (or torch) at import time: the engine runs in a child process,
and the torch-free ``afloc_engine.protocol`` is imported inside the functions that need it.
"""
