"""The agent's secret masking (builds.agent.logs: SecretMasker and LogShipper), without a server or a process.

Every piece of output is masked before it is numbered and shipped; a value split
across two reads of a pipe is still masked, because the end of a piece that could
be the start of a value is held back until the next piece (or the end).
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from builds.agent.logs import MAX_CHUNK_CHARS, META, REDACTED, STDERR, STDOUT, LogShipper, SecretMasker
from builds.agent.runner import Agent
from builds.agent.spec import JobSpec

VALUE = "tok-3f9a-value"


def feed_all(masker: SecretMasker, pieces: list[str]) -> list[str]:
    """What the masker lets out for each piece, then for the end."""
    return [masker.feed(piece) for piece in pieces] + [masker.close()]


# ===================================================================== SecretMasker


def test_without_values_text_passes_unchanged_and_nothing_is_held():
    masker = SecretMasker([])
    assert masker.feed("anything tok") == "anything tok"
    assert masker.tail == "" and masker.close() == ""


def test_a_value_is_replaced_wherever_it_appears():
    masker = SecretMasker([VALUE])
    assert masker.feed(f"{VALUE} and x{VALUE}y\n{VALUE}{VALUE}\n") == \
        f"{REDACTED} and x{REDACTED}y\n{REDACTED}{REDACTED}\n"
    assert masker.close() == ""


def test_ordinary_output_is_not_held_back():
    masker = SecretMasker([VALUE])
    assert masker.feed("building...\n") == "building...\n"
    assert masker.feed("no secret here: t") == "no secret here: "  # `t` could start the value
    assert masker.tail == "t"


def test_a_value_split_across_two_reads_is_masked():
    masker = SecretMasker([VALUE])
    first = masker.feed("echo: " + VALUE[:6])
    second = masker.feed(VALUE[6:] + " done\n")

    assert first == "echo: "
    assert second == f"{REDACTED} done\n"
    assert VALUE[:3] not in first + second


def test_a_value_fed_one_character_at_a_time_is_masked():
    masker = SecretMasker([VALUE])
    out = feed_all(masker, list(f"a {VALUE} b {VALUE}"))
    assert "".join(out) == f"a {REDACTED} b {REDACTED}"
    # Nothing of the value ever left the masker, not even its first characters.
    assert all(VALUE[:2] not in piece for piece in out)


def test_the_held_tail_is_at_most_one_shorter_than_the_longest_value():
    masker = SecretMasker(["abc", VALUE])
    masker.feed("x" + VALUE[:-1])
    assert masker.tail == VALUE[:-1] and len(masker.tail) == len(VALUE) - 1


def test_a_start_that_never_completes_is_released_at_the_end():
    masker = SecretMasker([VALUE])
    assert feed_all(masker, ["last line: tok-3f"]) == ["last line: ", "tok-3f"]


def test_a_start_that_turns_out_different_is_released_with_the_next_piece():
    masker = SecretMasker([VALUE])
    assert masker.feed("tok-3") == ""
    assert masker.feed("x\n") == "tok-3x\n"
    assert masker.tail == ""


def test_longer_values_win_over_their_prefixes():
    masker = SecretMasker(["abcd", "abcdefgh"])
    assert masker.feed("abcdefgh abcd abcdefg\n") == f"{REDACTED} {REDACTED} {REDACTED}efg\n"


def test_a_shorter_value_held_as_the_start_of_a_longer_one_is_masked_at_the_end():
    masker = SecretMasker(["abcd", "abcdefgh"])
    assert masker.feed("x abcd") == "x "  # could still become abcdefgh
    assert masker.close() == REDACTED


def test_a_shorter_value_followed_by_the_start_of_a_longer_one_is_masked():
    masker = SecretMasker(["abcd", "abcdefgh"])
    assert feed_all(masker, ["abcdabcdef", "gh!"]) == [REDACTED, f"{REDACTED}!", ""]


def test_a_whole_value_overlapping_the_start_of_another_is_masked_and_the_rest_released():
    masker = SecretMasker(["xyz", "zab"])
    assert masker.feed("xyza") == f"{REDACTED}a"
    assert masker.tail == ""


def test_values_shorter_than_three_characters_are_not_masked():
    masker = SecretMasker(["ok", "1", "  ", "abc"])
    assert masker.feed("ok 1 abc  \n") == f"ok 1 {REDACTED}  \n"


def test_surrounding_whitespace_is_ignored_and_each_line_of_a_multiline_value_is_masked():
    key = "-----BEGIN KEY-----\nAAAAB3Nza\nC1yc2EAAA\n-----END KEY-----\n"
    masker = SecretMasker(["  padded-value \n", key])
    out = masker.feed(f"[padded-value]\n{key}line: C1yc2EAAA\r\n") + masker.close()
    assert out == f"[{REDACTED}]\n{REDACTED}\nline: {REDACTED}\r\n"


def test_values_with_regex_and_unicode_characters_are_matched_literally():
    masker = SecretMasker(["a.b*c(", "pässwörd✓"])
    assert masker.feed("a.b*c( axbbc( pässwörd✓\n") == f"{REDACTED} axbbc( {REDACTED}\n"


@pytest.mark.parametrize("seed", range(40))
def test_any_split_of_the_output_masks_like_the_whole(seed):
    rng = random.Random(seed)
    values = [VALUE, "abcabd", "abd", "zzzz"]
    alphabet = ["a", "b", "c", "d", "z", "-", "\n", VALUE, VALUE[:5], "abcab", "zz"]
    text = "".join(rng.choice(alphabet) for _ in range(200))
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 60)))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]

    whole = SecretMasker(values)
    expected = whole.feed(text) + whole.close()
    split = "".join(feed_all(SecretMasker(values), pieces))

    assert split == expected
    assert VALUE not in split and "zzzz" not in split


# ===================================================================== LogShipper


class FakeTransport:
    """Records what the shipper and the agent send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Any]] = []

    def json(self, method: str, path: str, *, token: str, body: Any = None, ok: tuple[int, ...] = (200,)) -> Any:
        self.sent.append((method, path, body))
        return {"state": "running", "cancel": False, "timeout": False}


