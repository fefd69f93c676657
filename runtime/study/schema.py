"""The profile.json document: its JSON Schema (profile.schema.json, next to this file), validation, and
reading and writing it. A document is written atomically (a temporary file renamed over the old one), so an
interrupted or killed run leaves either the previous valid document or the new one, never half of one.

Version 2 added the emulated link (`link`) and the spread of decode cells (min and max beside the median).
Version 3 renamed the KV mode "drop" to "recompute" (tidal.modes). Older documents are read upgraded
(`upgrade`): what they did not record is null, and "drop" reads "recompute"."""
from __future__ import annotations

import copy
import functools
import json
import math
import os
import tempfile
from pathlib import Path

from ..errors import ConfigError

SCHEMA_NAME = "tidal.profile"
VERSION = 3
SCHEMA_FILE = Path(__file__).with_name("profile.schema.json")


@functools.cache
def schema() -> dict:
    """The JSON Schema (draft 2020-12) of a profile document."""
    return json.loads(SCHEMA_FILE.read_text())


@functools.cache
def _validator():
    import jsonschema

    cls = jsonschema.Draft202012Validator
    cls.check_schema(schema())
    return cls(schema())


def validate(doc) -> None:
    """Raise ConfigError naming the path of the first schema violation in `doc` (and what is wrong there)."""
    from jsonschema.exceptions import best_match

    e = best_match(_validator().iter_errors(doc))  # descends into oneOf, to the alternative that came closest
    if e is not None:
        where = "/".join(str(p) for p in e.absolute_path) or "(document)"
        raise ConfigError(f"profile document invalid at {where}: {e.message}")
    for where, value in _numbers(doc, ""):
        if not math.isfinite(value):  # JSON has no NaN or infinity; the schema's bounds do not catch them
            raise ConfigError(f"profile document invalid at {where or '(document)'}: {value} is not finite")


def _numbers(value, where: str):
    if isinstance(value, float):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{where}/{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{where}/{i}" if where else str(i))


def load(path) -> dict:
    """Read and validate a profile document; ConfigError naming the file for a missing, unreadable or invalid
    one."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    version = doc.get("version") if isinstance(doc, dict) else None
    if version in (1, 2):
        doc = upgrade(doc)
    elif version not in (None, VERSION):  # a newer writer's document: say so rather than list schema errors
        raise ConfigError(f"{path}: profile version {version!r}; this tidal reads versions 1 to {VERSION}")
    try:
        validate(doc)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return doc


def upgrade(doc: dict) -> dict:
    """A version 1 or 2 document as the current version (a new dict). From version 1: no emulated link; each
    decode cell's repeats were exactly `settings.repeats` (version 1 repeated no cell further), and their min
    and max were not recorded (null). From versions 1 and 2: a preemption row's kv "drop" is "recompute".
    Anything else is left for `validate` to judge."""
    doc = copy.deepcopy(doc)
    version = doc.get("version")
    doc["version"] = VERSION
    for row in doc.get("preemption") or ():
        if isinstance(row, dict) and row.get("kv") == "drop":
            row["kv"] = "recompute"
    if version != 1:
        return doc
    doc.setdefault("link", None)
    settings = doc.get("settings")
    repeats = settings.get("repeats") if isinstance(settings, dict) else None
    if isinstance(settings, dict):
        settings.setdefault("max_repeats", repeats)
        settings.setdefault("max_spread", 0.0)
        settings.setdefault("extra_seconds", 0.0)
    for row in doc.get("decode") or ():
        if isinstance(row, dict):
            row.setdefault("repeats", repeats)
            for key in ("decode_seconds_min", "decode_seconds_max", "tokens_per_second_min",
                        "tokens_per_second_max"):
                row.setdefault(key, None)
    return doc


def save(doc: dict, path) -> Path:
    """Validate `doc` and write it to `path` atomically (temporary file in the same directory, then a rename).
    ConfigError when the document is invalid or the directory is not writable."""
    validate(doc)
    path = Path(path)
    text = json.dumps(doc, indent=1, allow_nan=False) + "\n"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ConfigError(f"{path.parent}: cannot write there ({exc.strerror or exc})") from None
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make the profile unreadable to others
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ConfigError(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise
    return path
