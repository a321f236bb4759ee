"""Reading the SAE files people bring, and writing SAELens files.

Every loader checks each tensor by name and shape and raises :class:`ModelLoadError` naming the
file, the tensor and the expected and actual shapes; what cannot be interpreted exactly (an
unknown architecture, a missing normalization factor, extra tensors) is refused, never guessed.
Tensors keep the dtype they were stored in; nothing is copied beyond what reading the file costs.

Formats (see ``notes/field.md``):

- ``saelens``: ``cfg.json`` + ``sae_weights.safetensors`` (``W_enc [d_in,d_sae]``, ``b_enc``,
  ``W_dec [d_sae,d_in]``, ``b_dec``; jumprelu ``threshold`` or ``log_threshold``; gated ``b_gate``,
  ``r_mag``, ``b_mag`` instead of ``b_enc``). v6 cfgs keep the hook under ``metadata``.
- ``gemmascope``: ``params.npz`` (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``threshold``), JumpReLU.
  No hook name: the layer comes from the caller.
- ``sparsify``: ``cfg.json`` + ``sae.safetensors`` (``encoder.weight [n,d_in]``, ``encoder.bias``,
  ``W_dec [n,d_in]``, ``b_dec``), TopK after subtracting ``b_dec``. The directory name is the
  hookpoint (``layers.L``) when it looks like one.
- ``goodfire``: one ``.safetensors``/``.pt``/``.pth`` file (``encoder_linear.weight [d_sae,d]``,
  ``encoder_linear.bias``, ``decoder_linear.weight [d,d_sae]``, ``decoder_linear.bias``), ReLU.
  No hook name: the layer comes from the caller.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from guard.errors import ModelLoadError
from guard.sae.model import NORMALIZATIONS, Sae, layer_for_hook, present

Format = Literal["auto", "saelens", "gemmascope", "sparsify", "goodfire"]
FORMATS: tuple[str, ...] = ("saelens", "gemmascope", "sparsify", "goodfire")
SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
GEMMASCOPE_FILE = "params.npz"
SPARSIFY_CFG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
GOODFIRE_KEYS = (
    "encoder_linear.weight",
    "encoder_linear.bias",
    "decoder_linear.weight",
    "decoder_linear.bias",
)
GOODFIRE_SUFFIXES = (".safetensors", ".pt", ".pth")
NORM_FACTOR_KEYS = ("normalization_scaling_factor", "norm_scaling_factor", "scaling_factor")
"""cfg.json keys that may hold the ``expected_average_only_in`` factor (the first present wins)."""
ACTIVATION_SCALER_FILE = "activation_scaler.json"
"""SAELens' side file ``{"scaling_factor": ...}``; read when the cfg holds no factor."""
_SAELENS_ARCH = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk", "gated": "gated"}


