"""A real local Slurm cluster on loopback, for the demo and the integration tests.

One implementation, used by ``scripts/devcluster`` and by the pytest fixtures: munge,
slurmctld and three ``slurmd -N`` instances, an S3 server (``rclone serve s3``), an OpenSSH
sshd, and unprivileged accounts, all under one base directory and stopped by pid.
Needs root to start (slurmd, sshd, useradd); nothing it runs listens beyond 127.0.0.1.
"""
