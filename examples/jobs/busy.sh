#!/bin/bash
# Keeps a node busy for a while, so the staged jobs have to wait for allocation (as on a real,
# full cluster) and hpcstage can stage their inputs onto the planned nodes ahead of time.
#SBATCH --job-name=busy
#SBATCH --time=1
sleep "${BUSY_SECONDS:-20}"
