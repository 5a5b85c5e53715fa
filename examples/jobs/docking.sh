#!/bin/bash
# A docking job: scores every ligand of the campaign against one receptor.
# Its inputs are staged onto the node's local SSD by hpcstage before Slurm starts it; the
# ligand library is a packed dataset (made with `hpcstage pack`, docs/packed-datasets.md).
#SBATCH --job-name=dock-chem
#SBATCH --time=2
#HPCSTAGE --stage-in=s3://datasets/docking/ligands.hpack/:ligands
#HPCSTAGE --stage-in=s3://datasets/docking/receptor.pdb:inputs/receptor.pdb
#HPCSTAGE --stage-out=results:s3://results/docking/%u/%j/
set -euo pipefail
t0=$(date +%s.%N)
eval "$(hpcstage env || echo exit 1)"          # waits until the inputs are on this node; fails the job if not
t1=$(date +%s.%N)
echo "hpcstage: node=$SLURMD_NODENAME dir=$HPCSTAGE_DIR waited=$(awk "BEGIN{printf \"%.2f\", $t1-$t0}")s"

cd "$HPCSTAGE_DIR"
# A packed input is one shared read-only tree on the node, linked in as ligands -> ...:
# name it with a final '/' (or use find -L) so that find and du walk into it.
n=$(find ligands/ -type f | wc -l)
echo "ligands: $n files, receptor: $(stat -c %s inputs/receptor.pdb) bytes"
# Checksums of every input, for whoever wants to verify what the job saw.
find -L . -type f -print0 | sort -z | xargs -0 sha256sum > "$SLURM_SUBMIT_DIR/inputs-$SLURM_JOB_ID.sha256"
# "Docking": a stand-in score per ligand, written under results/ (staged out after the job).
mkdir -p results
for f in $(find ligands/ -type f | sort); do
  echo "$(basename "$f" .sdf) $(cksum < "$f" | cut -c1-4)"
done > results/scores.txt
sort -k2 -n results/scores.txt | sed -n 1,3p > results/best.txt  # (head would SIGPIPE sort under pipefail)
echo "best ligands:"; cat results/best.txt
sleep 2
