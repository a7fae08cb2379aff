"""Reprocess from files: a CXI / NXcxi_ptycho file through the live engine, into Tiled.

from hxn_liveptycho.reprocess import reconstruct_file
report = reconstruct_file("scan.cxi", overrides={"recon": {"iterations": 200}})

``liveptycho reconstruct scan.cxi`` does the same from the command line
(docs/reprocess.md says which conventions are read, detected or asked for).
"""

from hxn_liveptycho.reprocess.conventions import ConventionError, FileConventions, FileError
from hxn_liveptycho.reprocess.cxi_file import CxiScan, read_cxi
from hxn_liveptycho.reprocess.run import ReprocessReport, reconstruct_file

__all__ = [
    "ConventionError",
    "CxiScan",
    "FileConventions",
    "FileError",
    "ReprocessReport",
    "read_cxi",
    "reconstruct_file",
]
