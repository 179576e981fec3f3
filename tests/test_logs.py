import json
import subprocess
import sys
import textwrap


def _run(fmt: str) -> str:
    code = textwrap.dedent(f"""
        import structlog
        from dsa110_contimg.logs import configure_logging
        configure_logging("INFO", {fmt!r})
        structlog.contextvars.bind_contextvars(group_id="2026-06-01T04:46:06")
        structlog.get_logger("t").info("converted", rows=12)
        import logging; logging.getLogger("pyuvdata").warning("library says hi")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_json_lines_when_not_a_tty():
    lines = [json.loads(x) for x in _run("auto").splitlines()]
    assert len(lines) == 2
    ev = lines[0]
    assert ev["event"] == "converted" and ev["level"] == "info" and ev["rows"] == 12
    assert ev["group_id"] == "2026-06-01T04:46:06" and ev["timestamp"].endswith("Z")
    assert lines[1]["event"] == "library says hi" and lines[1]["level"] == "warning"


def test_console_format_is_readable():
    out = _run("console")
    assert "converted" in out and "rows=12" in out
    assert not out.lstrip().startswith("{")
