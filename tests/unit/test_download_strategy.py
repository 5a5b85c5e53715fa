"""hpcstage.store.s3_download.choose_strategy: which of the four ways an S3 object is fetched."""

from __future__ import annotations

import pytest

from hpcstage.store.protocol import LEAN_MAX, MIB
from hpcstage.store.s3_download import Strategy, choose_strategy

THRESHOLD = 256 * MIB


@pytest.mark.parametrize(
    ("size", "threshold", "lean", "in_order", "expected"),
    [
        # Small objects: the lean GET where it is on, else one SDK GET.
        (0, THRESHOLD, True, True, Strategy.LEAN),
        (4096, THRESHOLD, True, True, Strategy.LEAN),
        (LEAN_MAX, THRESHOLD, True, False, Strategy.LEAN),
        (4096, THRESHOLD, False, True, Strategy.WHOLE),
        # Above LEAN_MAX and below the threshold: one SDK GET, whatever the checks.
        (LEAN_MAX + 1, THRESHOLD, True, False, Strategy.WHOLE),
        (LEAN_MAX + 1, THRESHOLD, True, True, Strategy.WHOLE),
        (THRESHOLD - 1, THRESHOLD, True, False, Strategy.WHOLE),
        # At or above the threshold: parts, checked as they arrive unless an MD5/SHA needs order.
        (THRESHOLD, THRESHOLD, True, False, Strategy.PARTS_CHECKED),
        (THRESHOLD, THRESHOLD, False, False, Strategy.PARTS_CHECKED),
        (THRESHOLD, THRESHOLD, True, True, Strategy.PARTS_READ_BACK),
        (10 * THRESHOLD, THRESHOLD, False, True, Strategy.PARTS_READ_BACK),
        # A threshold below LEAN_MAX: small objects at or above it go in parts, not lean.
        (LEAN_MAX, 5 * MIB // 8, True, True, Strategy.PARTS_READ_BACK),
        (LEAN_MAX - 1, LEAN_MAX, True, True, Strategy.LEAN),
    ],
)
def test_choose_strategy(
    size: int, threshold: int, lean: bool, in_order: bool, expected: Strategy
) -> None:
    assert choose_strategy(size, threshold=threshold, lean=lean, in_order=in_order) is expected
