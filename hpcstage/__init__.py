"""hpcstage: Slurm-integrated data staging and node-local cache for HPC sites."""

from typing import Any

__all__ = ["__version__"]


def __getattr__(name: str) -> Any:
    # Looked up on first use: importing importlib.metadata would add to the start-up of every
    # command (`hpcstage env` runs in every job; start-up times: docs/benchmarks.md) while
    # only --version, the API and benchmarks ask.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("hpcstage")
        except PackageNotFoundError:  # running from a source tree without installation
            found = "0.0.0+unknown"
        globals()["__version__"] = found
        return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
