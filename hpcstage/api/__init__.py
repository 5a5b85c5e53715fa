"""The daemon's HTTP API (FastAPI): thin routes over the database and the daemon.

REST under /api/v1/, Prometheus text at /metrics, a dashboard page at /.
"""

from hpcstage.api.app import create_app

__all__ = ["create_app"]
