"""Per-job and per-user limits (issue 15, item 8): pure decisions, and the agent's bounded
listing and the uploader's bounded walk that apply them as they go."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from hpcstage.agent.stagein import _limited, _taken
from hpcstage.config.load import parse_config
from hpcstage.config.schema import LimitSettings
from hpcstage.core import limits
from hpcstage.core.directives import SourceKind
from hpcstage.core.filters import KeyFilter
from hpcstage.core.identity import ObjectRef
from hpcstage.errors import HpcstageError, LimitError
from hpcstage.protocol.messages import SourceSpec, StageItem

MINIMAL = '[site]\nname = "t"\n[store]\nendpoint_url = "https://s3.example.org"\n'


def test_limits_have_bounded_defaults_and_zero_means_none() -> None:
    s = parse_config(MINIMAL).limits
    assert 0 < s.stage_in_objects <= 10**7 and 0 < s.stage_out_files <= 10**7
    assert s.stage_out_bytes > 0 and s.warmups_in_flight > 0 and s.warmups_per_minute > 0
    assert limits.stage_in_budget(LimitSettings(stage_in_objects=0), 5).max_objects is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stage_in_objects = -1", "limits.stage_in_objects"),
        ('stage_out_bytes = "-1GiB"', "limits.stage_out_bytes"),
        ("warmups_per_minute = 1.5", "limits.warmups_per_minute"),
        ("nonsense = 1", "limits.nonsense"),
    ],
)
def test_config_check_refuses_bad_limits(text: str, message: str) -> None:
    with pytest.raises(HpcstageError, match=message):
        parse_config(f"{MINIMAL}[limits]\n{text}\n")


def test_the_stage_in_budget_is_what_the_jobs_earlier_inputs_left() -> None:
    got = limits.stage_in_budget(LimitSettings(stage_in_objects=1000), 400)
    assert got.max_objects == 600
    assert "limits.stage_in_objects is 1,000" in got.reason and "400" in got.reason
    assert limits.stage_in_budget(LimitSettings(stage_in_objects=1000), 1200).max_objects == 0


def refs(n: int, size: int = 0) -> AsyncIterator[ObjectRef]:
    async def gen() -> AsyncIterator[ObjectRef]:
        for i in range(n):
            yield ObjectRef("s3", "b", f"p/{i}", "e", size)

    return gen()


def item_of(budget: limits.ObjectBudget | None = None) -> StageItem:
    return StageItem(
        request_id=1,
        source=SourceSpec(SourceKind.S3_PREFIX, "b", "p/", "", [], [], ""),
        dest="p",
        max_bytes=None,
        quota_reason="",
        max_objects=None if budget is None else budget.max_objects,
        objects_reason="" if budget is None else budget.reason,
    )


def drain(n: int, item: StageItem) -> int:
    async def run() -> int:
        return len([r async for r in _limited(refs(n), item)])

    return asyncio.run(run())


def test_a_prefix_over_the_object_limit_fails_naming_the_limit_and_the_count() -> None:
    budget = limits.stage_in_budget(LimitSettings(stage_in_objects=100), 40)
    item = item_of(budget)
    assert drain(60, item) == 60  # exactly what is left: fine
    with pytest.raises(LimitError) as caught:
        drain(10**6, item)  # zero-byte objects: no byte quota would stop them
    message = str(caught.value)
    assert "more than 60 objects" in message
    assert "limits.stage_in_objects is 100" in message and "40" in message


def test_a_filter_applies_before_the_limit() -> None:
    """Objects a filter leaves out are not counted: 1000 listed, 10 taken, a limit of 10."""
    budget = limits.ObjectBudget(10, "limits.stage_in_objects is 10")
    item = item_of(budget)
    key_filter = KeyFilter(include=("?",))  # p/0 .. p/9 of p/0 .. p/999

    async def run() -> list[str]:
        taken = _taken(refs(1000), "p/", key_filter)
        return [r.key async for r in _limited(taken, item)]

    assert asyncio.run(run()) == [f"p/{i}" for i in range(10)]
    with pytest.raises(LimitError):
        drain(1000, item)


def test_an_agent_not_told_a_limit_lists_everything() -> None:
    assert drain(5000, item_of()) == 5000


def test_warmups_are_refused_over_either_limit_and_admins_never() -> None:
    s = LimitSettings(warmups_in_flight=3, warmups_per_minute=5)
    assert limits.warmup_refusal(s, in_flight=2, last_minute=4) == ""
    busy = limits.warmup_refusal(s, in_flight=3, last_minute=0)
    assert "3 warmups" in busy and "limits.warmups_in_flight" in busy
    fast = limits.warmup_refusal(s, in_flight=0, last_minute=5)
    assert "limits.warmups_per_minute is 5" in fast
    assert (
        limits.warmup_refusal(LimitSettings(warmups_in_flight=0, warmups_per_minute=0), 99, 99)
        == ""
    )


def outputs(n: int, size: int) -> Iterator[tuple[str, int]]:
    for i in range(n):
        yield f"f{i}", size


def test_stage_out_over_the_file_or_byte_limit_fails_before_any_upload() -> None:
    walked: list[str] = []

    def walk(n: int, size: int) -> Iterator[tuple[str, int]]:
        for name, s in outputs(n, size):
            walked.append(name)
            yield name, s

    check = limits.OutputLimit(max_files=10, max_bytes=1000, reason="per job")
    assert len(list(check.bounded(walk(10, 100), size=lambda o: o[1]))) == 10
    walked.clear()
    with pytest.raises(LimitError, match=r"more than 10 files.*per job"):
        list(check.bounded(walk(10**6, 0), size=lambda o: o[1]))
    assert len(walked) == 11  # stopped at the first file too many, not after 10^6
    with pytest.raises(LimitError, match=r"more than 1000 bytes|more than 1,000 bytes"):
        list(check.bounded(walk(5, 300), size=lambda o: o[1]))
    assert (
        len(list(limits.OutputLimit(None, None, "").bounded(walk(50, 10**15), size=lambda o: o[1])))
        == 50
    )
