"""Configuration: valid files load with documented defaults; malformed ones get errors naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge_agent.cli import main
from edge_agent.config import load_config, parse_config
from tests.edge.conftest import agent_config, synthetic_camera
from tokenline.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def good(tmp_path: Path, model: Path) -> dict:
    return agent_config(tmp_path, model, 1883, [synthetic_camera("cam-1")])


def test_valid_config_and_defaults(tmp_path: Path, tiny_model_dir: Path) -> None:
    p = tmp_path / "edge.yaml"
    p.write_text(yaml.safe_dump(good(tmp_path, tiny_model_dir)))
    cfg = load_config(p)
    assert cfg.client_id == "tokenline-edge-edge-test"
    assert cfg.messages.token_dtype == "int8" and cfg.mqtt.inflight == 32 and cfg.outbox.max_bytes == 512 * 2**20
    assert cfg.originals.upload.policy == "none" and cfg.cameras[0].sampling.mode == "every_nth"


@pytest.mark.parametrize("mutate,key,msg", [
    (lambda d: d.update(colour="red"), "colour", "unknown key"),
    (lambda d: d["mqtt"].update(prot=1), "mqtt.prot", "unknown key"),
    (lambda d: d["mqtt"].update(port=70000), "mqtt.port", "less than or equal"),
    (lambda d: d.pop("device"), "device", "Field required"),
    (lambda d: d.update(site="bad/site"), "site", "pattern"),
    (lambda d: d["cameras"][0]["source"].update(fps="fast"), "cameras[0].source.fps", "number"),
    (lambda d: d["cameras"][0]["source"].update(kind="webcam"), "cameras[0].source", "kind"),
    (lambda d: d["cameras"][0].update(roi=[0, 0, 0, 5]), "cameras[0].roi", "w, h > 0"),
    (lambda d: d["cameras"][0].update(sampling={"mode": "sometimes"}), "cameras[0].sampling.mode", "Input should be"),
    (lambda d: d["cameras"].append(dict(d["cameras"][0])), "<root>", "unique"),
    (lambda d: d.update(cameras=[]), "cameras", "at least 1"),
    (lambda d: d["messages"].__setitem__("token_dtype", "int2") if "messages" in d else
     d.update(messages={"token_dtype": "int2"}), "messages.token_dtype", "Input should be"),
    (lambda d: d["originals"].update(upload={"policy": "all"}), "originals.upload", "needs url"),
    (lambda d: d["mqtt"].update(tls={"enabled": True, "cert_file": "c.pem"}), "mqtt.tls", "go together"),
    (lambda d: d["mqtt"].update(protocol=3), "mqtt.protocol", "Input should be"),
    (lambda d: d["mqtt"].update(confirm_timeout_s=60, confirm_timeout_max_s=30), "mqtt", "confirm_timeout_max_s"),
    (lambda d: d["cameras"][0].update(source={"kind": "url", "url": "ftp://x"}), "cameras[0].source.url", "pattern"),
    (lambda d: d["cameras"][0].update(source={"kind": "gstreamer", "pipeline": "videotestsrc ! fakesink"}),
     "cameras[0].source.pipeline", "appsink"),
])
def test_malformed_configs_name_the_key(tmp_path: Path, tiny_model_dir: Path, mutate, key: str, msg: str) -> None:
    d = good(tmp_path, tiny_model_dir)
    mutate(d)
    with pytest.raises(ConfigError) as e:
        parse_config(d, where="edge.yaml")
    text = str(e.value)
    assert f"  {key}: " in text and msg in text, text


def test_unreadable_and_non_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("device: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_check_config_cli(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    p = tmp_path / "edge.yaml"
    p.write_text(yaml.safe_dump(good(tmp_path, tiny_model_dir)))
    assert main(["check-config", "--config", str(p)]) == 0
    assert "configuration OK" in capsys.readouterr().out
    d = good(tmp_path, tiny_model_dir)
    d["model"]["dir"] = str(tmp_path / "nowhere")
    p.write_text(yaml.safe_dump(d))
    assert main(["check-config", "--config", str(p)]) == 2
    assert "model.dir" in capsys.readouterr().err
    d = good(tmp_path, tiny_model_dir)
    d["outbox"]["max_bytes"] = 10
    p.write_text(yaml.safe_dump(d))
    assert main(["check-config", "--config", str(p)]) == 2
    assert "outbox.max_bytes" in capsys.readouterr().err


def test_check_config_as_a_real_process(tmp_path: Path) -> None:
    (tmp_path / "e.yaml").write_text("device: d\nsite: s\nmodel: {dir: m}\ncameras: []\nbogus: 1\n")
    r = subprocess.run([sys.executable, "-m", "edge_agent", "check-config", "--config", str(tmp_path / "e.yaml")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "cameras: List should have at least 1 item" in r.stderr and "bogus: unknown key" in r.stderr


def test_shipped_example_config_validates() -> None:
    cfg = load_config(ROOT / "deploy" / "edge" / "edge.example.yaml")
    assert [c.source.kind for c in cfg.cameras] == ["gstreamer", "url", "usb"]
    unit = (ROOT / "deploy" / "systemd" / "tokenline-edge.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "tokenline-edge run --config" in unit


def test_unusable_outbox_path_is_a_clear_startup_error(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    d = good(tmp_path, tiny_model_dir)
    d["outbox"]["path"] = str(blocker / "outbox.sqlite")
    p = tmp_path / "edge.yaml"
    p.write_text(yaml.safe_dump(d))
    assert main(["run", "--config", str(p)]) == 2
    assert "outbox.path: cannot open" in capsys.readouterr().err


def test_check_config_reports_everything_run_would_fail_on(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    d = good(tmp_path, tiny_model_dir)
    d["model"]["dir"] = str(tmp_path / "no-model")
    d["mqtt"].update(username="edge", password_file=str(tmp_path / "missing.pw"),
                     tls={"enabled": True, "ca_file": str(tmp_path / "missing-ca.pem")})
    d["originals"].update(upload={"policy": "on_request", "url": "https://central", "token_file":
                                  str(tmp_path / "missing.token")})
    (tmp_path / "not-a-pem.crt").write_text("hello")
    d["cameras"] = [{"name": "f", "line": "l", "source": {"kind": "folder", "path": str(tmp_path / "no-folder")}},
                    {"name": "v", "line": "l", "source": {"kind": "file", "path": str(tmp_path / "no.mp4")}}]
    p = tmp_path / "edge.yaml"
    p.write_text(yaml.safe_dump(d))
    assert main(["check-config", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    for key in ("model.dir", "mqtt.password_file", "mqtt.tls.ca_file", "originals.upload.token_file",
                "cameras[0].source.path: folder", "cameras[1].source.path"):
        assert f"  {key}" in err, (key, err)
    assert "6 problem(s)" in err
    d = good(tmp_path, tiny_model_dir)  # a CA that is not a certificate
    d["mqtt"]["tls"] = {"enabled": True, "ca_file": str(tmp_path / "not-a-pem.crt")}
    p.write_text(yaml.safe_dump(d))
    assert main(["check-config", "--config", str(p), "--no-runner"]) == 2
    assert "mqtt.tls.ca_file" in capsys.readouterr().err


def test_an_outbox_too_small_for_file_sources_is_refused(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    (tmp_path / "in").mkdir()
    d = good(tmp_path, tiny_model_dir)
    d["cameras"] = [{"name": "f", "line": "l", "source": {"kind": "folder", "path": str(tmp_path / "in")}}]
    d["outbox"]["max_messages"] = 20  # a file source keeps room for 4 + 4 + 64 + 64 + 1 frames before it reads
    # (its queue, a batch, the results queue, the results the writer is committing, its own)
    p = tmp_path / "edge.yaml"
    p.write_text(yaml.safe_dump(d))
    assert main(["check-config", "--config", str(p), "--no-runner"]) == 2
    assert "outbox.max_messages/max_bytes: file sources keep room for 137 messages" in capsys.readouterr().err
    assert main(["run", "--config", str(p)]) == 2
    assert "file sources keep room" in capsys.readouterr().err
