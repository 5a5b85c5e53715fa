"""Hostile-input fuzzing of object keys (issue 15, "Must show"): where a key lands in a job's
view, and which key a job's output gets, checked for their OUTCOME on generated keys.

S3 keys are any UTF-8 up to 1024 bytes. A stage-in of ``s3://b/PREFIX`` into DEST puts the
object at KEY at ``DEST/<KEY after PREFIX>`` (``hpcstage.agent.stagein._view_path``, which
calls ``hpcstage.cache.key_dest``). For every key under a prefix, that either

- gives a relative path inside the view, exactly ``DEST/REL`` (nothing folded: so two keys
  never share a path, and the path maps back to the key byte-exact), each name at most 255
  bytes; and linking there on a real filesystem gives a file whose name, read back from the
  directory, is the key's; or
- refuses the key with a CacheError naming it and the reason, in a short, control-free
  message, exactly when the key has an empty, '.' or '..' component, a leading '/', a control
  character or a name over 255 bytes.

``hpcstage.core.stageout.key_for`` is the way back: a file at REL under a stage-out SRC gets the key
``PREFIX + REL``, and a stage-in of that prefix puts it at ``DEST/REL`` again.

Settings: derandomize=True, so that CI runs the same examples every time.
"""

from __future__ import annotations

import os
import posixpath
import re
import tempfile
import unicodedata
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hpcstage.agent.stagein import _view_path
from hpcstage.cache.views import link_into
from hpcstage.core.directives import MAX_KEY_BYTES, MAX_NAME_BYTES, SourceKind, parse_value
from hpcstage.core.identity import ObjectRef
from hpcstage.core.stageout import key_for
from hpcstage.errors import CacheError

FUZZ = settings(
    deadline=None,
    max_examples=200,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
SHORT = 600

# --- generators -------------------------------------------------------------------------------

# What makes a key hard for some layer: path syntax, URL and shell syntax, quoting, Unicode
# forms and look-alikes, characters a file name cannot or should not hold, long names.
NAME_PIECES = [
    "a", "B", "0", ".", "..", " ", "%", "%2F", "%2e", "+", "#", "?", "&", "=", ";", "*", "~",
    "'", '"', "\\", "`", "$", "!", "é", "e\u0301", "ß", "İ", "日本", "😀", "\u00a0", "\u200b",
    "\ufeff", "\u2024", "\uff0e", "\u2215", "\u202e", "\x00", "\n", "\r", "\x1b", "\x7f", "\x85",
]  # fmt: skip
name = st.one_of(
    st.lists(st.sampled_from(NAME_PIECES), min_size=1, max_size=6).map("".join),
    st.sampled_from(["", ".", "..", "...", " ", ".hidden", "a" * 255, "a" * 256, "é" * 127 + "a"]),
    st.sampled_from(["é" * 128, "日" * 85, "日" * 86, "😀" * 63 + "abc", "😀" * 64]),
    st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=8),
)
rel_key = st.lists(name, min_size=1, max_size=5).map("/".join) | st.sampled_from(
    ["/etc/x", "a/", "a//b", "./a", "a/.", "/"]
)
prefix = st.sampled_from(["", "p/", "data/2024/", "a b/é/", "%/+/#/", "x" * 200 + "/"])
dest = st.sampled_from(["data", "in/put", "é b", "x" * 255]).map(PurePosixPath)


def fits(key: str) -> bool:
    return len(key.encode()) <= MAX_KEY_BYTES


def legal_rel(rel: str) -> bool:
    """Whether a key's part after the prefix can be a file of its own in a view."""
    parts = rel.split("/")
    return (
        not rel.startswith("/")
        and all(part not in ("", ".", "..") for part in parts)
        and all(len(part.encode()) <= MAX_NAME_BYTES for part in parts)
        and not CONTROL.search(rel)
    )


def ref(key: str) -> ObjectRef:
    return ObjectRef("http://127.0.0.1:9", "bucket", key, "etag", 1)


def view_path(prefix_: str, key: str, dest_: PurePosixPath) -> PurePosixPath:
    return _view_path(ref(key), prefix_, dest_)


def check_refusal(err: CacheError, key: str) -> None:
    message = str(err)
    assert message.startswith(f"object key {repr(key)[:30]}"), message[:200]
    assert len(message) < SHORT and not UNSAFE.search(message), ascii(message[:300])
    assert re.search(
        r"starts with '/'|path component|control character|is over 255 bytes", message
    ), message


def check_lands(path: PurePosixPath, prefix_: str, key: str, dest_: PurePosixPath) -> None:
    rel = key.removeprefix(prefix_)
    assert str(path) == f"{dest_}/{rel}"  # nothing folded, nothing added
    assert posixpath.normpath(posixpath.join("/view", str(path))) == f"/view/{path}"
    assert prefix_ + str(path.relative_to(dest_)) == key  # maps back, byte-exact
    assert all(len(part.encode()) <= MAX_NAME_BYTES for part in path.parts)


