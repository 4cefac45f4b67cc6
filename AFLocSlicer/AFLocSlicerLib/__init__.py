"""AFLocSlicer's library: logic, background engine runner, scene results, installer, widget helpers.

Nothing here imports the AFLoc engine (or torch) at import time: the engine runs in a child process,
and the few engine helpers used in this process are imported inside the functions that need them.
"""
