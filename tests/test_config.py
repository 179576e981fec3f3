import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsa110_contimg.config import (
    check_directories,
    known_credentials,
    known_variables,
    load_settings,
    public_view,
    render_env_file,
)
from dsa110_contimg.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_load_and_are_frozen():
    s = load_settings(environ={})
    assert s.ingest.expected_subbands == 16
    assert s.alerts.rate_limit_count == 10 and s.alerts.rate_limit_window_s == 300
    assert s.calibration.bp_validity_h == 24 and s.calibration.g_validity_h == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.ingest.expected_subbands = 3  # type: ignore[misc]


def test_environment_and_overrides():
    s = load_settings(environ={"CONTIMG_MAX_WORKERS": "4", "CONTIMG_STAGE_TO_TMPFS": "no",
                               "CONTIMG_SMTP_TO": "a@x, b@y"},
                      overrides={"CONTIMG_MAX_WORKERS": "3"})
    assert s.executor.max_workers == 3
    assert s.conversion.stage_to_tmpfs is False
    assert s.alerts.smtp_to == ("a@x", "b@y")


@pytest.mark.parametrize("env,value,fragment", [
    ("CONTIMG_QA_MS_MAX_ZERO_FRACTION", "lots", "is not a number"),
    ("CONTIMG_QA_MS_MAX_ZERO_FRACTION", "1.5", "above the maximum"),
    ("CONTIMG_MAX_WORKERS", "2.5", "is not an integer"),
    ("CONTIMG_STAGE_TO_TMPFS", "perhaps", "is not a boolean"),
    ("CONTIMG_TIMEOUT_POLICY", "shrug", "is not one of"),
    ("CONTIMG_EXECUTOR", "ftp://x", "neither 'local'"),
    ("CONTIMG_INPUTDIR", "/x", "unknown setting"),
])
def test_bad_values_name_the_variable(env, value, fragment):
    with pytest.raises(ConfigError) as exc:
        load_settings(environ={env: value})
    msg = str(exc.value)
    assert msg.startswith(env + ":") and fragment in msg and "\n" not in msg


def test_directories_checked(tmp_path):
    s = load_settings(environ={"CONTIMG_INPUT_DIR": str(tmp_path / "nope"),
                               "CONTIMG_STATE_DIR": str(tmp_path / "state"),
                               "CONTIMG_OUTPUT_DIR": str(tmp_path / "out"),
                               "CONTIMG_SCRATCH_DIR": str(tmp_path / "scratch")})
    with pytest.raises(ConfigError, match="CONTIMG_INPUT_DIR: .* does not exist"):
        check_directories(s.paths)
    (tmp_path / "nope").mkdir()
    check_directories(s.paths)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    s2 = load_settings(environ={"CONTIMG_INPUT_DIR": str(tmp_path / "nope"),
                                "CONTIMG_STATE_DIR": str(blocker / "state")})
    with pytest.raises(ConfigError, match="^CONTIMG_STATE_DIR: cannot create"):
        check_directories(s2.paths)


def test_secrets_never_shown():
    s = load_settings(environ={"CONTIMG_SLACK_WEBHOOK_URL": "https://hooks.example/T000/SECRET",
                               "CONTIMG_SMTP_PASSWORD": "hunter2", "CONTIMG_API_TOKEN": "tok123"})
    text = repr(s) + str(public_view(s))
    for secret in ("SECRET", "hunter2", "tok123"):
        assert secret not in text
    assert s.alerts.slack_webhook_url.get().endswith("SECRET")


def test_secrets_from_systemd_credentials_win_over_the_environment(tmp_path):
    creds = tmp_path / "credentials"
    creds.mkdir()
    assert known_credentials() == {"contimg-api-token": "CONTIMG_API_TOKEN",
                                   "contimg-slack-webhook-url": "CONTIMG_SLACK_WEBHOOK_URL",
                                   "contimg-smtp-password": "CONTIMG_SMTP_PASSWORD"}
    (creds / "contimg-api-token").write_text("tok-from-file\n")  # one newline dropped
    (creds / "contimg-smtp-password").write_text(" pw with spaces\n\n")  # only one
    env = {"CREDENTIALS_DIRECTORY": str(creds), "CONTIMG_API_TOKEN": "tok-from-env",
           "CONTIMG_SLACK_WEBHOOK_URL": "https://hooks.example/from-env"}
    s = load_settings(environ=env)
    assert s.api.token.get() == "tok-from-file"
    assert s.alerts.smtp_password.get() == " pw with spaces\n"
    # no credential file, or an empty one: the variable is the fallback
    assert s.alerts.slack_webhook_url.get() == "https://hooks.example/from-env"
    (creds / "contimg-slack-webhook-url").write_text("\n")
    assert load_settings(environ=env).alerts.slack_webhook_url.get() == "https://hooks.example/from-env"
    (creds / "contimg-slack-webhook-url").unlink()
    # without CREDENTIALS_DIRECTORY the files are not looked at
    assert load_settings(environ={"CONTIMG_API_TOKEN": "tok-from-env"}).api.token.get() == "tok-from-env"
    (creds / "contimg-slack-webhook-url").mkdir()  # unreadable as a file
    with pytest.raises(ConfigError, match="^CONTIMG_SLACK_WEBHOOK_URL: cannot read credential"):
        load_settings(environ=env)
    env_file = render_env_file()
    for name, var in known_credentials().items():
        doc = env_file.split(f"#{var}=")[0].rsplit("\n# ", 1)[1]
        assert f"systemd credential {name} " in doc, doc


def test_env_file_documents_every_variable():
    text = (ROOT / "systemd" / "contimg.env").read_text()
    assert text.strip() == render_env_file().strip(), "regenerate: contimg config env > systemd/contimg.env"
    for var in known_variables():
        assert f"#{var}=" in text


def test_cli_reports_bad_value_in_one_line(tmp_path):
    env = {**os.environ, "CONTIMG_MAX_WORKERS": "many", "CONTIMG_STATE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "dsa110_contimg.cli", "casa-check"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "contimg: configuration error: CONTIMG_MAX_WORKERS: 'many' is not an integer"


def test_smtp_login_without_tls_is_a_configuration_error():
    env = {"CONTIMG_SMTP_HOST": "mail.example.org", "CONTIMG_SMTP_USER": "contimg"}
    with pytest.raises(ConfigError) as exc:
        load_settings(environ=env)
    msg = str(exc.value)
    assert msg.startswith("CONTIMG_SMTP_USER:") and "CONTIMG_SMTP_SECURITY" in msg
    assert "CONTIMG_SMTP_ALLOW_PLAINTEXT_LOGIN=true" in msg
    for extra in ({"CONTIMG_SMTP_SECURITY": "starttls"}, {"CONTIMG_SMTP_SECURITY": "tls"},
                  {"CONTIMG_SMTP_ALLOW_PLAINTEXT_LOGIN": "true"}):
        load_settings(environ={**env, **extra})
    load_settings(environ={"CONTIMG_SMTP_HOST": "mail.example.org"})  # no login: fine
