"""Loading and saving weights: the published CHGNet checkpoints and our own format.

``load_model("0.3.0")`` reads the weight file shipped inside the installed ``chgnet`` package
(located with ``importlib`` — the package itself is never imported) and converts the reference's
parameter layout to the packed layout of :class:`~fastchgnet.model.exact.CHGNet`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastchgnet.model.config import CHGNetConfig
from fastchgnet.model.decoupled import DecoupledCHGNet
from fastchgnet.model.exact import CHGNet
from fastchgnet.model.heads import HeadsCHGNet

log = logging.getLogger(__name__)

FORMAT_NAME = "fastchgnet"
FORMAT_VERSION = 1
PRETRAINED = ("0.3.0", "0.2.0", "r2scan")
MODEL_TYPES: dict[str, type[CHGNet]] = {"exact": CHGNet, "decoupled": DecoupledCHGNet,
                                        "heads": HeadsCHGNet}


def register_model_type(name: str, cls: type[CHGNet]) -> None:
    """Make a model class loadable from checkpoints under ``model_type = name``."""
    MODEL_TYPES[name] = cls


def chgnet_weight_file(name: str = "0.3.0") -> Path:
    """Path of a pretrained weight file inside the installed ``chgnet`` package."""
    spec = importlib.util.find_spec("chgnet")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the CHGNet {name} weights ship with the `chgnet` package, which is not installed: "
            "install it (`pip install chgnet==0.4.2`, or `pip install fastchgnet[test]`) or pass "
            "the path of a CHGNet .pth.tar or fastchgnet checkpoint to load_model()"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "pretrained" / name
    files = sorted(folder.glob("*.pth.tar"))
    if not files:
        raise FileNotFoundError(f"no weight file for CHGNet {name!r} under {folder}")
    return files[0]


def load_model(
    model: str | os.PathLike = "0.3.0",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_checkpoint: bool = False,
) -> CHGNet:
    """Load a model.

    Args:
        model: ``"0.3.0"`` (the published CHGNet weights, from the installed ``chgnet`` package;
            also ``"0.2.0"`` and ``"r2scan"``), or the path of a CHGNet ``.pth.tar`` or of a
            fastchgnet checkpoint (see :func:`save_checkpoint`). A pretrained name given as a
            string always means the published weights, even when a file of that name exists in
            the working directory (a warning then says so); to load such a file, pass a path
            that is not a bare name, e.g. ``"./0.3.0"`` or ``pathlib.Path("0.3.0")``.
        device: where to put the model (default: CPU).
        dtype: parameter dtype, e.g. ``torch.float64`` (default: the checkpoint's dtype; float32
            for the CHGNet weights).
        trust_checkpoint: allow a full unpickle (``weights_only=False``) of a file that stores
            Python objects besides tensors. Only for files you trust: unpickling can run code.
    """
    key = str(model)
    if isinstance(model, str) and key in PRETRAINED:
        # a bare pretrained name is the published weights, never a file that happens to be here
        shadow = Path(key).exists()
        try:
            path = chgnet_weight_file(key)
        except FileNotFoundError as exc:
            if not shadow:
                raise
            raise FileNotFoundError(f"{exc}. (A file named {key!r} exists in {Path.cwd()}: to load "
                                    f"it, pass './{key}' or pathlib.Path({key!r}).)") from None
        if shadow:
            log.warning("load_model(%r): loaded the published CHGNet %s weights (%s), not the file "
                        "%r in %s; to load that file, pass './%s' or pathlib.Path(%r)", key, key,
                        path, key, Path.cwd(), key, key)
        version = key
    else:
        path = Path(model)
        version = None
        if not path.is_file():
            hint = (f"; for the published CHGNet {key} weights pass the string {key!r}"
                    if key in PRETRAINED else "")
            raise FileNotFoundError(
                f"{key!r} is neither a pretrained model name {PRETRAINED} nor an existing file{hint}"
            )
    ckpt = _torch_load(path, trusted=trust_checkpoint)
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT_NAME:
        net = _from_ours(ckpt, path)
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and "model_args" in ckpt["model"]:
        args = dict(ckpt["model"]["model_args"])
        if version == "0.2.0":
            args.setdefault("mlp_out_bias", True)  # the reference loads 0.2.0 this way
        net = from_chgnet_state_dict(ckpt["model"]["state_dict"], args)
        net.version = version or args.get("version")
    else:
        raise ValueError(
            f"{path} is neither a fastchgnet checkpoint nor a CHGNet checkpoint "
            "(expected a dict with 'format': 'fastchgnet', or with 'model': {'state_dict', 'model_args'})"
        )
    if dtype is not None:
        net = net.to(dtype)
    if device is not None:
        net = net.to(device)
    return net.eval()


def _torch_load(path: Path, trusted: bool = False) -> Any:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code runs).

    ``trusted=True`` allows a full unpickle for files that hold other Python objects; only use it
    for files you trust.
    """
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    if size == 0:
        raise ValueError(f"{path} is truncated or not a checkpoint: the file is empty (0 bytes). "
                         "If a run was writing it when it stopped, use an earlier checkpoint.")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as exc:  # torch raises several types for unreadable or unsafe files
        first = str(exc).splitlines()[0] if str(exc) else ""
        if not trusted and "weights only load failed" in str(exc).lower():
            raise ValueError(
                f"{path} could not be read as a torch checkpoint ({type(exc).__name__}: {first}). "
                "If this is a checkpoint you trust that stores other Python objects, pass "
                "trust_checkpoint=True."
            ) from exc
        raise ValueError(
            f"{path} is truncated or not a checkpoint ({size} bytes; torch.load: "
            f"{type(exc).__name__}: {first}). If a run was writing it when it stopped, use an "
            "earlier checkpoint."
        ) from exc


