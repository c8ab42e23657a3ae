"""The CHGNet model: a backbone with an interaction block, plus an output stage.

:class:`CHGNet` assembles a :class:`~fastchgnet.model.backbone.Backbone` (embeddings, ``n_conv``
interaction blocks of a chosen kind, readout) and an output stage
(:mod:`fastchgnet.model.outputs`: forces and stress by autograd, or from heads), adds the AtomRef
composition energy and returns chgnet's output keys (:mod:`fastchgnet.keys`). With the defaults
it is the ``exact`` model: the mathematics of CHGNet 0.3.0 on batched graphs, forces and stress
from one gradient with respect to the bond vectors. The FastCHGNet variants are the same class
with another block and output stage (:mod:`fastchgnet.model.decoupled`,
:mod:`fastchgnet.model.heads`).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from fastchgnet import keys
from fastchgnet.data.batch import Batch
from fastchgnet.keys import VALID_TASKS, check_task
from fastchgnet.model.backbone import Backbone, Features
from fastchgnet.model.blocks import BLOCKS, Block
from fastchgnet.model.config import CHGNetConfig
from fastchgnet.model.outputs import AutogradForceStress, cell_volume
from fastchgnet.model.predict import predict
from fastchgnet.nn.linear import plain_products
from fastchgnet.nn.scatter import segment_sum
from fastchgnet.units import EV_A3_TO_GPA

# names older code imported from here
__all__ = ["CHGNet", "EV_A3_TO_GPA", "VALID_TASKS", "cell_volume", "check_task"]


class CHGNet(Backbone):
    """CHGNet (``model_type = "exact"``): backbone + output stage.

    Build with a :class:`CHGNetConfig` (or keyword overrides of it); load published weights with
    :func:`fastchgnet.load_model`. ``block`` (a name in :data:`~fastchgnet.model.blocks.BLOCKS` or
    a block function) and ``output`` (an output stage) default to CHGNet's serial block and
    autograd forces/stress.
    """

    model_type = "exact"

    def __init__(self, config: CHGNetConfig | None = None, *, block: str | Block = "exact",
                 output: Any = None, **overrides: Any) -> None:
        config = CHGNetConfig.with_overrides(config, **overrides)
        super().__init__(config, BLOCKS[block] if isinstance(block, str) else block)
        self.version: str | None = None
        # AtomRef: per-element reference energy (eV/atom); fixed, fitted outside the network
        self.atom_ref = (nn.Parameter(torch.zeros(config.max_num_elements), requires_grad=False)
                         if config.composition_model is not None else None)
        self.output = AutogradForceStress() if output is None else output
        # the stage's modules under their own names, after the backbone's: state_dict keys and
        # parameter order (which optimizer states index) are those of earlier versions
        for name, module in self.output.modules().items():
            self.add_module(name, module)

    @property
    def forces_by_autograd(self) -> bool:
        """Whether forces and stress are derivatives of the energy (training them then needs
        second-order gradients)."""
        return self.output.needs_energy_gradient

    def forward(
        self,
        batch: Batch,
        task: str = "e",
        *,
        create_graph: bool | None = None,
        return_site_energies: bool = False,
        return_crystal_feas: bool = False,
        return_atom_feas: bool = False,
    ) -> dict[str, Tensor]:
        """Predict for a batch.

        Returns a dict of batch tensors keyed as in :mod:`fastchgnet.keys`: ``e`` (n_graphs,)
        eV/atom, ``f`` (n_atoms, 3) eV/Å, ``s`` (n_graphs, 3, 3) GPa, ``m`` (n_atoms,) μB, and on
        request ``site_energies`` (n_atoms,) eV, ``crystal_fea`` (n_graphs, atom_fea_dim),
        ``atom_fea`` (n_atoms, atom_fea_dim).

        ``create_graph`` (default: ``self.training``) keeps the graph of the force/stress gradient so
        a loss on them can be back-propagated (second-order derivatives).
        """
        check_task(task)
        want_f, want_s, want_m = "f" in task, "s" in task, "m" in task
        if create_graph is None:
            create_graph = self.training
        by_grad = self.output.needs_energy_gradient and (want_f or want_s)
        if by_grad and create_graph and torch.compiler.is_compiling() \
                and isinstance(self.output, AutogradForceStress):
            feats, terms = self._traced_gradient(batch, want_f, want_s, want_m, return_atom_feas)
        else:
            with torch.enable_grad() if by_grad else nullcontext():
                vec = self.bond_vectors(batch)
                if by_grad and not vec.requires_grad:
                    vec.requires_grad_(True)
                feats = self.features(batch, vec, want_m=want_m, want_atom_fea=return_atom_feas,
                                      compiled=not (by_grad and create_graph))
                terms = self.output(batch, vec, feats, want_f, want_s, create_graph)

        out: dict[str, Tensor] = {}
        energy, site = terms.energy, terms.site
        n_atoms = batch.n_atoms.to(energy.dtype)
        if self.atom_ref is not None:
            ref = self.atom_ref.index_select(0, batch.atomic_numbers - 1)
            energy = energy + segment_sum(ref, batch.atom_graph, batch.num_graphs)
            site = site + ref
        out[keys.ENERGY] = energy / n_atoms if self.config.is_intensive else energy
        if terms.forces is not None:
            out[keys.FORCES] = terms.forces
        if terms.stress is not None:
            out[keys.STRESS] = terms.stress
        if feats.magmom is not None:
            out[keys.MAGMOMS] = feats.magmom
        if return_site_energies:
            out[keys.SITE_ENERGIES] = site
        if return_crystal_feas:
            out[keys.CRYSTAL_FEA] = segment_sum(feats.atom, batch.atom_graph, batch.num_graphs)
        if feats.atom_fea is not None:
            out[keys.ATOM_FEA] = feats.atom_fea
        return out

    def _traced_gradient(self, batch: Batch, want_f: bool, want_s: bool, want_m: bool,
                         want_atom_fea: bool) -> tuple[Features, Any]:
        """Forces and stress of a compiled pass whose outputs are differentiated again (a
        training step): the energy gradient by ``torch.func.grad``, which Dynamo traces into the
        graph, so the graph holds the whole first-order computation and AOTAutograd
        differentiates it once (``autograd.grad(create_graph=True)`` would break the graph, and a
        compiled backward cannot itself be differentiated)."""
        vec = self.bond_vectors(batch)

        def energy(v: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            f = self.features(batch, v, want_m=want_m, want_atom_fea=want_atom_fea,
                              compiled=False)
            # the transform's auxiliary outputs must be tensors: the fields that are set
            return f.energy.sum(), {k: t for k, t in vars(f).items() if t is not None}

        with plain_products():  # torch.func transforms take neither oneDNN path
            g, aux = torch.func.grad(energy, has_aux=True)(vec)
        feats = Features(**aux)
        return feats, AutogradForceStress.terms(batch, vec, feats, g, want_f, want_s)

    def predict(self, structures: Any, task: str = "efsm", batch_size: int = 16, **kwargs: Any):
        """Predict for one structure or a list (pymatgen or ASE); see :func:`fastchgnet.predict`."""
        return predict(self, structures, task=task, batch_size=batch_size, **kwargs)