def job_spec(mask: list[str] | None = None) -> JobSpec:
    job: dict[str, Any] = {"id": "job-1", "command": "true", "env": {}, "timeout_seconds": 60, "step_key": "a"}
    if mask is not None:
        job["mask"] = mask
    return JobSpec.from_claim({"job": job, "job_token": "hmj_x"})


def shipped(transport: FakeTransport) -> list[dict[str, Any]]:
    return [chunk for _, _, body in transport.sent for chunk in (body or {}).get("chunks", [])]


def test_job_spec_reads_the_mask_and_defaults_to_none():
    assert job_spec([VALUE]).mask == [VALUE]
    assert job_spec().mask == []


def test_shipper_masks_every_stream_before_numbering():
    transport = FakeTransport()
    shipper = LogShipper(transport, job_spec([VALUE]))  # type: ignore[arg-type]

    shipper.add(META, f"harmont-agent: something about {VALUE}\n")
    shipper.add(STDOUT, f"out {VALUE}\n")
    shipper.add(STDERR, f"err {VALUE}\n")
    shipper.flush()

    assert [(c["seq"], c["stream_kind"], c["content"]) for c in shipped(transport)] == [
        (1, META, f"harmont-agent: something about {REDACTED}\n"),
        (2, STDOUT, f"out {REDACTED}\n"),
        (3, STDERR, f"err {REDACTED}\n"),
    ]


def test_a_value_split_across_a_flush_is_still_masked_and_close_releases_the_rest():
    transport = FakeTransport()
    shipper = LogShipper(transport, job_spec([VALUE]))  # type: ignore[arg-type]

    shipper.add(STDOUT, "token=" + VALUE[:4])
    shipper.add(STDERR, "warning\n")  # another stream in between holds nothing back of this one
    shipper.flush()
    shipper.add(STDOUT, VALUE[4:] + "\nlast " + VALUE[:3])
    shipper.flush()
    shipper.close()
    shipper.flush()

    chunks = shipped(transport)
    assert [c["seq"] for c in chunks] == [1, 2, 3, 4]
    assert "".join(c["content"] for c in chunks if c["stream_kind"] == STDOUT) == f"token={REDACTED}\nlast tok"
    assert all(VALUE not in c["content"] for c in chunks)


def test_without_a_mask_the_shipper_holds_nothing_back():
    transport = FakeTransport()
    shipper = LogShipper(transport, job_spec())  # type: ignore[arg-type]
    shipper.add(STDOUT, "partial line without newline")
    shipper.flush()
    assert [c["content"] for c in shipped(transport)] == ["partial line without newline"]


def test_the_finish_report_carries_what_the_masker_held_back():
    agent = Agent(server="http://127.0.0.1:9", token="hma_x")
    transport = FakeTransport()
    agent.transport = transport  # type: ignore[assignment]
    job = job_spec([VALUE])
    shipper = LogShipper(transport, job)  # type: ignore[arg-type]
    shipper.add(STDOUT, "done " + VALUE[:5])

    agent._finish(job, {"exit_code": 0}, shipper)

    (method, path, body), = transport.sent
    assert (method, path) == ("POST", "/api/v0/agent/jobs/job-1/finish")
    assert [(c["stream_kind"], c["content"]) for c in body["chunks"]] == [(STDOUT, "done "), (STDOUT, VALUE[:5])]


def test_output_longer_than_a_chunk_is_masked_then_cut():

    transport = FakeTransport()
    shipper = LogShipper(transport, job_spec([VALUE]))  # type: ignore[arg-type]
    # The value straddles the chunk boundary in the raw text.
    shipper.add(STDOUT, "x" * (MAX_CHUNK_CHARS - 3) + VALUE + "\n")
    shipper.flush()

    contents = [c["content"] for c in shipped(transport)]
    assert "".join(contents) == "x" * (MAX_CHUNK_CHARS - 3) + REDACTED + "\n"
    assert len(contents) == 2
