"""Synthesizer checkpoints shipped inside the package, and the checks that keep a checkpoint on its own model.

A shipped checkpoint is a folder ``pskernels/checkpoints/<name>/`` (:data:`CHECKPOINT_ROOT`, one per entry of
:data:`SHIPPED`) written by :func:`export_checkpoint` from a ``pskernels train --out`` folder::

    checkpoint.json     {"format": 1, "base_model": <model_fingerprint>, "train_config": {...}, **extra}
    mapper/             mapper_config.json + mapper.safetensors   (CacheMapper.save_pretrained)
    adapter/            adapter_config.json + adapter_model.safetensors   (PEFT LoRA)

:func:`load_checkpoint` reads such a folder (or a ``pskernels train --out`` folder) onto a model after checking
that it was trained for that model: ``base_model`` against :func:`model_fingerprint` (a checkpoint.json folder),
the mapper's layers, heads and head dim (:func:`check_mapper`, every folder). ``pskernels eval`` and
``pskernels demo`` use :func:`shipped_checkpoint` when no checkpoint is named (``--untrained``: none).

:data:`DEFAULT_SUITE` is the workflow suite shipped with the package (``pskernels eval --suite``), :data:`LONG_SUITE`
one of long worker outputs (``pskernels eval --suite long``), :data:`HELD_OUT_SUITE` 12 workflows of each held-out
family (``pskernels eval --suite held-out``); :data:`NAMED_SUITES` maps those names to them.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .adapter import is_peft_model, unwrap
from .mapper import CONFIG_NAME as MAPPER_CONFIG_NAME
from .mapper import CacheMapperConfig
from .train import ADAPTER_DIR, MAPPER_DIR, load_trained
from .train import CONFIG_NAME as TRAIN_CONFIG_NAME

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CHECKPOINT_ROOT = PACKAGE_DIR / "checkpoints"
"""Where the shipped checkpoints live: ``pskernels/checkpoints/<folder>/``."""
SHIPPED = {"smollm2": "smollm2-135m-instruct"}
"""Model name (as :func:`pskernels.synthesis.models.load_model` takes it) -> folder under :data:`CHECKPOINT_ROOT`."""
SHIPPED_RECOMPUTE = {"smollm2": "smollm2-135m-instruct-recompute"}
"""The same for the synthesizer trained on branches with their first tokens recomputed (run H48: ``train --recompute
48 --recompute-together``; :func:`trained_recompute` reads the setting): more faithful, and it pays that
recomputation at synthesis time (docs/FIDELITY.md)."""
DEFAULT_SUITE = Path(__file__).resolve().parent / "suites" / "workflows-smollm2.jsonl"
"""The packaged workflow suite (``pskernels eval --suite`` without a file)."""
LONG_SUITE = DEFAULT_SUITE.with_name("workflows-long-smollm2.jsonl")
"""The packaged suite of long worker outputs, 192 generated tokens per worker (``pskernels eval --suite long``)."""
HELD_OUT_SUITE = DEFAULT_SUITE.with_name("workflows-held-out-smollm2.jsonl")
"""The packaged suite of the held-out families alone, 12 workflows each (``pskernels eval --suite held-out``): built
after every shipped synthesizer, chosen on nothing (docs/FIDELITY-LOG.md, "A larger held-out sample")."""
NAMED_SUITES = {"long": LONG_SUITE, "held-out": HELD_OUT_SUITE}
"""``pskernels eval --suite NAME`` -> a packaged suite (a file of that name in the working directory wins)."""
MANIFEST_NAME = "checkpoint.json"
FORMAT = 1
FINGERPRINT_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "vocab_size", "rope_theta")
MAPPER_FIELDS = ("num_layers", "num_kv_heads", "num_heads", "head_dim")
_RESERVED = ("format", "base_model", "train_config")


def _text_config(model):
    cfg = unwrap(model).config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def _plain(v):
    """A JSON value for a config entry (ints, floats, strings; tensors and numpy scalars as Python numbers)."""
    if hasattr(v, "item"):
        v = v.item()
    return v


def model_fingerprint(model) -> dict:
    """The identity of a base model, read from its (text) config.

    Parameters
    ----------
    model : transformers.PreTrainedModel or peft.PeftModel
        The base model (a PeftModel is unwrapped).

    Returns
    -------
    dict
        The entries of :data:`FINGERPRINT_FIELDS` the config has (``model_type``, ``num_hidden_layers``,
        ``hidden_size``, ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
        ``vocab_size``, ``rope_theta``), as JSON values. ``rope_theta`` is also read from ``rope_parameters``
        (where transformers 5 keeps it); ``head_dim`` defaults to ``hidden_size // num_attention_heads``.

    Examples
    --------
    >>> from pskernels.synthesis.models import tiny_llama
    >>> fp = model_fingerprint(tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, vocab=64))
    >>> fp["model_type"], fp["num_hidden_layers"], fp["hidden_size"], fp["head_dim"]
    ('llama', 2, 64, 16)
    """
    cfg = _text_config(model)
    out = {}
    for field in FINGERPRINT_FIELDS:
        v = getattr(cfg, field, None)
        if field == "rope_theta" and v is None:
            rp = getattr(cfg, "rope_parameters", None)
            v = rp.get("rope_theta") if isinstance(rp, dict) else None
        if field == "head_dim" and v is None and getattr(cfg, "num_attention_heads", None):
            v = cfg.hidden_size // cfg.num_attention_heads
        if v is not None:
            out[field] = _plain(v)
    return out


def fingerprint_mismatch(trained_for: dict, model_fp: dict) -> list[str]:
    """The fields of :data:`FINGERPRINT_FIELDS` present in both fingerprints whose values differ."""
    return [f for f in FINGERPRINT_FIELDS if f in trained_for and f in model_fp and trained_for[f] != model_fp[f]]


def check_mapper(model, config: CacheMapperConfig, label: str) -> None:
    """Raise ValueError unless a mapper of ``config`` fits ``model`` (layers, kv heads, heads, head dim).

    Parameters
    ----------
    model : transformers.PreTrainedModel or peft.PeftModel
        The base model.
    config : CacheMapperConfig
        The mapper's config (``mapper.config``).
    label : str
        What the error message names first (e.g. ``"--mapper PATH"``, ``"checkpoint PATH"``).
    """
    from .mapper import CacheMapper

    want = CacheMapper.for_model(unwrap(model)).config
    for field in MAPPER_FIELDS:
        if getattr(config, field) != getattr(want, field):
            raise ValueError(f"{label}: {field} = {getattr(config, field)}, but the model has {getattr(want, field)} "
                             "(a mapper trained for another model)")


def _read_json(path: Path, label: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{label}: {path.name} is not valid JSON ({e})") from None


def read_manifest(path: str | os.PathLike) -> dict | None:
    """``checkpoint.json`` of a checkpoint folder as a dict (None for a folder without one, e.g. a
    ``pskernels train --out`` folder)."""
    p = Path(path) / MANIFEST_NAME
    return _read_json(p, f"checkpoint {path}") if p.is_file() else None


def checkpoint_train_config(path: str | os.PathLike) -> dict:
    """The training configuration of a checkpoint folder: ``checkpoint.json``'s ``train_config`` (an exported
    checkpoint) or ``train_config.json`` (a ``pskernels train --out`` folder); ``{}`` when neither exists."""
    manifest = read_manifest(path)
    if manifest is not None:
        return dict(manifest.get("train_config") or {})
    p = Path(path) / TRAIN_CONFIG_NAME
    return _read_json(p, f"checkpoint {path}") if p.is_file() else {}


def trained_recompute(path: str | os.PathLike | None) -> tuple | None:
    """``(head, tail, together)`` when the checkpoint's synthesizer was trained on branches with those tokens
    recomputed in text order (``pskernels train --recompute``): it must read its branches so. None otherwise (also
    for ``path`` None or a bare mapper folder)."""
    r = checkpoint_train_config(path).get("recompute") if path is not None else None
    return tuple(r) if r else None


def trained_head_share(path: str | os.PathLike | None) -> float:
    """The share of each branch a synthesizer trained on recomputed branches recomputes at least when it reads
    them (its heads grow with long branches, :func:`pskernels.synthesis.recompute.grown_heads`): the manifest's
    ``head_share`` (chosen after training, docs/FIDELITY.md), else the one it was trained with (``train
    --head-share``); 0.0 when neither is set (a fixed head), for ``path`` None and for a checkpoint not trained on
    recomputed branches."""
    if path is None or not trained_recompute(path):
        return 0.0
    manifest = read_manifest(path) or {}
    where = MANIFEST_NAME if "head_share" in manifest else "its training configuration"
    share = manifest["head_share"] if "head_share" in manifest else checkpoint_train_config(path).get("head_share")
    share = 0.0 if share is None else share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise ValueError(f"checkpoint {path}: {where} has head_share {share!r}, expected a number in [0, 1]")
    return float(share)


def shipped_checkpoint(model_name: str, recompute: bool = False) -> Path | None:
    """The checkpoint shipped for ``model_name``, if it is on disk.

    Parameters
    ----------
    model_name : str
        A name as :func:`pskernels.synthesis.models.load_model` takes it (``"smollm2"``).
    recompute : bool
        The synthesizer trained on recomputed branches (:data:`SHIPPED_RECOMPUTE`) instead of the default one.

    Returns
    -------
    pathlib.Path or None
        ``CHECKPOINT_ROOT / SHIPPED[model_name]`` when that folder holds a ``checkpoint.json``; None for a
        name without a shipped checkpoint (``"tiny"``, an HF folder) or when the files are absent.
    """
    folder = (SHIPPED_RECOMPUTE if recompute else SHIPPED).get(model_name)
    if folder is None:
        return None
    path = Path(CHECKPOINT_ROOT) / folder
    return path if (path / MANIFEST_NAME).is_file() else None


def check_checkpoint(model, path: str | os.PathLike, *, label: str | None = None) -> None:
    """Raise unless the checkpoint folder ``path`` can be loaded onto ``model`` (nothing is loaded).

    Parameters
    ----------
    model : transformers.PreTrainedModel or peft.PeftModel
        The base model.
    path : str or os.PathLike
        A folder written by :func:`export_checkpoint` (``checkpoint.json``, ``mapper/``, ``adapter/``) or by
        ``pskernels train --out`` (``mapper/`` and/or ``adapter/``).
    label : str, optional
        What the error messages name first; default ``"checkpoint PATH"``.

    Raises
    ------
    FileNotFoundError
        ``path`` holds neither ``mapper/`` nor ``adapter/``.
    ValueError
        ``checkpoint.json``'s ``base_model`` differs from :func:`model_fingerprint` (the message lists the
        differing fields and says "a checkpoint of another model"), its ``format`` is unknown, or the mapper's
        layers, heads or head dim differ from the model's.
    """
    label = label or f"checkpoint {path}"
    path = Path(path)
    if not (path / MAPPER_DIR).is_dir() and not (path / ADAPTER_DIR).is_dir():
        raise FileNotFoundError(f"{label}: expected a folder written by export_checkpoint (checkpoint.json, "
                                f"{MAPPER_DIR}/, {ADAPTER_DIR}/) or by `pskernels train --out` ({MAPPER_DIR}/, "
                                f"{ADAPTER_DIR}/)")
    manifest = read_manifest(path)
    if manifest is not None:
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{label}: {MANIFEST_NAME} has format {manifest.get('format')!r}, expected {FORMAT}")
        trained_for, mine = dict(manifest.get("base_model") or {}), model_fingerprint(model)
        diff = fingerprint_mismatch(trained_for, mine)
        if diff:
            theirs = ", ".join(f"{f}={trained_for[f]}" for f in diff)
            ours = ", ".join(f"{f}={mine[f]}" for f in diff)
            raise ValueError(f"{label}: trained for {trained_for.get('model_type', '?')} with {theirs}, but the model "
                             f"({mine.get('model_type', '?')}) has {ours} (a checkpoint of another model)")
    mapper_cfg = path / MAPPER_DIR / MAPPER_CONFIG_NAME
    if mapper_cfg.is_file():
        check_mapper(model, CacheMapperConfig(**_read_json(mapper_cfg, label)), label)


def load_checkpoint(model, path: str | os.PathLike, *, label: str | None = None):
    """Load a synthesizer checkpoint (mapper + LoRA adapter) onto ``model`` after checking it was made for it.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The plain base model (not yet a PeftModel); it is wrapped in the checkpoint's adapter, if any.
    path : str or os.PathLike
        A folder written by :func:`export_checkpoint` (e.g. :func:`shipped_checkpoint`) or by
        ``pskernels train --out``.
    label : str, optional
        What the error messages name first; default ``"checkpoint PATH"``.

    Returns
    -------
    model : peft.PeftModel or transformers.PreTrainedModel
        ``model`` wrapped with the adapter (``model`` itself when the folder holds no adapter).
    mapper : CacheMapper or None
        None when the folder holds no mapper.

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`check_checkpoint` (checked before ``model`` is touched), and ValueError for a ``model`` that
        is already a PeftModel while the folder holds an adapter.
    """
    label = label or f"checkpoint {path}"
    check_checkpoint(model, path, label=label)
    if is_peft_model(model) and (Path(path) / ADAPTER_DIR).is_dir():
        raise ValueError(f"model: already a PeftModel; {label} holds an adapter and is loaded onto the plain model")
    return load_trained(model, str(path))


def _needed_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))


def _check_finite(path: Path, label: str) -> None:
    from safetensors.torch import load_file

    for name, t in load_file(str(path)).items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{label}: tensor {name!r} of {path} holds non-finite values (a diverged run?)")


def export_checkpoint(run_dir: str | os.PathLike, out_dir: str | os.PathLike, model, *, extra: dict,
                      overwrite: bool = False) -> Path:
    """Copy the loadable part of a ``pskernels train --out`` folder to ``out_dir`` and describe it.

    Copies ``mapper/`` and ``adapter/`` (their ``.json`` and ``.safetensors`` files only: no
    ``trainer_state.pt``, no PEFT ``README.md``; the adapter config's ``base_model_name_or_path`` keeps only
    its last path component, not the trainer's local path) and writes ``out_dir/checkpoint.json``::

        {"format": 1, "base_model": model_fingerprint(model), "train_config": <run_dir/train_config.json>, **extra}

    The folder is built next to ``out_dir`` and renamed into place, so a failed export leaves nothing behind.

    Parameters
    ----------
    run_dir : str or os.PathLike
        The training folder (``mapper/``, ``adapter/``, ``train_config.json``).
    out_dir : str or os.PathLike
        The new checkpoint folder (e.g. ``CHECKPOINT_ROOT / SHIPPED["smollm2"]``).
    model : transformers.PreTrainedModel or peft.PeftModel
        The base model the run trained on (its fingerprint is recorded; its shapes are checked against the
        mapper).
    extra : dict
        More JSON entries for ``checkpoint.json`` (the training command, data seed, measured figures); may not
        redefine ``format``, ``base_model`` or ``train_config``.
    overwrite : bool
        Replace an existing ``out_dir`` (otherwise refused).

    Returns
    -------
    pathlib.Path
        ``out_dir``.

    Raises
    ------
    ValueError
        ``run_dir`` lacks ``mapper/``, ``adapter/`` (with their config and safetensors files) or
        ``train_config.json``, or a safetensors file holds non-finite values; the mapper does not fit ``model``;
        ``extra`` redefines a reserved key or is not JSON; ``out_dir`` exists (without ``overwrite``) or lies
        inside ``run_dir``.
    """
    run, out = Path(run_dir), Path(out_dir)
    if not isinstance(extra, dict):
        raise ValueError(f"extra: expected a dict, got {type(extra).__name__}")
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra: may not redefine {clash} (written by export_checkpoint)")
    if not run.is_dir():
        raise ValueError(f"run_dir: {run} is not a folder")
    required = {MAPPER_DIR: (MAPPER_CONFIG_NAME, ".safetensors"), ADAPTER_DIR: ("adapter_config.json", ".safetensors")}
    for sub, (config_name, suffix) in required.items():
        folder = run / sub
        if not folder.is_dir():
            raise ValueError(f"run_dir: {run} has no {sub}/ (expected a `pskernels train --out` folder with "
                             f"{MAPPER_DIR}/ and {ADAPTER_DIR}/)")
        if not (folder / config_name).is_file() or not any(p.suffix == suffix for p in _needed_files(folder)):
            raise ValueError(f"run_dir: {folder} lacks {config_name} or a {suffix} file")
        for p in _needed_files(folder):
            if p.suffix == ".safetensors":
                _check_finite(p, "run_dir")
    if not (run / TRAIN_CONFIG_NAME).is_file():
        raise ValueError(f"run_dir: {run} has no {TRAIN_CONFIG_NAME}")
    check_mapper(model, CacheMapperConfig(**_read_json(run / MAPPER_DIR / MAPPER_CONFIG_NAME, "run_dir")), "run_dir")
    manifest = {"format": FORMAT, "base_model": model_fingerprint(model),
                "train_config": _read_json(run / TRAIN_CONFIG_NAME, "run_dir"), **extra}
    try:
        text = json.dumps(manifest, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra: not JSON-serializable ({e})") from None
    if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents:
        raise ValueError(f"out_dir: {out} lies inside run_dir {run}")
    if out.exists() and not overwrite:
        raise ValueError(f"out_dir: {out} exists (overwrite=True replaces it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for sub in required:
            (tmp / sub).mkdir()
            for p in _needed_files(run / sub):
                shutil.copyfile(p, tmp / sub / p.name)
        adapter_config = tmp / ADAPTER_DIR / "adapter_config.json"
        cfg = json.loads(adapter_config.read_text())  # PEFT records the trainer's local model path: keep its name
        if cfg.get("base_model_name_or_path"):
            cfg["base_model_name_or_path"] = Path(cfg["base_model_name_or_path"]).name
            adapter_config.write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / MANIFEST_NAME).write_text(text + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the checkpoint is package data
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
