"""chgnet's ``chgnet.graph`` names: ``CrystalGraphConverter`` builds fastchgnet ``CrystalGraph``s,
which :meth:`fastchgnet.compat.chgnet.model.CHGNet.predict_graph` takes."""

from __future__ import annotations

from fastchgnet.compat.chgnet.graph.converter import CrystalGraphConverter
from fastchgnet.data.graph import CrystalGraph

__all__ = ["CrystalGraph", "CrystalGraphConverter"]