def _from_ours(ckpt: dict, path: Path) -> CHGNet:
    ver = ckpt.get("format_version")
    if ver is None or ver > FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported fastchgnet checkpoint format_version {ver!r}")
    mtype = ckpt.get("model_type", "exact")
    if mtype not in MODEL_TYPES:
        raise ValueError(f"{path}: unknown model_type {mtype!r} (known: {sorted(MODEL_TYPES)})")
    net = MODEL_TYPES[mtype](CHGNetConfig.from_dict(ckpt["config"]))
    saved = ckpt.get("dtype")
    if isinstance(saved, str) and saved.startswith("torch.") and hasattr(torch, saved[6:]):
        net = net.to(getattr(torch, saved[6:]))  # before loading: no rounding through float32
    net.load_state_dict(ckpt["state_dict"])
    net.version = ckpt.get("version")
    return net


def save_checkpoint(model: CHGNet, path: str | os.PathLike, **extra: Any) -> Path:
    """Write ``{format, format_version, model_type, config, state_dict, ...extra}`` atomically.

    The checkpoint is written to a temporary file in the same folder, flushed to disk, and renamed
    over ``path`` only when complete, so ``path`` is never a partial file. A failed write (a full
    disk, a quota) removes the temporary file and raises OSError naming ``path``, saying that the
    previous file (if any) is intact, with the operating system's reason.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_type": model.model_type,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "version": getattr(model, "version", None),
        "dtype": str(next(model.parameters()).dtype),
        **extra,
    }
    existed = path.is_file()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        # through a Python file object, a failed write raises OSError with its errno (torch's own
        # writer reports it only as "enforce fail at inline_container.cc")
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        if _is_write_failure(exc):
            raise _write_error(path, existed, exc) from exc
        raise  # e.g. an ``extra`` entry that cannot be pickled: not an I/O problem
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _is_write_failure(exc: BaseException) -> bool:
    """An I/O failure: an OSError in the chain, or torch's writer reporting one."""
    chain = (exc, exc.__cause__, exc.__context__)
    return (any(isinstance(e, OSError) for e in chain)
            or any(w in str(exc) for w in ("inline_container", "PytorchStreamWriter")))


