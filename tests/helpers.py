"""Assertions shared by the command-line tests."""


def assert_one_line_error(result, *fragments: str) -> None:
    """A CliRunner result failed with exactly one stderr line containing every fragment, no traceback."""
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
