"""Measuring tidal on this machine: `tidal profile` (profile.py), `tidal compare` (compare.py) and `tidal
study` (report.py), with their command line in commands.py. Needs the `study` extra (matplotlib, tqdm,
jsonschema).

Imports run one way (tests/test_imports.py checks it): the shared pieces first (common, progress, settings,
args, schema, runs, rows), then what builds a profile (document, emulation, costfit, figures), profile, the
baselines (hf, baseline_decode, protocol, notes), summary, compare, report, and commands last."""
