"""Runs pdserve from /tmp/before instead of the editable install (before/after benchmark)."""

import sys

sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
sys.path.insert(0, "/tmp/before")
