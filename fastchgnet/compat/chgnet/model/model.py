"""chgnet's ``chgnet.model.model.CHGNet`` as fastchgnet's exact model.

:class:`CHGNet` *is* a fastchgnet exact model (a subclass of :class:`fastchgnet.model.CHGNet`),
with chgnet's loaders (``load``, ``from_file``, ``from_dict``), chgnet's prediction methods
(``predict_structure``, ``predict_graph``, returning chgnet's keys and units) and chgnet's
attributes (``version``, ``n_params``, ``graph_converter``, ``is_intensive``). Every fastchgnet
function that takes a model takes it too (``fastchgnet.predict``, the ASE calculator, the batched
simulators, the compiled forward...).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, get_args

import torch

from fastchgnet.compat.chgnet import PredTask
from fastchgnet.compat.chgnet.graph.converter import CrystalGraphConverter
from fastchgnet.compat.chgnet.utils.common_utils import determine_device
from fastchgnet.data.graph import CrystalGraph
from fastchgnet.model.config import CHGNetConfig
from fastchgnet.model.exact import CHGNet as ExactCHGNet
from fastchgnet.model.predict import predict
from fastchgnet.model.weights import (PRETRAINED, from_chgnet_model, from_chgnet_state_dict,
                                      is_chgnet_model, load_model)

__all__ = ["CHGNet", "PredTask"]

#: keyword arguments of chgnet's ``CHGNet(...)`` (its signature and the extras it reads)
CHGNET_MODEL_ARGS = frozenset({
    "atom_fea_dim", "bond_fea_dim", "angle_fea_dim", "composition_model", "num_radial",
    "num_angular", "n_conv", "atom_conv_hidden_dim", "update_bond", "bond_conv_hidden_dim",
    "update_angle", "angle_layer_hidden_dim", "conv_dropout", "read_out", "mlp_hidden_dims",
    "mlp_dropout", "mlp_first", "is_intensive", "non_linearity", "atom_graph_cutoff",
    "bond_graph_cutoff", "graph_converter_algorithm", "cutoff_coeff", "learnable_rbf",
    "gMLP_norm", "readout_norm", "version", "converter_verbose", "conv_norm", "mlp_out_bias",
    "num_heads", "final_mlp",
})


class CHGNet(ExactCHGNet):
    """chgnet's ``CHGNet``: a fastchgnet exact model with chgnet's methods.

    ``CHGNet(**model_args)`` builds an untrained model from chgnet's hyper-parameter names (as
    ``chgnet.model.CHGNet(...)``; the AtomRef starts at zero: load weights with :meth:`load`,
    :meth:`from_file` or :meth:`from_dict`). ``CHGNet(config)`` takes a
    :class:`~fastchgnet.model.CHGNetConfig`.
    """

    def __init__(self, config: CHGNetConfig | None = None, **model_args: Any) -> None:
        if config is not None and model_args:
            raise TypeError("pass either a CHGNetConfig or chgnet's keyword arguments, not both")
        if config is None:
            unknown = sorted(set(model_args) - CHGNET_MODEL_ARGS)
            if unknown:
                raise TypeError(f"CHGNet() got unexpected keyword argument(s) {unknown}")
            version = model_args.get("version")
            config = CHGNetConfig.from_chgnet_args(model_args)
        else:
            version = None
        super().__init__(config)
        self.version = version
        self.graph_converter = CrystalGraphConverter(
            atom_graph_cutoff=config.atom_graph_cutoff, bond_graph_cutoff=config.bond_graph_cutoff,
            on_isolated_atoms="error")

    # ------------------------------------------------------------------------------------------
    # loading

    @classmethod
    def adopt(cls, net: torch.nn.Module) -> "CHGNet":
        """This class's copy of an exact fastchgnet model, or of a ``chgnet`` ``CHGNet`` object
        (same weights, dtype, device and version)."""
        if isinstance(net, cls):
            return net
        if is_chgnet_model(net):
            device = next(net.parameters()).device
            net = from_chgnet_model(net).to(device)
        if getattr(net, "model_type", None) != "exact":
            raise ValueError(
                f"fastchgnet.compat.chgnet.CHGNet holds exact models; this one is "
                f"{getattr(net, 'model_type', type(net).__name__)!r}: use it through fastchgnet's "
                f"own API (fastchgnet.load_model, fastchgnet.CHGNetCalculator)")
        p = next(net.parameters())
        new = cls(net.config).to(dtype=p.dtype)
        new.load_state_dict(net.state_dict())
        new.version = getattr(net, "version", None)
        return new.to(p.device).eval()

    @classmethod
    def load(cls, model_name: str = "0.3.0", *, use_device: str | None = None,
             check_cuda_mem: bool = False, verbose: bool = True) -> "CHGNet":
        """A pretrained model: ``"0.3.0"`` (default), ``"0.2.0"`` or ``"r2scan"`` (the weight files
        of the installed ``chgnet`` package), on ``use_device`` (chgnet's choice when None: see
        :func:`~fastchgnet.compat.chgnet.utils.determine_device`)."""
        if model_name not in PRETRAINED:
            raise ValueError(f"Unknown {model_name=}")
        device = determine_device(use_device=use_device, check_cuda_mem=check_cuda_mem)
        model = cls.adopt(load_model(model_name)).to(device)
        if verbose:
            print(f"CHGNet will run on {device}")
        return model

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, trust_checkpoint: bool = False) -> "CHGNet":
        """A model from a chgnet checkpoint (``.pth.tar``, as chgnet's trainer writes) or a
        fastchgnet checkpoint of an exact model. ``trust_checkpoint``: allow a full unpickle
        (chgnet's trainer may store Python objects; only for files you trust)."""
        return cls.adopt(load_model(path, trust_checkpoint=trust_checkpoint))

    @classmethod
    def from_dict(cls, dct: dict, **kwargs: Any) -> "CHGNet":
        """A model from chgnet's ``{"state_dict", "model_args"}`` dict (``kwargs`` override
        model arguments, as in chgnet)."""
        unknown = sorted(set(kwargs) - CHGNET_MODEL_ARGS)
        if unknown:
            raise TypeError(f"CHGNet.from_dict() got unexpected keyword argument(s) {unknown}")
        args = {**dct["model_args"], **kwargs}
        net = from_chgnet_state_dict(dct["state_dict"], args)
        net.version = args.get("version")
        return cls.adopt(net)

    # ------------------------------------------------------------------------------------------
    # attributes

    @property
    def is_intensive(self) -> bool:
        return self.config.is_intensive

    # ------------------------------------------------------------------------------------------
    # prediction

    def predict_structure(self, structure: Any, *, task: PredTask = "efsm",
                          return_site_energies: bool = False, return_atom_feas: bool = False,
                          return_crystal_feas: bool = False,
                          batch_size: int = 16) -> dict[str, Any] | list[dict[str, Any]]:
        """Predict for a pymatgen ``Structure`` (or ASE ``Atoms``) or a list of them.

        Returns chgnet's dict of numpy arrays: ``e`` eV/atom, ``f`` (n, 3) eV/Å, ``s`` (3, 3) GPa,
        ``m`` (n,) μB, and on request ``site_energies``, ``atom_fea``, ``crystal_fea``. As in
        chgnet, a list of one structure gives a dict, not a list.
        """
        single = not isinstance(structure, (list, tuple))
        structures = [structure] if single else list(structure)
        graphs = [self.graph_converter(s) for s in structures]
        return self.predict_graph(graphs, task=task, return_site_energies=return_site_energies,
                                  return_atom_feas=return_atom_feas,
                                  return_crystal_feas=return_crystal_feas, batch_size=batch_size)

    def predict_graph(self, graph: Any, *, task: PredTask = "efsm",
                      return_site_energies: bool = False, return_atom_feas: bool = False,
                      return_crystal_feas: bool = False,
                      batch_size: int = 16) -> dict[str, Any] | list[dict[str, Any]]:
        """Predict for crystal graphs: fastchgnet ``CrystalGraph``s (from
        :attr:`graph_converter`) or chgnet ``CrystalGraph`` objects (rebuilt here from their
        lattice, fractional coordinates and atomic numbers). Returns as :meth:`predict_structure`.
        """
        if not isinstance(graph, (CrystalGraph, Sequence)) and not _is_chgnet_graph(graph):
            raise TypeError(f"{type(graph)=} must be CrystalGraph or list of CrystalGraphs")
        valid = get_args(PredTask)
        if task not in valid:
            raise ValueError(f"Invalid {task=}. Must be one of {valid}.")
        graphs = [graph] if not isinstance(graph, Sequence) else list(graph)
        graphs = [self._own_graph(g) for g in graphs]
        out = predict(self, graphs, task=task, batch_size=batch_size,
                      return_site_energies=return_site_energies,
                      return_crystal_feas=return_crystal_feas, return_atom_feas=return_atom_feas)
        return out[0] if len(graphs) == 1 else out

    def _own_graph(self, graph: Any) -> CrystalGraph:
        if isinstance(graph, CrystalGraph):
            return graph
        if _is_chgnet_graph(graph):
            from pymatgen.core import Lattice, Structure

            structure = Structure(Lattice(graph.lattice.detach().cpu().double().numpy()),
                                  graph.atomic_number.detach().cpu().tolist(),
                                  graph.atom_frac_coord.detach().cpu().double().numpy())
            return self.graph_converter(structure, graph_id=getattr(graph, "graph_id", None))
        raise TypeError(f"expected a CrystalGraph, got {type(graph).__name__}")


def _is_chgnet_graph(obj: Any) -> bool:
    return all(hasattr(obj, a) for a in ("atomic_number", "atom_frac_coord", "lattice"))
