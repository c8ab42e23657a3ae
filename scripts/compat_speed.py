"""chgnet vs fastchgnet.compat.chgnet, the same calls with one import changed, interleaved in one process (CPU, 1 thread)."""
import time, statistics, warnings, sys
import torch
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
from pymatgen.core import Structure
import chgnet.model as C
import fastchgnet.compat.chgnet.model as F
from chgnet.model.dynamics import MolecularDynamics as CMD
from fastchgnet.compat.chgnet.model.dynamics import MolecularDynamics as FMD
import contextlib, io
res = {}
for name in ("mp-18767-LiMnO2", "mp-1175469-Li9Co7O16"):
    s = Structure.from_file(f"../shared/data/structures/{name}.cif")
    with contextlib.redirect_stdout(io.StringIO()):
        cm, fm = C.CHGNet.load(), F.CHGNet.load()
    calls = {"chgnet": lambda: cm.predict_structure(s), "compat": lambda: fm.predict_structure(s)}
    times = {k: [] for k in calls}
    for k in calls: calls[k]()
    for _ in range(10):
        for k, f in calls.items():
            t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"predict_structure {name}: chgnet {med['chgnet']*1e3:.1f} ms, compat {med['compat']*1e3:.1f} ms, ratio {med['chgnet']/med['compat']:.2f}x")
    with contextlib.redirect_stdout(io.StringIO()):
        mds = {"chgnet": CMD(atoms=s, model=cm, ensemble="nvt", timestep=2, temperature=300, trajectory=None, logfile=None, loginterval=1000),
               "compat": FMD(atoms=s, model=fm, ensemble="nvt", timestep=2, temperature=300, trajectory=None, logfile=None, loginterval=1000)}
    times = {k: [] for k in mds}
    with contextlib.redirect_stdout(io.StringIO()):
        for k, md in mds.items(): md.run(2)
        for _ in range(5):
            for k, md in mds.items():
                t = time.perf_counter(); md.run(5); times[k].append((time.perf_counter() - t) / 5)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"MD step (NVT Berendsen, 2 fs) {name}: chgnet {med['chgnet']*1e3:.1f} ms, compat {med['compat']*1e3:.1f} ms, ratio {med['chgnet']/med['compat']:.2f}x")
