"""Drop-in compatibility layers for other packages' APIs, run on fastchgnet's models.

:mod:`fastchgnet.compat.chgnet` mirrors the public inference API of ``chgnet`` 0.4.2 (module paths,
names, arguments, defaults and return values), so that a script written for chgnet runs on
fastchgnet when its import lines change from ``chgnet`` to ``fastchgnet.compat.chgnet`` and nothing
else. See docs/from_chgnet.md. ``chgnet`` itself is never imported here.
"""
