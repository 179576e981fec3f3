"""CASA must work with no network and without touching the user's HOME or working directory."""

import os
import subprocess
import sys
import textwrap


def test_casatasks_imports_in_fresh_process_with_empty_home(tmp_path):
    home, cwd, state = tmp_path / "home", tmp_path / "cwd", tmp_path / "state"
    home.mkdir()
    cwd.mkdir()
    code = textwrap.dedent(f"""
        from dsa110_contimg.casa_env import prepare_casa
        prepare_casa({str(state)!r})
        import casatasks, casatools
        obs = casatools.measures().observatory("OVRO_MMA")
        assert obs["refer"] == "ITRF", obs
        casatools.logsink().post("hello from the test")
        print("OK", casatools.version_string())
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("CASASITECONFIG", "MPLCONFIGDIR")}
    env["HOME"] = str(home)
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK" in r.stdout
    assert list(home.iterdir()) == [], f"CASA wrote into HOME: {list(home.rglob('*'))}"
    assert list(cwd.iterdir()) == [], f"CASA wrote into the working directory: {list(cwd.iterdir())}"
    logs = list((state / "casa" / "logs").glob("casa-*.log"))
    assert logs and "hello from the test" in logs[0].read_text()
