"""The pure core: directives, the plan and its rules, policy, quotas, stage-out rules, sizes.

Standard library only (checked by import-linter in CI): everything here is a function of its
arguments, tested with tables, and safe to import from ``hpcstage env`` inside every job.
"""