# --- (b) a key's place in the view ------------------------------------------------------------


@FUZZ
@given(prefix, rel_key, dest)
@example("p/", "a" * 256, PurePosixPath("data"))  # refused only by link(2) on 4f7f2a1
@example("p/", "é" * 128 + "/x", PurePosixPath("data"))
@example("p/", "a/./b", PurePosixPath("data"))
@example("", "/etc/passwd", PurePosixPath("bucket"))
def test_a_key_lands_at_its_own_path_in_the_view_or_is_refused_by_name(
    prefix_: str, rel: str, dest_: PurePosixPath
) -> None:
    key = prefix_ + rel
    if not fits(key) or not rel:
        # S3 holds no such key. A key equal to its prefix ('p/') is a console's folder marker,
        # which listings skip (S3Store.list); '' is no key.
        return
    try:
        path = view_path(prefix_, key, dest_)
    except CacheError as err:
        check_refusal(err, key)
        assert not legal_rel(rel), ascii(key)  # refused only with a reason
        return
    assert legal_rel(rel), ascii(key)  # every reason is checked
    check_lands(path, prefix_, key, dest_)


# Keys that differ in ways a filesystem or a path library might not see: case, Unicode
# normalisation form, a trailing or doubled '/', '.' components, look-alikes of '.' and '/'.
def variants(rel: str) -> list[str]:
    return [
        rel,
        rel.upper(),
        rel.lower(),
        unicodedata.normalize("NFC", rel),
        unicodedata.normalize("NFD", rel),
        unicodedata.normalize("NFKC", rel),
        rel.replace("/", "//"),
        rel.replace("/", "/./"),
        rel + "/",
        rel.replace("/", "\u2215"),
        rel.replace(".", "\u2024"),
        "./" + rel,
        rel + "/.",
    ]


@FUZZ
@given(prefix, st.lists(rel_key, min_size=1, max_size=6), dest)
@example("p/", ["Résumé/Ab", "a/b"], PurePosixPath("data"))
def test_two_keys_never_land_on_one_path(
    prefix_: str, rels: list[str], dest_: PurePosixPath
) -> None:
    keys = {prefix_ + v for rel in rels for v in variants(rel) if fits(prefix_ + v)}
    landed: dict[PurePosixPath, str] = {}
    for key in sorted(keys):
        try:
            path = view_path(prefix_, key, dest_)
        except CacheError:
            continue
        assert path not in landed, (landed[path], key)
        landed[path] = key


@settings(FUZZ, max_examples=60)
@given(st.lists(rel_key, min_size=1, max_size=12))
@example(["Ab", "ab", "AB", "é", "e\u0301", "a" * 255, "日" * 85, "x/y", "x/Y", "%41", "A"])
def test_accepted_keys_become_files_named_byte_exact(rels: list[str]) -> None:
    """On a real filesystem: each accepted key is a file of its own whose name, read back from
    its directory, is the key; or, when one key is a directory of another ('a' and 'a/b'),
    linking fails naming the path. Nothing appears outside the view."""
    keys = {f"p/{rel}" for rel in rels if fits(f"p/{rel}")}
    placed = {}
    for key in keys:
        try:
            placed[key] = view_path("p/", key, PurePosixPath("data"))
        except CacheError:
            continue
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        view = root / "view"
        view.mkdir()
        obj = root / "object"
        obj.write_bytes(b"x")
        clash = _file_and_dir(list(placed.values()))
        failed: dict[str, str] = {}
        for key, path in sorted(placed.items()):
            try:
                link_into(view, path, obj)
            except CacheError as err:
                failed[key] = str(err)
        assert bool(failed) <= clash, failed  # only a file that is another's directory fails
        assert all(str(placed[key]) in message for key, message in failed.items()), failed
        assert sorted(os.listdir(root)) == ["object", "view"]  # nothing outside the view
        found = _files(view / "data")
        assert found <= {str(p.relative_to("data")) for p in placed.values()}
        for key, path in placed.items():
            if key not in failed and not _is_dir_of_another(path, placed.values()):
                assert str(path.relative_to("data")) in found, ascii(key)


def _file_and_dir(paths: list[PurePosixPath]) -> bool:
    return any(_is_dir_of_another(p, paths) for p in paths)


def _is_dir_of_another(path: PurePosixPath, paths: Iterable[PurePosixPath]) -> bool:
    return any(path in other.parents for other in paths)


