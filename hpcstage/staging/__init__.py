"""The daemon's side of staging: the pool of agent sessions and the actions it runs on them
(stage-in, stage-out, peer copy, release), and the recycle bin's listing and restore.

Never imported by ``hpcstage.agent`` (the node side): the two meet only in ``hpcstage.protocol``.
"""
