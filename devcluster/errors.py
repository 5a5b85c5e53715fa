"""The dev cluster's one error, kept out of the shipped package (``hpcstage/errors.py``).

It is an ``HpcstageError`` so the dev cluster's commands report it as one clear line, the same
way they report hpcstage's own errors.
"""

from __future__ import annotations

from hpcstage.errors import HpcstageError


class ClusterError(HpcstageError):
    """The local development cluster could not be started, stopped or reached."""
