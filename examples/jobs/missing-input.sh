#!/bin/bash
# A job whose input does not exist: hpcstage reports the directive in `hpcstage status`, and
# the job stops at `hpcstage env` instead of running without its data.
#SBATCH --job-name=missing-input
#SBATCH --time=2
#HPCSTAGE --stage-in=s3://datasets/docking/no-such-receptor.pdb
eval "$(hpcstage env || echo exit 1)"
echo "this line must never run"
