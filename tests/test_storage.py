"""Storage layer: secrets never travel in URIs or messages; permanent errors are not retried."""

from __future__ import annotations

import pytest

from pipeline import storage
from pipeline.decode import one_line
from tests.helpers import run_job

SECRET = "wJalrXUtnFEMI-K7MDENG"


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (f"s3://AKIAEXAMPLE:{SECRET}@bucket/slides", "s3://***@bucket/slides"),
        (f"s3://bucket/slides?X-Amz-Signature={SECRET}", "s3://bucket/slides"),
        ("s3://bucket/slides", "s3://bucket/slides"),
    ],
)
def test_redact(uri, shown):
    assert storage.redact(uri) == shown


def test_uris_with_credentials_are_refused_without_echoing_them():
    with pytest.raises(storage.UnsafeURIError) as caught:
        storage.resolve(f"s3://AKIAEXAMPLE:{SECRET}@bucket/slides")
    assert SECRET not in str(caught.value) and "environment" in str(caught.value)


def test_error_lines_are_redacted():
    line = one_line(OSError(f"failed to open gs://user:{SECRET}@bucket/a.png\nretry later"))
    assert SECRET not in line and "\n" not in line and "OSError" in line


@pytest.mark.parametrize(
    "args",
    [
        [f"s3://AKIAEXAMPLE:{SECRET}@bucket/slides", "--output", "{tmp}/run"],
        ["{archive}", "--output", f"s3://bucket/run?X-Amz-Signature={SECRET}"],
    ],
)
def test_the_job_refuses_secret_uris_in_one_line_without_the_secret(args, archive, tmp_path):
    argv = [a.format(tmp=tmp_path, archive=archive) for a in args]
    result = run_job("jobs.segment", *argv, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()


def test_permanent_errors_are_raised_at_once_and_transient_ones_retried():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("no such key")

    with pytest.raises(FileNotFoundError):
        storage.retry_transient(missing, base_delay_s=0)
    assert len(calls) == 1

    outcomes = iter([ConnectionRefusedError("down"), TimeoutError("slow"), "ok"])

    def flaky():
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert storage.retry_transient(flaky, base_delay_s=0) == "ok"
