"""Assertions shared by the CLI tests (click's CliRunner results)."""


def ok(result):
    """Exit status 0 -> stdout."""
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    return result.stdout


def one_line_error(result, *parts, status=None):
    """Exit status != 0 (or exactly `status`); stderr is exactly one line, starting with 'error:' and
    containing every part; no traceback anywhere. -> that line."""
    if status is None:
        assert result.exit_code != 0, result.output
    else:
        assert result.exit_code == status, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for p in parts:
        assert str(p) in lines[0], f"{p!r} not in {lines[0]!r}"
    return lines[0]
