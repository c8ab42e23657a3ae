"""Peers side by side: fastchgnet, matgl's CHGNet (0.3.0 weights ported) and ``chgnet``, on the CPU.

matgl is a benchmark-only extra (``pip install -e ".[peers]"``, the ``fastchgnet[peers]`` extra);
nothing outside ``fastchgnet.bench`` imports it, and here it is imported inside functions only.

**The port.** matgl's pretrained files come from a hub that is not reachable here, so its
``matgl.models.CHGNet`` is built with CHGNet 0.3.0's hyperparameters (:data:`MATGL_030`) and
given chgnet's 0.3.0 weights by an explicit key-by-key mapping (:func:`port_state_dict`; every
matgl parameter is assigned exactly once; the one in :data:`UNUSED` is zero and never read).
Two instance-level settings bring matgl's modules to 0.3.0's layout without touching its code:
the per-block ``atom_norm``/``bond_norm`` LayerNorms that matgl adds with
``normalization="layer"`` (0.3.0 has LayerNorms only inside its GatedMLPs) are set to None, which
matgl's forward skips, and 0.3.0's readout LayerNorm is put in front of matgl's ``final_layer``.
What stays different is matgl's own architecture (see ``ARCHITECTURAL_DIFFERENCES`` and
docs/performance.md): its outputs differ from chgnet's by far more than the parity tolerances,
but it computes the same amount of work (same widths, bases, graphs, blocks and autograd
forces/stress), which is what a speed comparison needs.

**The cases** (:mod:`fastchgnet.bench.peers_run`; each timed for all three packages, interleaved round by round, after warm-up):
``md``: one velocity-Verlet step through each package's ASE calculator (fastchgnet's
``CHGNetCalculator``, matgl's ``PESCalculator`` on a ``Potential`` with stresses and magmoms,
chgnet's ``CHGNetCalculator``); ``predict``: efsm of 16 structures in one batch, end to end
(graphs, batching, model, results); ``train``: one training step at batch 8 of the exact model
(forward with create_graph, Huber loss on e/f/s/m, backward, Adam), graphs built outside.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections import OrderedDict
from typing import Any, Callable, Iterator

import numpy as np
import torch

from fastchgnet.bench.common import load_reference, quiet

__all__ = ["ARCHITECTURAL_DIFFERENCES", "IMPLS", "MATGL_030", "PEERS_HINT", "UNUSED",
           "Interleaved", "build_matgl_chgnet", "chgnet_bonds", "chgnet_cutoff", "matgl_available",
           "matgl_calculator", "matgl_graphs", "matgl_outputs", "matgl_potential",
           "matgl_train_step", "max_diffs", "port_state_dict", "ported_model", "require_matgl",
           "torch_threads"]

IMPLS = ("ours", "matgl", "chgnet")
PEERS_HINT = ('matgl is not installed: it is the benchmark-only extra fastchgnet[peers] '
              '(pip install -e ".[peers]"; `make bench` installs it)')

#: matgl.models.CHGNet keywords that reproduce CHGNet 0.3.0's hyperparameters (chgnet's
#: model_args: feature dims 64, num_radial 31, num_angular 31 (max_f 15 -> 2*15+1), cutoffs 6/3 Å,
#: cutoff_coeff 8, learnable bases, n_conv 4, hidden 64 in atom/bond convs and none in the angle
#: update, LayerNorm in the GatedMLPs, readout MLP 64-64-64, silu, no dropout)
MATGL_030 = dict(
    dim_atom_embedding=64, dim_bond_embedding=64, dim_angle_embedding=64,
    cutoff=6.0, threebody_cutoff=3.0, cutoff_exponent=8, max_n=31, max_f=15, learn_basis=True,
    num_blocks=4, shared_bond_weights="both", layer_bond_weights=None,
    atom_conv_hidden_dims=(64,), bond_update_hidden_dims=None, bond_conv_hidden_dims=(64,),
    angle_update_hidden_dims=(), conv_dropout=0.0, final_mlp_type="mlp",
    final_hidden_dims=(64, 64, 64), final_dropout=0.0, pooling_operation="sum",
    readout_field="atom_feat", activation_type="swish", normalization="layer",
    normalize_hidden=False, is_intensive=False, num_targets=1, num_site_targets=1,
)

#: matgl parameters with no 0.3.0 counterpart that its forward never reads with MATGL_030:
#: ``shared_bond_weights="both"`` also creates the atom blocks' edge weights, used only by an
#: edge update (``bond_update_hidden_dims``), which 0.3.0 does not have. Set to zero.
UNUSED = ("bond_bond_weights.weight",)

ARCHITECTURAL_DIFFERENCES = (
    "bond features: matgl keeps one feature row per directed bond and updates bond c->b only "
    "from the angles centred on c; chgnet keeps one row per undirected bond, updated from the "
    "angles centred on both of its atoms",
    "smooth cutoff: matgl multiplies the radial bases by polynomial_cutoff(bases, cutoff, p), "
    "i.e. the envelope of the basis values; chgnet multiplies them by the envelope of d/cutoff",
    "magnetic moments: chgnet returns |site_wise(h)|, matgl site_wise(h) (abs taken here)",
)

# ----------------------------------------------------------------------------------------------
# matgl, lazily


def matgl_available() -> bool:
    try:
        import matgl  # noqa: F401
        import torch_geometric  # noqa: F401
    except ImportError:
        return False
    return True


def require_matgl() -> None:
    if not matgl_available():
        raise ImportError(PEERS_HINT)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch intra-op threads set to ``n`` inside the block and restored after it."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_matgl_chgnet() -> torch.nn.Module:
    """matgl's CHGNet with :data:`MATGL_030`, its LayerNorm placement set to 0.3.0's (random
    weights; :func:`port_state_dict` fills them)."""
    require_matgl()
    with quiet():
        from matgl.models import CHGNet as MatglCHGNet

        model = MatglCHGNet(**MATGL_030)
    for block in model.atom_graph_layers:  # matgl's forward skips a None norm
        block.atom_norm = None
        block.bond_norm = None
    model.final_layer = torch.nn.Sequential(OrderedDict(
        readout_norm=torch.nn.LayerNorm(MATGL_030["dim_atom_embedding"]), mlp=model.final_layer))
    return model


def _z(symbol: str) -> int:
    from pymatgen.core import Element

    return Element(symbol).Z


def _cols(w: torch.Tensor, order: list[int], width: int = 64) -> torch.Tensor:
    """The column blocks of ``w`` (``width`` each) in the given order."""
    return torch.cat([w[:, i * width:(i + 1) * width] for i in order], dim=1)


# chgnet's GatedMLP inputs: atom conv [centre, bond, nbr], aggregated on the centre; bond conv and
# angle update [bond_i, bond_j, angle, centre], aggregated on bond_i. matgl's: atom block
# [src, edge, dst] summed onto dst; line graph [bond_src, angle, centre, bond_dst] summed onto
# bond_dst. The receiver is chgnet's centre / bond_i, the sender its nbr / bond_j.
_ATOM_ORDER = [2, 1, 0]
_BOND_ORDER = [1, 2, 3, 0]


def port_state_dict(ref_sd: dict[str, torch.Tensor],
                    element_types: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], torch.Tensor, set]:
    """(matgl state_dict, element_refs in matgl's element order, the chgnet keys used) from
    chgnet 0.3.0's state_dict.

    The mapping is explicit; the caller checks that its keys are exactly matgl's.
    """
    c = {k: v.detach().clone() for k, v in ref_sd.items()}
    rows = torch.tensor([_z(el) - 1 for el in element_types])
    out: dict[str, torch.Tensor] = {}
    out["atom_embedding.weight"] = c["atom_embedding.embedding.weight"][rows]
    out["bond_expansion.frequencies"] = c["bond_basis_expansion.rbf_expansion_ag.frequencies"]
    out["threebody_bond_expansion.frequencies"] = c["bond_basis_expansion.rbf_expansion_bg.frequencies"]
    freq = c["angle_basis_expansion.fourier_expansion.frequencies"]
    out["angle_expansion.frequencies"] = torch.cat([freq.new_zeros(1), freq])
    # chgnet's Fourier basis [1/sqrt2, sin(f_k t), cos(f_k t)] / sqrt(pi); matgl's
    # [cos(0 t), sin(f_1 t), cos(f_1 t), ...] / pi: permute and scale the embedding's columns
    w = c["angle_embedding.weight"]
    n = freq.numel()
    wm = torch.empty_like(w)
    wm[:, 0] = w[:, 0] * math.sqrt(math.pi / 2)
    wm[:, 1::2] = w[:, 1:n + 1] * math.sqrt(math.pi)
    wm[:, 2::2] = w[:, n + 1:] * math.sqrt(math.pi)
    out["angle_embedding.layers.0.weight"] = wm
    out["bond_embedding.layers.0.weight"] = c["bond_embedding.weight"]
    out["atom_bond_weights.weight"] = c["bond_weights_ag.weight"]
    out["threebody_bond_weights.weight"] = c["bond_weights_bg.weight"]
    out["bond_bond_weights.weight"] = torch.zeros_like(c["bond_weights_ag.weight"])  # UNUSED

    def gated(dst: str, src: str, first: str, second: str | None, order: list[int]) -> None:
        for part, norm in (("value", "bn1"), ("gate", "bn2")):
            mlp = f"{src}.mlp_{'core' if part == 'value' else 'gate'}.layers"
            out[f"{dst}.{part}.layers.0.weight"] = _cols(c[f"{mlp}.{first}.weight"], order)
            out[f"{dst}.{part}.layers.0.bias"] = c[f"{mlp}.{first}.bias"]
            if second is not None:
                out[f"{dst}.{part}.layers.1.weight"] = c[f"{mlp}.{second}.weight"]
                out[f"{dst}.{part}.layers.1.bias"] = c[f"{mlp}.{second}.bias"]
            out[f"{dst}.{part}.norms.0.weight"] = c[f"{src}.{norm}.weight"]
            out[f"{dst}.{part}.norms.0.bias"] = c[f"{src}.{norm}.bias"]

    n_conv = 1 + max(int(k.split(".")[1]) for k in c if k.startswith("atom_conv_layers."))
    for k in range(n_conv):
        gated(f"atom_graph_layers.{k}.conv.node_update_func", f"atom_conv_layers.{k}.twoBody_atom",
              "0", "3", _ATOM_ORDER)
        out[f"atom_graph_layers.{k}.conv.node_out_func.weight"] = \
            c[f"atom_conv_layers.{k}.mlp_out.layers.1.weight"]
    for k in range(n_conv - 1):
        gated(f"bond_graph_layers.{k}.conv.node_update_func", f"bond_conv_layers.{k}.twoBody_bond",
              "0", "3", _BOND_ORDER)
        out[f"bond_graph_layers.{k}.conv.node_out_func.weight"] = \
            c[f"bond_conv_layers.{k}.mlp_out.layers.1.weight"]
        gated(f"bond_graph_layers.{k}.conv.edge_update_func", f"angle_layers.{k}.twoBody_bond",
              "1", None, _BOND_ORDER)
    out["sitewise_readout.weight"] = c["site_wise.weight"]
    out["sitewise_readout.bias"] = c["site_wise.bias"]
    out["final_layer.readout_norm.weight"] = c["readout_norm.weight"]
    out["final_layer.readout_norm.bias"] = c["readout_norm.bias"]
    for i, j in enumerate((0, 2, 4, 7)):  # chgnet's Sequential indices of its readout Linears
        out[f"final_layer.mlp.layers.{i}.weight"] = c[f"mlp.layers.{j}.weight"]
        out[f"final_layer.mlp.layers.{i}.bias"] = c[f"mlp.layers.{j}.bias"]
    refs = c["composition_model.fc.weight"].reshape(-1)[rows]
    used = {k for k in c if k != "composition_model.fc.weight"}
    return out, refs, used


def ported_model(ref: Any = None) -> tuple[torch.nn.Module, torch.Tensor]:
    """(matgl CHGNet with chgnet's 0.3.0 weights, element_refs); asserts the mapping covers every
    matgl parameter/buffer exactly once and uses every chgnet parameter."""
    if ref is None:
        ref = load_reference("cpu")
        if ref is None:
            raise ImportError("chgnet is not installed: its 0.3.0 weights are the port's source")
    model = build_matgl_chgnet()
    ref_sd = ref.state_dict()
    mapped, refs, used = port_state_dict(ref_sd, tuple(model.element_types))
    target = model.state_dict()
    missing, extra = set(target) - set(mapped), set(mapped) - set(target)
    assert not missing and not extra, f"port mapping: missing {sorted(missing)}, extra {sorted(extra)}"
    for k, v in mapped.items():
        assert v.shape == target[k].shape, f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}"
    unmapped = set(ref_sd) - used - {"composition_model.fc.weight"}
    assert not unmapped, f"chgnet parameters not ported: {sorted(unmapped)}"
    model.load_state_dict(mapped, strict=True)
    return model.eval(), refs


def matgl_potential(ref: Any = None, *, training: bool = False) -> Any:
    """matgl ``Potential`` (forces, stresses, magmoms) around the ported model, with chgnet's
    AtomRef as ``element_refs``."""
    model, refs = ported_model(ref)
    with quiet():
        from matgl.apps.pes import Potential

        pot = Potential(model=model, element_refs=refs, calc_forces=True, calc_stresses=True,
                        calc_magmom=True)
    pot.element_refs.requires_grad_(False)  # frozen, as the AtomRef in the other two steps
    return pot.train() if training else pot.eval()


def matgl_calculator(pot: Any) -> Any:
    """matgl's own ASE calculator (stress in eV/Å^3, ASE's unit, Voigt order)."""
    with quiet():
        from matgl.ext.ase import PESCalculator

        return PESCalculator(pot, stress_unit="eV/A3", use_voigt=True)


def matgl_graphs(structures: list, element_types: tuple[str, ...], cutoff: float) -> tuple[Any, torch.Tensor]:
    """(batched PyG graph, lattices (B, 3, 3)) of pymatgen structures with matgl's converter."""
    from matgl.ext.pymatgen import Structure2Graph
    from torch_geometric.data import Batch

    conv = Structure2Graph(element_types=element_types, cutoff=cutoff)
    graphs, lats = [], []
    for s in structures:
        g, lat, _ = conv.get_graph(s)
        graphs.append(g)
        lats.append(lat.reshape(1, 3, 3))
    return Batch.from_data_list(graphs), torch.cat(lats)


def matgl_outputs(pot: Any, structures: list) -> list[dict[str, np.ndarray]]:
    """Per-structure ``{e (eV/atom), f, s (GPa), m (|m|)}`` from one batched
    matgl call: graphs, batching, model, results to numpy (the timed ``predict`` case)."""
    model = pot.model
    g, lat = matgl_graphs(structures, tuple(model.element_types), model.cutoff)
    e, f, s, _, m = pot(g, lat)
    counts = [len(x) for x in structures]
    e, f, s, m = (t.detach().numpy() for t in (e, f, s, m))
    out, start = [], 0
    for i, n in enumerate(counts):
        out.append({"e": float(e.reshape(-1)[i]) / n, "f": f[start:start + n],
                    "s": s[3 * i:3 * i + 3], "m": np.abs(m[start:start + n].reshape(-1))})
        start += n
    return out


def matgl_train_step(pot: Any, optimizer: torch.optim.Optimizer, g: Any, lat: torch.Tensor,
                     counts: torch.Tensor, labels: dict[str, torch.Tensor],
                     loss_fn: Callable[[dict, dict], torch.Tensor]) -> torch.Tensor:
    """One training step of matgl's Potential (training mode: create_graph) on a prebuilt batch,
    with the same loss formula on e/atom, f, s (GPa) and |m|."""
    e, f, s, _, m = pot(g, lat)
    pred = {"e": e / counts, "f": f, "s": s.reshape(-1, 3, 3), "m": m.reshape(-1).abs()}
    loss = loss_fn(pred, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def max_diffs(outs: list[dict], ref: list[dict]) -> dict[str, float]:
    """Largest absolute differences ``{e (eV/atom), f (eV/Å), s (GPa), m (μB)}`` over structures."""
    d = {}
    for key in ("e", "f", "s", "m"):
        d[key] = max(float(np.max(np.abs(np.asarray(a[key], dtype=np.float64)
                                          - np.asarray(b[key], dtype=np.float64))))
                     for a, b in zip(outs, ref))
    return d


# ----------------------------------------------------------------------------------------------
# timing


class Interleaved:
    """Times the implementations of one case round by round: each call runs every implementation
    once, in the order of the previous round reversed (A B C, C B A, ...), appending each one's
    milliseconds to ``times``; the machine's load falls on all alike."""

    def __init__(self, fns: dict[str, Callable[[], Any]]) -> None:
        self.fns = fns
        self.order = list(fns)
        self.times: dict[str, list[float]] = {k: [] for k in fns}

    def __call__(self) -> None:
        for name in self.order:
            t0 = time.perf_counter()
            self.fns[name]()
            self.times[name].append((time.perf_counter() - t0) * 1e3)
        self.order.reverse()

    def reset(self) -> None:
        self.times = {k: [] for k in self.fns}

    def run(self, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
        for _ in range(warmup):
            self()
        self.reset()
        for _ in range(repeats):
            self()
        return self.times

    def summary(self) -> dict[str, Any]:
        """Medians, minima, all timings and the ratios ``peer / ours`` (> 1: fastchgnet faster):
        ``ratio`` against chgnet (the gate's ratio, as in every other case), ``ratio_matgl``, and
        ``peer_ratios`` = ``{"matgl": ratio_matgl}`` (gated as the case ``"<group> vs matgl"``),
        and the same ratios of the minima (``ratio_chgnet_min``, ``ratio_matgl_min``)."""
        med = {k: statistics.median(v) for k, v in self.times.items() if v}
        row: dict[str, Any] = {f"{k}_ms": m for k, m in med.items()}
        row.update({f"{k}_min_ms": min(v) for k, v in self.times.items() if v})
        row.update({f"{k}_ms_all": v for k, v in self.times.items()})
        row["repeats"] = len(next(iter(self.times.values())))
        ours = med.get("ours")
        for peer, key in (("chgnet", "ratio"), ("matgl", "ratio_matgl")):
            row[key] = med[peer] / ours if ours and peer in med else None
        row["peer_ratios"] = {"matgl": row["ratio_matgl"]}  # read by fastchgnet.bench.gate
        # minima: the least disturbed call of each, steadier than medians on a loaded machine
        lo = {k: min(v) for k, v in self.times.items() if v}
        for peer in ("chgnet", "matgl"):
            row[f"ratio_{peer}_min"] = lo[peer] / lo["ours"] if "ours" in lo and peer in lo else None
        return row


# ----------------------------------------------------------------------------------------------
# diagnosis of the port: matgl's smooth cutoff replaced by chgnet's, for the parity check only


class _EnvelopedBasis(torch.nn.Module):
    """A matgl radial basis times the polynomial envelope of d / cutoff (exponent p)."""

    def __init__(self, basis: torch.nn.Module, cutoff: float, p: int) -> None:
        super().__init__()
        self.basis, self.cutoff, self.p = basis, cutoff, p

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        x = (r / self.cutoff)[:, None]
        p = self.p
        env = (1 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x**(p + 1)
               - p * (p + 1) / 2 * x**(p + 2))
        return self.basis(r) * torch.where(x < 1, env, torch.zeros_like(x))


@contextlib.contextmanager
def chgnet_cutoff(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block, ``model`` (a ported matgl CHGNet) applies chgnet's smooth cutoff (the
    envelope of d / cutoff) instead of matgl's (the envelope of the basis values): used only to
    show that the port differs from chgnet by matgl's architecture, not by its weights."""
    import matgl.models._chgnet as mod

    saved = mod.polynomial_cutoff, model.bond_expansion, model.threebody_bond_expansion
    p = MATGL_030["cutoff_exponent"]
    mod.polynomial_cutoff = lambda r, cutoff, exponent=3: torch.ones_like(r)
    model.bond_expansion = _EnvelopedBasis(saved[1], model.cutoff, p)
    model.threebody_bond_expansion = _EnvelopedBasis(saved[2], model.three_body_cutoff, p)
    try:
        yield
    finally:
        mod.polynomial_cutoff, model.bond_expansion, model.threebody_bond_expansion = saved


class _UndirectedOut(torch.nn.Module):
    """matgl's line-graph ``node_out_func`` applied to the sum of the updates of a directed bond
    and of its reverse: both directions then carry chgnet's undirected bond feature."""

    def __init__(self, lin: torch.nn.Module) -> None:
        super().__init__()
        self.lin = lin
        self.rev: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x + x[self.rev])


def _reverse_bonds(g: Any, cutoff: float) -> torch.Tensor:
    """For each directed bond within ``cutoff`` (matgl's line-graph nodes, in edge order), the
    line-graph index of its reverse bond (same atoms swapped, opposite image)."""
    from matgl.graph._compute import compute_pair_vector_and_distance

    _, dist = compute_pair_vector_and_distance(g.pos, g.edge_index, g.pbc_offshift)
    ids = (dist <= cutoff).nonzero().reshape(-1).tolist()
    src, dst = g.edge_index.tolist()
    img = g.pbc_offset.round().long().tolist()
    where = {(src[e], dst[e], *img[e]): k for k, e in enumerate(ids)}
    return torch.tensor([where[(dst[e], src[e], *(-v for v in img[e]))] for e in ids])


@contextlib.contextmanager
def chgnet_bonds(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block, ``model`` (a ported matgl CHGNet) gives both directions of a bond the
    same feature, updated from the angles at both of its atoms, as chgnet's undirected bonds:
    used only to show where the port's outputs differ from chgnet's."""
    convs = [block.conv for block in model.bond_graph_layers]
    saved = [conv.node_out_func for conv in convs]
    outs = [_UndirectedOut(lin) for lin in saved]
    for conv, out in zip(convs, outs):
        conv.node_out_func = out
    inner = model.forward

    def forward(g: Any, *args: Any, **kwargs: Any) -> Any:
        rev = _reverse_bonds(g, model.three_body_cutoff)
        for out in outs:
            out.rev = rev
        return inner(g, *args, **kwargs)

    model.forward = forward
    try:
        yield
    finally:
        del model.forward
        for conv, lin in zip(convs, saved):
            conv.node_out_func = lin
