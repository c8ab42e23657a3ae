"""Model configuration: CHGNet's hyper-parameters in one dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


STRESS_HEADS = ("lattice", "virial")
FORCE_HEADS = ("direct", "pair", "pair+direct")


@dataclass
class CHGNetConfig:
    """Hyper-parameters of a CHGNet-class model. Defaults are those of CHGNet 0.3.0.

    Names follow the reference ``chgnet.model.CHGNet`` arguments so that its ``model_args`` map
    one to one (see :meth:`from_chgnet_args`).
    """

    atom_fea_dim: int = 64
    bond_fea_dim: int = 64
    angle_fea_dim: int = 64
    num_radial: int = 31
    num_angular: int = 31
    n_conv: int = 4
    atom_conv_hidden_dim: int = 64
    bond_conv_hidden_dim: int = 64
    angle_layer_hidden_dim: int = 0
    update_bond: bool = True
    update_angle: bool = True
    mlp_hidden_dims: tuple[int, ...] = (64, 64, 64)
    atom_graph_cutoff: float = 6.0
    bond_graph_cutoff: float = 3.0
    cutoff_coeff: int = 8
    learnable_rbf: bool = True
    gMLP_norm: str | None = "layer"  # noqa: N815 (reference name)
    readout_norm: str | None = "layer"
    is_intensive: bool = True
    composition_model: str | None = "MPtrj"  # AtomRef present (weights come from a checkpoint)
    mlp_out_bias: bool = False
    max_num_elements: int = 94
    # output heads of the ``heads`` model (ignored by ``exact`` and ``decoupled``)
    head_hidden_dim: int = 64
    # "virial" (learnt pair virial; default: 1.4-1.9x lower stress MAE than "lattice" on mlearn
    # Si and Mo, see docs/models.md) or "lattice" (FastCHGNet Eq. 9)
    stress_head: str = "virial"
    remove_net_force: bool = True  # subtract each structure's mean direct force
    # "direct" (FastCHGNet Eq. 7), "pair" (forces of a learnt pair energy that is part of the
    # energy, see model/heads.py) or "pair+direct" (their sum)
    force_head: str = "direct"
    pair_energy_basis: int = 8  # sine functions of the pair energy
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mlp_hidden_dims = _as_tuple(self.mlp_hidden_dims)
        for name in ("atom_conv_hidden_dim", "bond_conv_hidden_dim", "angle_layer_hidden_dim"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)):
                if len(v) != 1:
                    raise NotImplementedError(f"{name}={v!r}: only one hidden layer is supported")
                setattr(self, name, int(v[0]))
        if self.n_conv < 1:
            raise ValueError(f"n_conv must be >= 1, got {self.n_conv}")
        if self.num_angular % 2 != 1:
            raise ValueError(f"num_angular must be odd, got {self.num_angular}")
        if self.stress_head not in STRESS_HEADS:
            raise ValueError(f"stress_head={self.stress_head!r}: use one of {STRESS_HEADS}")
        if self.force_head not in FORCE_HEADS:
            raise ValueError(f"force_head={self.force_head!r}: use one of {FORCE_HEADS}")
        if self.pair_energy_basis < 1:
            raise ValueError(f"pair_energy_basis must be >= 1, got {self.pair_energy_basis}")
        if self.head_hidden_dim < 1:
            raise ValueError(f"head_hidden_dim must be >= 1, got {self.head_hidden_dim}")
        for name in ("gMLP_norm", "readout_norm"):
            v = getattr(self, name)
            if v not in (None, "layer"):
                raise NotImplementedError(f"{name}={v!r}: only 'layer' or None is supported")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mlp_hidden_dims"] = list(self.mlp_hidden_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CHGNetConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def with_overrides(cls, config: "CHGNetConfig | None", **overrides: Any) -> "CHGNetConfig":
        """``config`` (default: the defaults) with some fields replaced."""
        if config is None:
            return cls(**overrides)
        return cls.from_dict({**config.to_dict(), **overrides}) if overrides else config

    @classmethod
    def from_chgnet_args(cls, args: dict[str, Any]) -> "CHGNetConfig":
        """Build from the ``model_args`` of a reference CHGNet checkpoint.

        Options the reference offers but this model does not implement raise NotImplementedError.
        """
        args = dict(args)
        unsupported = {
            "non_linearity": "silu",
            "mlp_first": True,
            "conv_norm": None,
            "final_mlp": "MLP",
        }
        for k, ok in unsupported.items():
            if k in args and args[k] != ok:
                raise NotImplementedError(f"reference option {k}={args[k]!r} is not supported")
        comp = args.get("composition_model", "MPtrj")
        if comp is not None and not isinstance(comp, str):
            raise NotImplementedError("only an AtomRef composition model is supported")
        names = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in args.items() if k in names}
        ignored = {"read_out", "mlp_dropout", "conv_dropout", "graph_converter_algorithm",
                   "version", "non_linearity", "mlp_first", "conv_norm", "final_mlp"}
        extra = {k: v for k, v in args.items() if k not in names and k in ignored}
        return cls(**kwargs, extra=extra)


def _as_tuple(v: Any) -> tuple[int, ...]:
    if v is None or v == 0:
        return ()
    if isinstance(v, int):
        return (v,)
    return tuple(int(x) for x in v)