def _files(top: Path) -> set[str]:
    """Every file under ``top``, its path rebuilt from the names the directories hold."""
    out = set()
    for dirpath, _, files in os.walk(top):
        base = os.path.relpath(dirpath, top)
        for file_name in files:
            out.add(file_name if base == "." else f"{base}/{file_name}")
    return out


# --- (b) the way back: an output's key, and that key staged in again --------------------------

out_dest = st.sampled_from(["o/", "", "a b/é/", "results/%/+#/", "o/file.txt", "k"])
file_name = st.one_of(
    st.lists(
        st.sampled_from([p for p in NAME_PIECES if p not in ("\x00",)]), min_size=1, max_size=6
    )
    .map("".join)
    .filter(lambda n: n not in (".", "..") and "/" not in n),
    st.sampled_from(["a" * 255, "é" * 127, ".hidden", "...", " "]),
)
rel_in_src = st.lists(file_name, min_size=1, max_size=4).map("/".join)


@FUZZ
@given(out_dest, st.booleans(), rel_in_src, st.sampled_from(["in/put", "data"]))
def test_an_output_key_maps_back_and_stages_in_at_the_same_place(
    dest_key: str, src_is_dir: bool, rel: str, stage_in_dest: str
) -> None:
    src_name = rel.rsplit("/", 1)[-1]
    key = key_for(dest_key, src_is_dir, rel, src_name)
    is_prefix = dest_key == "" or dest_key.endswith("/")
    written = rel if src_is_dir else src_name
    if is_prefix:
        assert key == dest_key + written
    elif src_is_dir:
        assert key == f"{dest_key}/{rel}"
    else:
        assert key == dest_key
        return
    # A later job stages the same prefix in: the file is back at its relative path, or the key
    # is refused by name (a control character in a file name, which S3 stores).
    prefix_ = dest_key if is_prefix else dest_key + "/"
    if not fits(key):
        return  # S3 refuses the upload itself: see the integration tests of stage-out
    try:
        path = view_path(prefix_, key, PurePosixPath(stage_in_dest))
    except CacheError as err:
        check_refusal(err, key)
        assert CONTROL.search(written), ascii(key)
        return
    assert path == PurePosixPath(stage_in_dest) / written


@FUZZ
@given(out_dest, st.lists(rel_in_src, min_size=2, max_size=8, unique=True))
def test_two_outputs_never_get_one_key(dest_key: str, rels: list[str]) -> None:
    keys = [key_for(dest_key, True, rel, rel.rsplit("/", 1)[-1]) for rel in rels]
    assert len(set(keys)) == len(keys)


@FUZZ
@given(st.sampled_from(["o/", "a b/é/", "o/sub", "k"]), rel_in_src)
def test_an_output_key_under_a_parsed_dest_is_a_key_a_stage_in_accepts(
    dest_key: str, rel: str
) -> None:
    """The directive grammar and key_for together: a stage-out DEST the parser accepts, plus a
    file's relative path without control characters, is a key a stage-in directive accepts."""
    stage_out = parse_value("stage-out", f"r:s3://bucket/{dest_key}")
    key = key_for(stage_out.dest.key, True, rel, rel.rsplit("/", 1)[-1])
    if CONTROL.search(rel) or not fits(key) or "%" in key:
        return  # refused by name at stage-in; '%' is a pattern in a directive, not in a key
    stage_in = parse_value("stage-in", f"s3://bucket/{key}")
    assert stage_in.src.kind is SourceKind.S3_OBJECT and stage_in.src.key == key


# --- a listing that answers with keys outside its prefix ---------------------------------------


@FUZZ
@given(st.sampled_from(["p/", "Alice/", "data/2024/", "é/"]), rel_key)
@example("Alice/", "secret")  # a store that matches prefixes case-insensitively
@example("é/", "x")  # or after Unicode normalisation (NFC 'é/' vs NFD 'e\u0301/')
def test_a_listed_key_outside_the_prefix_is_refused(prefix_: str, rel: str) -> None:
    """The policy allowed the prefix, not the bucket: a key the listing returns that is not
    under it (a buggy or hostile store, a prefix matched after folding case or Unicode form)
    is refused by name, never staged. On 4f7f2a1 it was staged under its whole key."""
    for key in (rel, prefix_.lower() + rel, unicodedata.normalize("NFD", prefix_) + rel):
        if key.startswith(prefix_) or not fits(key):
            continue
        try:
            path = view_path(prefix_, key, PurePosixPath("data"))
        except CacheError as err:
            message = str(err)
            assert message.startswith(f"object key {repr(key)[:30]}"), message
            assert "not under the prefix" in message and repr(prefix_) in message
            assert len(message) < SHORT and not UNSAFE.search(message)
            continue
        raise AssertionError(f"{key!r} outside {prefix_!r} staged at {path}")
