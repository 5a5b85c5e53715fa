"""Watching the queue: the Slurm backend, folding snapshots into the state database, and the
plain-column view of it that each tick plans from.
"""
