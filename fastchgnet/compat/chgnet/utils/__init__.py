"""chgnet's ``chgnet.utils`` names: the magmom-to-charge helper and the small common helpers."""

from __future__ import annotations

from fastchgnet.compat.chgnet.utils.common_utils import (
    AverageMeter,
    cuda_devices_sorted_by_free_mem,
    determine_device,
    mae,
    mkdir,
    read_json,
    write_json,
)
from fastchgnet.compat.chgnet.utils.vasp_utils import solve_charge_by_mag

__all__ = ["AverageMeter", "cuda_devices_sorted_by_free_mem", "determine_device", "mae", "mkdir",
           "read_json", "solve_charge_by_mag", "write_json"]
