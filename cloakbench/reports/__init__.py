"""Reports: pure functions over stored results (re-plotting or re-tabulating never recomputes)."""
