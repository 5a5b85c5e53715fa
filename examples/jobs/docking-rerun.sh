#!/bin/bash
# The same campaign's data used by a second job: on a node that already holds it, hpcstage
# attaches the packed library's tree at once (no new requests to the object store, no file
# touched, whatever the number of files).
#SBATCH --job-name=dock-rerun
#SBATCH --time=2
#HPCSTAGE --stage-in=s3://datasets/docking/ligands.hpack/:ligands
set -euo pipefail
t0=$(date +%s.%N)
eval "$(hpcstage env || echo exit 1)"
t1=$(date +%s.%N)
echo "hpcstage: node=$SLURMD_NODENAME dir=$HPCSTAGE_DIR waited=$(awk "BEGIN{printf \"%.2f\", $t1-$t0}")s"
echo "ligands: $(find "$HPCSTAGE_DIR/ligands/" -type f | wc -l) files"
