#!/usr/bin/env python3
"""How much of a packed dataset a subtree selection reads (issue 17: a 10^7-row manifest,
selecting a 1% subtree must read <= 2% of the dataset's bytes).

Builds the manifest of a dataset of ``--files`` files of ``--size`` bytes (paths
``setNNN/subNNN/NNNNNN.sdf``, 100 top-level directories, so one of them is 1%), packed into
segments of ``--segment-size`` in path order as ``hpcstage pack`` writes them, with the real
schema, writer settings and row-group size. Then selects one top-level directory through
``RangeFile`` (what the node does over S3) and counts:

- manifest bytes fetched (footer + the row groups that meet the subtree, 1 MiB read blocks);
- segment bytes fetched: the ranged GETs ``core.packed.spans`` plans for the selected members;
- the dataset's bytes: segments (headers and padding included) + manifest.

No store is involved: the counts are what the GETs would ask for. Timing is printed but is not
the point (the machine need not be idle).

    .venv/bin/python benchmarks/packed_select.py                  # 10^7 files of 4 KiB
    .venv/bin/python benchmarks/packed_select.py --files 1000000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hpcstage.core.packed import BLOCK, DEFAULT_ROW_GROUP, DEFAULT_SEGMENT_SIZE, padded, spans
from hpcstage.packed.manifest import SCHEMA, ManifestReader, RangeFile


def build(path: Path, files: int, size: int, segment_size: int) -> tuple[int, int]:
    """Write the manifest; (segment bytes in all, segments)."""
    per_dir = files // 100
    member = BLOCK + padded(size)  # one ustar header (short paths) + the padded bytes
    per_segment = max(1, segment_size // member)
    writer = pq.ParquetWriter(str(path), SCHEMA, compression="zstd", write_statistics=["path"])
    done = 0
    while done < files:
        n = min(DEFAULT_ROW_GROUP, files - done)
        idx = range(done, done + n)
        paths = [f"set{i // per_dir:03d}/sub{(i % per_dir) // 1000:03d}/{i:08d}.sdf" for i in idx]
        seg = [i // per_segment for i in idx]
        table = pa.Table.from_arrays(
            [
                pa.array(paths, pa.string()),
                pa.array([size] * n, pa.int64()),
                pa.array([0o644] * n, pa.int32()),
                pa.array([1_700_000_000_000_000_000] * n, pa.int64()),
                pa.array([f"00000001-00000-{s:06d}.tar" for s in seg]).dictionary_encode(),
                pa.array([(i % per_segment) * member + BLOCK for i in idx], pa.int64()),
                pa.array([(i * 2654435761) % 2**32 for i in idx], pa.uint32()),
                pa.array([""] * n, pa.string()),
            ],
            schema=SCHEMA,
        )
        writer.write_table(table, row_group_size=DEFAULT_ROW_GROUP)
        done += n
    writer.close()
    segments = -(-files // per_segment)
    return files * member + segments * 2 * BLOCK, segments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000_000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--segment-size", type=int, default=DEFAULT_SEGMENT_SIZE)
    parser.add_argument("--subtree", default="set042/")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.parquet"
        start = time.monotonic()
        segment_bytes, segments = build(path, args.files, args.size, args.segment_size)
        built = time.monotonic() - start
        data = path.read_bytes()
        source = RangeFile(len(data), lambda s, n: data[s : s + n])
        start = time.monotonic()
        reader = ManifestReader(source, str(path))
        groups = reader.row_groups_for(args.subtree)
        by_segment: dict[str, list[tuple[int, int]]] = defaultdict(list)
        selected = 0
        for batch in reader.select(args.subtree):
            for m in batch:
                by_segment[m.segment].append((m.offset, m.size))
                selected += 1
        fetched = sum(s.size for ranges in by_segment.values() for s in spans(ranges))
        took = time.monotonic() - start
    total = segment_bytes + len(data)
    read = source.fetched + fetched
    print(f"dataset: {args.files:,} files of {args.size} B in {segments:,} segments")
    print(f"  manifest {len(data) / 2**20:,.1f} MiB, {reader.rows:,} rows, built in {built:.1f} s")
    print(f"  dataset bytes (segments + manifest): {total / 2**30:,.2f} GiB")
    print(f"selection {args.subtree}: {selected:,} files ({selected / args.files:.2%})")
    print(f"  row groups read: {len(groups)} of {-(-args.files // DEFAULT_ROW_GROUP)}")
    print(f"  manifest bytes fetched: {source.fetched / 2**20:,.2f} MiB")
    print(f"  segment bytes fetched: {fetched / 2**20:,.1f} MiB in {len(by_segment)} segments")
    print(f"  read {read / 2**20:,.1f} MiB = {read / total:.3%} of the dataset's bytes")
    print(f"  selection took {took:.2f} s")


if __name__ == "__main__":
    main()
