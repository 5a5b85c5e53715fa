"""The daemon's HTTP API (FastAPI): thin routes over the database and the daemon.

REST under /api/v1/, Prometheus text at /metrics, a dashboard page at /. ``routes/`` holds one
APIRouter per resource (jobs, warmups, nodes, trash, metrics and health, dashboard);
``service.py`` is everything the API may ask of the daemon (``StagingService``); ``deps.py``
the dependencies the routes share (the service, its database, the authenticated caller).
"""

from hpcstage.api.app import create_app

__all__ = ["create_app"]
