"""hpcstage: Slurm-integrated data staging and node-local cache for HPC sites."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hpcstage")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
