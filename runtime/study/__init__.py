"""Measuring tidal on this machine: `tidal profile` (profile.py) and the pieces it is built from: measurement
primitives shared with bench/ (runs.py), the profile.json schema (schema.py, profile.schema.json) and its
figures (figures.py). Needs the `study` extra (matplotlib, tqdm, jsonschema)."""
