"""The node side: the agent a daemon starts on every compute node over SSH, which fills the
node cache, builds job views, uploads outputs and serves its peers.

Never imports the daemon's side (``hpcstage.staging``, ``hpcstage.service``).
"""