def _write_error(path: Path, existed: bool, exc: BaseException) -> OSError:
    """OSError for a failed checkpoint write: the file, what is intact, the OS reason."""
    err = next((e for e in (exc, exc.__cause__, exc.__context__)
                if isinstance(e, OSError) and e.errno is not None), None)
    if err is not None:
        reason = f"{os.strerror(err.errno)} [errno {err.errno}]"
    else:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        try:
            free = shutil.disk_usage(path.parent).free
            reason += f" ({free / 2**20:.1f} MiB free in {path.parent})"
        except OSError:
            pass
    kept = (f"the previous {path.name} is intact" if existed else f"no {path.name} was written")
    msg = (f"could not write checkpoint {path}: {reason}. It is written to a temporary file and "
           f"renamed only when complete, so nothing was lost: {kept}.")
    return OSError(err.errno, msg) if err is not None else OSError(msg)


# ----------------------------------------------------------------------------------------------
# reference layout -> packed layout


def from_chgnet_state_dict(sd: dict[str, Tensor], model_args: dict[str, Any]) -> CHGNet:
    """Build an exact model from a reference CHGNet ``state_dict`` and ``model_args``."""
    cfg = CHGNetConfig.from_chgnet_args(model_args)
    net = CHGNet(cfg)
    net.load_state_dict(convert_chgnet_state_dict(sd, cfg))
    return net


def is_chgnet_model(obj: Any) -> bool:
    """Whether ``obj`` looks like a reference ``chgnet.model.CHGNet`` (duck-typed: the package
    is never imported here)."""
    return (isinstance(obj, torch.nn.Module) and isinstance(getattr(obj, "model_args", None), dict)
            and type(obj).__module__.startswith("chgnet."))


def from_chgnet_model(obj: Any) -> CHGNet:
    """An exact fastchgnet model with the weights of a reference ``chgnet.model.CHGNet`` object
    (on the CPU, in its parameter dtype, in eval mode; ``version`` kept)."""
    if not is_chgnet_model(obj):
        raise TypeError(f"expected a chgnet.model.CHGNet, got {type(obj).__module__}.{type(obj).__name__}")
    sd = {k: v.detach().cpu() for k, v in obj.state_dict().items()}
    net = from_chgnet_state_dict(sd, dict(obj.model_args))
    net.version = obj.model_args.get("version")
    dtype = next(iter(sd.values())).dtype
    return net.to(dtype).eval()


def _mlp_linears(prefix: str, hidden: int) -> list[str]:
    """Prefixes of the Linear layers of a reference ``MLP`` (first, then the output layer)."""
    return [f"{prefix}.layers.0", f"{prefix}.layers.3"] if hidden > 0 else [f"{prefix}.layers.1"]


def _gated(sd: dict[str, Tensor], prefix: str, hidden: int, splits: list[int]):
    """First-layer weight column blocks of core and gate, their biases, and the tail params."""
    first_c, *rest_c = _mlp_linears(f"{prefix}.mlp_core", hidden)
    first_g, *rest_g = _mlp_linears(f"{prefix}.mlp_gate", hidden)
    wc = torch.split(sd[f"{first_c}.weight"], splits, dim=1)
    wg = torch.split(sd[f"{first_g}.weight"], splits, dim=1)
    bias = torch.cat([sd[f"{first_c}.bias"], sd[f"{first_g}.bias"]])
    tail: dict[str, Tensor] = {}
    if hidden > 0:
        for name, src in (("core2", rest_c[0]), ("gate2", rest_g[0])):
            tail[f"tail.{name}.weight"] = sd[f"{src}.weight"]
            tail[f"tail.{name}.bias"] = sd[f"{src}.bias"]
    for name, src in (("norm_core", "bn1"), ("norm_gate", "bn2")):
        if f"{prefix}.{src}.weight" in sd:
            tail[f"tail.{name}.weight"] = sd[f"{prefix}.{src}.weight"]
            tail[f"tail.{name}.bias"] = sd[f"{prefix}.{src}.bias"]
    return wc, wg, bias, tail


