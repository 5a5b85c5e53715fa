"""Talking to Slurm: pure parsers of its CLI output (parse.py), plain records (model.py),
node-list syntax (hostlist.py) and one thin executor (backend.py).

Import from the modules: this package imports nothing itself, so that ``hostlist`` (which the
commands a job runs need) does not bring in the executor and its asyncio.
"""
