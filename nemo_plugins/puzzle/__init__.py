"""Puzzle NAS: per-layer child blocks initialized from the parent, scored and assembled."""