def convert_chgnet_state_dict(sd: dict[str, Tensor], cfg: CHGNetConfig) -> dict[str, Tensor]:
    """Map a reference CHGNet state dict onto :class:`CHGNet`'s packed parameters."""
    A, B, G = cfg.atom_fea_dim, cfg.bond_fea_dim, cfg.angle_fea_dim
    out: dict[str, Tensor] = {
        "atom_embedding.weight": sd["atom_embedding.embedding.weight"],
        "rbf_ag.frequencies": sd["bond_basis_expansion.rbf_expansion_ag.frequencies"],
        "rbf_bg.frequencies": sd["bond_basis_expansion.rbf_expansion_bg.frequencies"],
        "angle_basis.frequencies": sd["angle_basis_expansion.fourier_expansion.frequencies"],
        "bond_embed_ag.weight": torch.cat([sd["bond_embedding.weight"], sd["bond_weights_ag.weight"]]),
        "bond_weights_bg.weight": sd["bond_weights_bg.weight"],
        "angle_embedding.weight": sd["angle_embedding.weight"],
        "site_wise.weight": sd["site_wise.weight"],
        "site_wise.bias": sd["site_wise.bias"],
    }
    if "composition_model.fc.weight" in sd:
        out["atom_ref"] = sd["composition_model.fc.weight"].reshape(-1)
    if cfg.readout_norm == "layer":
        out["readout_norm.weight"] = sd["readout_norm.weight"]
        out["readout_norm.bias"] = sd["readout_norm.bias"]
    n_hidden = len(cfg.mlp_hidden_dims)
    ref_idx = [2 * k for k in range(n_hidden)] + [2 * n_hidden + 1]
    for ours, ref in enumerate(ref_idx):
        for p in ("weight", "bias"):
            out[f"readout.{2 * ours}.{p}"] = sd[f"mlp.layers.{ref}.{p}"]

    def put_mlp_out(dst: str, src: str) -> None:
        out[f"{dst}.mlp_out.weight"] = sd[f"{src}.mlp_out.layers.1.weight"]
        if f"{src}.mlp_out.layers.1.bias" in sd:
            out[f"{dst}.mlp_out.bias"] = sd[f"{src}.mlp_out.layers.1.bias"]

    for k in range(cfg.n_conv):
        src = f"atom_conv_layers.{k}"
        wc, wg, bias, tail = _gated(sd, f"{src}.twoBody_atom", cfg.atom_conv_hidden_dim, [A, B, A])
        dst = f"atom_convs.{k}"
        out[f"{dst}.w_atom"] = torch.cat([wc[0], wg[0], wc[2], wg[2]])
        out[f"{dst}.w_bond"] = torch.cat([wc[1], wg[1]])
        out[f"{dst}.bias"] = bias
        out.update({f"{dst}.{n}": v for n, v in tail.items()})
        put_mlp_out(dst, src)
    layer_sets = []
    if cfg.update_bond:
        layer_sets.append(("bond_conv_layers", "bond_convs", cfg.bond_conv_hidden_dim, True))
    if cfg.update_angle:
        layer_sets.append(("angle_layers", "angle_updates", cfg.angle_layer_hidden_dim, False))
    for ref_name, our_name, hidden, has_out in layer_sets:
        for k in range(cfg.n_conv - 1):
            src = f"{ref_name}.{k}"
            wc, wg, bias, tail = _gated(sd, f"{src}.twoBody_bond", hidden, [B, B, G, A])
            dst = f"{our_name}.{k}"
            out[f"{dst}.w_bond"] = torch.cat([wc[0], wg[0], wc[1], wg[1]])
            out[f"{dst}.w_angle"] = torch.cat([wc[2], wg[2]])
            out[f"{dst}.w_atom"] = torch.cat([wc[3], wg[3]])
            out[f"{dst}.bias"] = bias
            out.update({f"{dst}.{n}": v for n, v in tail.items()})
            if has_out:
                put_mlp_out(dst, src)
    return {k: v.clone() for k, v in out.items()}