def load_sae(
    path: str | Path,
    *,
    format: Format = "auto",
    layer: int | None = None,
    hook_name: str | None = None,
) -> Sae:
    """Load an SAE directory or file; ``format="auto"`` detects it from the files present.

    ``hook_name`` replaces the file's hook name; ``layer`` sets the engine layer for files that
    have none (Gemma Scope, Goodfire) and must agree with the hook when there is one.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"SAE not found: {path}")
    fmt = detect_format(path) if format == "auto" else format
    loaders = {
        "saelens": _load_saelens,
        "gemmascope": _load_gemmascope,
        "sparsify": _load_sparsify,
        "goodfire": _load_goodfire,
    }
    if fmt not in loaders:
        raise ModelLoadError(f"unknown SAE format {fmt!r}; expected auto or one of {FORMATS}")
    sae = loaders[fmt](path)
    return _with_layer(sae, path, layer, hook_name)


def detect_format(path: Path) -> str:
    """Which loader reads ``path``, judged by file names (and, for a bare safetensors file, its keys)."""
    if path.is_file():
        if path.name == SAELENS_WEIGHTS:
            return "saelens"
        if path.name == SPARSIFY_WEIGHTS:
            return "sparsify"
        if path.suffix == ".npz":
            return "gemmascope"
        if path.suffix in GOODFIRE_SUFFIXES:
            return "goodfire"
    elif path.is_dir():
        if (path / GEMMASCOPE_FILE).is_file():
            return "gemmascope"
        if (path / SAELENS_WEIGHTS).is_file():
            return "saelens"
        if (path / SPARSIFY_WEIGHTS).is_file():
            return "sparsify"
        if len(_goodfire_candidates(path)) == 1:
            return "goodfire"
    raise ModelLoadError(
        f"cannot tell which SAE format {path} is: expected a directory with {SAELENS_CFG} + {SAELENS_WEIGHTS} "
        f"(SAELens), {GEMMASCOPE_FILE} (Gemma Scope), {SPARSIFY_CFG} + {SPARSIFY_WEIGHTS} (EleutherAI sparsify) or "
        f"a single Goodfire .safetensors/.pt file; set `format:` in the policy to say which"
    )


# -- SAELens --------------------------------------------------------------------------------


def _load_saelens(path: Path) -> Sae:
    directory = path.parent if path.is_file() else path
    cfg_path, weights = directory / SAELENS_CFG, directory / SAELENS_WEIGHTS
    cfg = _read_json(cfg_path)
    tensors = _read_safetensors(weights)
    activation, k = _saelens_activation(cfg, cfg_path)
    meta = cfg["metadata"] if isinstance(cfg.get("metadata"), dict) else {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    head = meta.get("hook_head_index", cfg.get("hook_head_index"))
    if head is not None:
        raise ModelLoadError(
            f"{cfg_path}: hook_head_index {head} (an attention-head SAE) is not supported; "
            "guard reads the residual stream"
        )
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise ModelLoadError(
            f"{cfg_path}: reshape_activations {cfg['reshape_activations']!r} is not supported "
            "(only residual-stream SAEs)"
        )
    d_in, d_sae = _shape_of(tensors, "W_enc", weights)
    for key, value in (("d_in", d_in), ("d_sae", d_sae)):
        if key in cfg and cfg[key] != value:
            raise ModelLoadError(
                f"{cfg_path}: {key} is {cfg[key]} but {weights.name} W_enc has shape {[d_in, d_sae]}"
            )
    names = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if activation == "gated":
        names.update(b_gate=(d_sae,), r_mag=(d_sae,), b_mag=(d_sae,))
    else:
        names["b_enc"] = (d_sae,)
    thr_name = (
        "log_threshold" if activation == "jumprelu" and "log_threshold" in tensors else "threshold"
    )
    if activation == "jumprelu":
        names[thr_name] = (d_sae,)
    t = _take(tensors, names, weights)
    normalize, scale = _saelens_normalization(cfg, cfg_path, directory)
    threshold = None
    if activation == "jumprelu":
        threshold = t[thr_name].exp() if thr_name == "log_threshold" else t[thr_name]
    return _build(
        weights,
        W_enc=t["W_enc"],
        b_enc=t.get("b_enc", t.get("b_gate")),
        W_dec=t["W_dec"],
        b_dec=t["b_dec"],
        activation=activation,
        threshold=threshold,
        k=k,
        b_gate=t.get("b_gate"),
        r_mag=t.get("r_mag"),
        b_mag=t.get("b_mag"),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)),
        normalize=normalize,
        norm_scale=scale,
        hook_name=hook,
    )


def _saelens_activation(cfg: dict[str, Any], cfg_path: Path) -> tuple[str, int | None]:
    """(activation, k) from a v6 (``architecture: topk``, ``k``) or older (``activation_fn_str``) cfg."""
    arch = cfg.get("architecture", "standard")
    fn = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu")) or "relu"
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if arch == "topk" or (arch == "standard" and fn == "topk"):
        k = cfg.get("k", kwargs.get("k"))
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ModelLoadError(
                f"{cfg_path}: a topk SAE needs a positive integer `k` (top level or in "
                f"activation_fn_kwargs), got {k!r}"
            )
        return "topk", k
    if arch in ("standard", "relu"):
        if fn != "relu":
            raise ModelLoadError(
                f"{cfg_path}: activation_fn {fn!r} is not supported (relu or topk)"
            )
        return "relu", None
    if arch in ("jumprelu", "gated"):
        return arch, None
    raise ModelLoadError(
        f"{cfg_path}: unknown SAE architecture {arch!r}; supported: standard (relu), jumprelu, "
        "gated, topk (batchtopk SAEs are saved as jumprelu for inference)"
    )


def _saelens_normalization(
    cfg: dict[str, Any], cfg_path: Path, directory: Path
) -> tuple[str, float | None]:
    normalize = cfg.get("normalize_activations", "none") or "none"
    if normalize not in NORMALIZATIONS:
        raise ModelLoadError(
            f"{cfg_path}: normalize_activations {normalize!r} is not supported; expected one of "
            f"{NORMALIZATIONS}"
        )
    if normalize != "expected_average_only_in":
        return normalize, None
    scale = next((cfg[k] for k in NORM_FACTOR_KEYS if cfg.get(k) is not None), None)
    side = directory / ACTIVATION_SCALER_FILE
    if scale is None and side.is_file():
        scale = _read_json(side).get("scaling_factor")
    if (
        not isinstance(scale, (int, float))
        or isinstance(scale, bool)
        or not scale > 0
        or not math.isfinite(scale)
    ):
        raise ModelLoadError(
            f"{cfg_path}: normalize_activations is expected_average_only_in but no positive "
            f"scaling factor was found (looked for {list(NORM_FACTOR_KEYS)} in the cfg and "
            f"'scaling_factor' in {ACTIVATION_SCALER_FILE}); without it the features are "
            "computed on the wrong scale"
        )
    return normalize, float(scale)


def save_saelens(
    sae: Sae,
    out_dir: str | Path,
    *,
    model_name: str,
    hook_name: str,
    extra_cfg: dict[str, Any] | None = None,
) -> Path:
    """Write ``cfg.json`` (SAELens v6 layout) and ``sae_weights.safetensors`` into ``out_dir``.

    ``extra_cfg`` is merged into the top level (its ``metadata`` into ``metadata``). The file
    round-trips through :func:`load_sae` to an SAE that encodes identically.
    """
    from safetensors.torch import save_file

    if sae.layer is not None and layer_for_hook(hook_name) != sae.layer:
        raise ValueError(
            f"hook {hook_name!r} is engine layer {layer_for_hook(hook_name)}, but the SAE reads "
            f"layer {sae.layer}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "architecture": _SAELENS_ARCH[sae.activation],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": sae.normalize,
        "reshape_activations": "none",
        "metadata": {"model_name": model_name, "hook_name": hook_name, "hook_head_index": None},
    }
    if sae.activation == "topk":
        cfg["k"] = sae.k
    if sae.normalize == "expected_average_only_in":
        cfg[NORM_FACTOR_KEYS[0]] = sae.norm_scale
    extra = dict(extra_cfg or {})
    cfg["metadata"].update(extra.pop("metadata", {}) or {})
    cfg.update(extra)
    tensors = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.activation == "gated":
        tensors.update(
            b_gate=present(sae.b_gate, "b_gate"),
            r_mag=present(sae.r_mag, "r_mag"),
            b_mag=present(sae.b_mag, "b_mag"),
        )
    else:
        tensors["b_enc"] = sae.b_enc
    if sae.activation == "jumprelu":
        tensors["threshold"] = present(sae.threshold, "threshold")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(out / SAELENS_WEIGHTS))
    (out / SAELENS_CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    return out


# -- Gemma Scope ----------------------------------------------------------------------------


def _load_gemmascope(path: Path) -> Sae:
    file = path / GEMMASCOPE_FILE if path.is_dir() else path
    try:
        with np.load(file) as npz:
            tensors = {k: torch.from_numpy(npz[k]) for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{file}: cannot read Gemma Scope params: {exc}") from exc
    d_in, d_sae = _shape_of(tensors, "W_enc", file)
    t = _take(
        tensors,
        {
            "W_enc": (d_in, d_sae),
            "b_enc": (d_sae,),
            "W_dec": (d_sae, d_in),
            "b_dec": (d_in,),
            "threshold": (d_sae,),
        },
        file,
    )
    return _build(file, activation="jumprelu", **t)


# -- EleutherAI sparsify --------------------------------------------------------------------


def _load_sparsify(path: Path) -> Sae:
    directory = path.parent if path.is_file() else path
    cfg_path, weights = directory / SPARSIFY_CFG, directory / SPARSIFY_WEIGHTS
    cfg = _read_json(cfg_path)
    tensors = _read_safetensors(weights)
    d_in, k = cfg.get("d_in"), cfg.get("k")
    if not isinstance(d_in, int) or not isinstance(k, int) or d_in < 1 or k < 1:
        raise ModelLoadError(
            f"{cfg_path}: needs positive integers d_in and k, got d_in={d_in!r} k={k!r}"
        )
    if cfg.get("activation", "topk") != "topk":
        raise ModelLoadError(
            f"{cfg_path}: activation {cfg['activation']!r} is not supported (topk only)"
        )
    if cfg.get("skip_connection") or "W_skip" in tensors:
        raise ModelLoadError(f"{cfg_path}: skip-connection SAEs/transcoders are not supported")
    n = cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor") or 0)
    if n < 1:
        raise ModelLoadError(
            f"{cfg_path}: cannot tell the number of latents (num_latents and expansion_factor "
            "are both missing or 0)"
        )
    t = _take(
        tensors,
        {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)},
        weights,
    )
    hook = directory.name if directory.name.startswith(("layers.", "model.layers.")) else None
    return _build(
        weights,
        W_enc=t["encoder.weight"].T,
        b_enc=t["encoder.bias"],
        W_dec=t["W_dec"],
        b_dec=t["b_dec"],
        activation="topk",
        k=k,
        apply_b_dec_to_input=True,
        hook_name=hook,
    )


# -- Goodfire -------------------------------------------------------------------------------


def _goodfire_candidates(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in GOODFIRE_SUFFIXES)


def _load_goodfire(path: Path) -> Sae:
    if path.is_dir():
        files = _goodfire_candidates(path)
        if len(files) != 1:
            raise ModelLoadError(
                f"{path}: expected exactly one Goodfire weights file ({'/'.join(GOODFIRE_SUFFIXES)}), "
                f"found {[p.name for p in files]}"
            )
        path = files[0]
    tensors = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    if "encoder_linear.weight" not in tensors:
        raise ModelLoadError(
            f"{path}: tensor 'encoder_linear.weight' is missing (has {sorted(tensors)}); "
            f"a Goodfire SAE has {list(GOODFIRE_KEYS)}"
        )
    enc = tensors["encoder_linear.weight"]
    if enc.ndim != 2:
        raise ModelLoadError(
            f"{path}: tensor 'encoder_linear.weight' must be [d_sae, d], got {list(enc.shape)}"
        )
    d_sae, d_in = enc.shape
    t = _take(
        tensors,
        dict(zip(GOODFIRE_KEYS, ((d_sae, d_in), (d_sae,), (d_in, d_sae), (d_in,)), strict=True)),
        path,
    )
    return _build(
        path,
        W_enc=enc.T,
        b_enc=t["encoder_linear.bias"],
        W_dec=t["decoder_linear.weight"].T,
        b_dec=t["decoder_linear.bias"],
        activation="relu",
    )


# -- helpers --------------------------------------------------------------------------------


def _with_layer(sae: Sae, where: Path, layer: int | None, hook_name: str | None) -> Sae:
    """Fill ``hook_name``/``layer``; a layer that contradicts the hook is an error."""
    hook = hook_name or sae.hook_name
    hook_layer = layer_for_hook(hook) if hook else None
    if layer is not None and hook_layer is not None and layer != hook_layer:
        raise ModelLoadError(
            f"SAE {where} was trained on {hook!r} (engine layer {hook_layer}) but layer {layer} was "
            f"asked for; an SAE only applies to its own layer: drop `layer` or set it to {hook_layer}"
        )
    if layer is not None and layer < 0:
        raise ModelLoadError(f"SAE {where}: layer must be >= 0, got {layer}")
    sae.hook_name = hook
    sae.layer = layer if layer is not None else hook_layer
    return sae


def _build(where: Path, **fields: Any) -> Sae:
    try:
        return Sae(**fields)
    except ValueError as exc:
        raise ModelLoadError(f"{where}: {exc}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelLoadError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise ModelLoadError(f"{path}: cannot read tensors: {exc}") from exc


def _read_torch(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle/runtime errors of many kinds for bad files
        raise ModelLoadError(
            f"{path}: cannot read torch weights (weights_only=True): {exc}"
        ) from exc
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ModelLoadError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return obj


def _shape_of(tensors: dict[str, Tensor], name: str, where: Path) -> tuple[int, int]:
    if name not in tensors:
        raise ModelLoadError(f"{where}: tensor '{name}' is missing (has {sorted(tensors)})")
    if tensors[name].ndim != 2:
        raise ModelLoadError(
            f"{where}: tensor '{name}' must be 2-D [d_in, d_sae], got {list(tensors[name].shape)}"
        )
    d_in, d_sae = tensors[name].shape
    return d_in, d_sae


def _take(
    tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]], where: Path
) -> dict[str, Tensor]:
    """Exactly the ``expected`` tensors with their shapes; missing, misshapen or extra ones are errors."""
    for name, shape in expected.items():
        if name not in tensors:
            raise ModelLoadError(f"{where}: tensor '{name}' is missing (has {sorted(tensors)})")
        if tuple(tensors[name].shape) != shape:
            raise ModelLoadError(
                f"{where}: tensor '{name}' has shape {list(tensors[name].shape)}, "
                f"expected {list(shape)}"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ModelLoadError(
            f"{where}: unexpected tensors {extra} "
            f"(cannot interpret them; expected {sorted(expected)})"
        )
    return {name: tensors[name] for name in expected}
