"""Machines: parsing the strings and files users write, and detecting this computer."""

from __future__ import annotations

import re
import sys

import psutil
import pytest

from runner.errors import UserInputError
from runner.hardware import (
    GiB, detect_machine, example_machine_files, metal_working_set_bytes, parse_machine, resolve_machine,
)


def test_gpu_servers():
    a100 = parse_machine("4xA100-80GB")
    assert len(a100.gpus) == 4 and a100.hypothetical
    assert {g.total_bytes for g in a100.gpus} == {80 * GiB}
    assert a100.gpus[0].compute_capability == (8, 0)
    assert a100.gpus[0].bandwidth_bytes_per_s == 2039e9
    assert [g.name for g in a100.gpus] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert parse_machine("4xA100-40GB").gpus[0].bandwidth_bytes_per_s == 1555e9
    rtx = parse_machine("8xRTX4090")
    assert len(rtx.gpus) == 8 and rtx.gpus[0].total_bytes == 24 * GiB
    assert parse_machine("1xH100-80GB").gpus[0].compute_capability == (9, 0)
    assert parse_machine("2xH200").gpus[1].total_bytes == 141 * GiB
    assert parse_machine("h100").gpus[0].name == "cuda:0"          # count and size optional, any case


def test_options_for_ram_and_disk():
    machine = parse_machine("2xRTX3090,ram=128GB,disk=1TB")
    assert machine.hosts[0].ram_bytes == 128 * GiB
    assert machine.hosts[0].disk_free_bytes == 1024 * GiB


def test_macs_are_hosts_with_unified_memory():
    macs = parse_machine("2xM2Ultra-192GB")
    assert len(macs.hosts) == 2 and macs.is_apple and not macs.gpus
    host = macs.hosts[0]
    assert host.unified_memory and host.ram_bytes == 192 * GiB
    assert host.wired_limit_bytes == 144 * GiB                     # 3/4 above 36 GB
    assert host.devices[0].kind == "metal" and host.devices[0].bandwidth_bytes_per_s == 800e9
    assert metal_working_set_bytes(24 * GiB) == 16 * GiB             # 2/3 up to 36 GB


def test_cpu_only():
    cpu = parse_machine("cpu")
    assert cpu.hosts[0].devices == () and not cpu.gpus
    assert parse_machine("cpu-64GB").hosts[0].ram_bytes == 64 * GiB


@pytest.mark.parametrize("text,message", [
    ("4xZ9000", "unknown device 'Z9000'"),
    ("3xA100-50GB", "comes with 80GB, 40GB"),
    ("0xA100", "1 to 64"),
    ("4xA100,vram=9GB", "unknown option"),
    ("4xA100,ram=lots", "is not a size"),
    ("%%%", "not understood"),
])
def test_bad_machine_strings(text, message):
    with pytest.raises(UserInputError, match=message) as caught:
        parse_machine(text)
    assert "\n" not in str(caught.value)


def test_unknown_machine_names_the_known_ones():
    with pytest.raises(UserInputError) as caught:
        parse_machine("4xZ9000")
    assert "A100" in str(caught.value) and "M2Ultra" in str(caught.value) and "cpu" in str(caught.value)


def test_the_articles_setups_ship_as_machine_files():
    files = example_machine_files()
    assert set(files) == {"4xA100-80GB", "8xRTX3090-4090", "2xM2Ultra-192GB"}
    a100 = parse_machine(str(files["4xA100-80GB"]))
    assert len(a100.gpus) == 4 and a100.hosts[0].ram_bytes == 1024 * GiB
    mixed = parse_machine(str(files["8xRTX3090-4090"]))
    assert [g.model for g in mixed.gpus].count("NVIDIA GeForce RTX 3090 24GB") == 4
    assert [g.name for g in mixed.gpus] == [f"cuda:{i}" for i in range(8)]
    macs = parse_machine(str(files["2xM2Ultra-192GB"]))
    assert [h.name for h in macs.hosts] == ["studio1", "studio2"] and macs.is_apple


def test_machine_file_json_and_wired_limit(tmp_path):
    path = tmp_path / "macs.json"
    path.write_text('{"label": "my macs", "hosts": [{"name": "a", "mac": "M3Ultra-512GB", "wired_limit": "480GB"}]}')
    machine = parse_machine(str(path))
    assert machine.label == "my macs"
    assert machine.hosts[0].wired_limit_bytes == 480 * GiB == machine.hosts[0].devices[0].total_bytes


@pytest.mark.parametrize("text,message", [
    ('{"hosts": [', "malformed JSON"),
    ('{"hosts": []}', "list of \\[\\[hosts\\]\\]"),
    ('{"hosts": [{"name": "x"}]}', "needs mac"),
])
def test_bad_machine_files(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(UserInputError, match=message):
        parse_machine(str(path))


def test_bad_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("hosts = [[[")
    with pytest.raises(UserInputError, match="malformed TOML"):
        parse_machine(str(path))


def test_missing_machine_file():
    with pytest.raises(UserInputError, match="no such file"):
        resolve_machine("/nowhere/machine.toml")


def test_detect_this_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path))
    machine = detect_machine()
    assert not machine.hypothetical and len(machine.hosts) == 1
    host = machine.hosts[0]
    assert host.ram_bytes == psutil.virtual_memory().total
    assert 0 < host.ram_available_bytes <= host.ram_bytes
    assert host.swap_total_bytes == psutil.swap_memory().total
    assert host.disk_free_bytes > 0
    if sys.platform == "linux":
        assert not host.unified_memory
        for gpu in machine.gpus:   # on a GPU box nvml reports each card
            assert gpu.total_bytes > 0 and gpu.compute_capability is not None
    assert resolve_machine(None).label == "this machine"


def test_detection_does_not_import_torch():
    import subprocess

    code = "import sys; from runner.hardware import detect_machine; detect_machine(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_h100_is_what_its_driver_reports():
    """nvidia-ml-py on a real H100 80GB HBM3 reported 85,520,809,984 bytes (81559 MiB) and a
    3,352 GB/s memory bus (2619 MHz x 2 x 5120 bits); the preset uses those numbers."""
    h100 = parse_machine("1xH100-80GB").gpus[0]
    assert h100.total_bytes == 85_520_809_984
    assert abs(h100.bandwidth_bytes_per_s - 3_352_320_000_000) / 3.35e12 < 0.001


def test_mac_chip_names_from_sysctl():
    from runner.hardware import _mac_chip

    assert _mac_chip("Apple M2 Ultra").model == "Apple M2 Ultra"
    assert _mac_chip("Apple M4 Pro").bandwidth_gb_s == 273
    assert _mac_chip("Intel(R) Core(TM) i9") is None


# ---- hostile machine strings and files: one clear error, bounded work (issue 21) ------------------

@pytest.mark.parametrize("text,message", [
    ("9" * 5000 + "xA100", "devices? runner plans for 1 to 64 devices"),
    ("cpu-" + "9" * 5000 + "GB", "GB? runner plans for 1 to 1048576 GB"),
    ("cpu-0GB", "0 GB? runner plans for 1 to 1048576 GB"),
    ("M2Ultra-0GB", "0 GB?"),
    ("cpu,ram=0GB", "'0GB' is not a size runner plans for"),
    ("cpu,ram=" + "9" * 400 + "GB", "is not a size runner plans for"),
    ("a" * 5000, "unknown device 'aaaa"),
    ("cpu,ram=12\n XB" + "9" * 80, "ram: '12 XB" + "9" * 54 + "…' is not a size"),   # one line, cut at 60
], ids=["count", "size", "cpu-0GB", "mac-0GB", "ram-0", "ram-inf", "name", "ram-two-lines"])
def test_absurd_machine_strings(text, message):
    with pytest.raises(UserInputError, match=re.escape(message)) as caught:
        parse_machine(text)
    assert len(str(caught.value)) < 1000


@pytest.mark.parametrize("name,content,message", [
    ("self.toml", b'[[hosts]]\ngpus = "self.toml"\n', "gpus names a file"),
    ("self.json", b'{"hosts": [{"mac": "self.json"}]}', "mac names a file"),
    ("list.json", b'{"hosts": [{"gpus": ["A100", "list.json"]}]}', "gpus names a file"),
    ("bytes.toml", b"\xff[[hosts]]", "not UTF-8 text"),
    ("deep.json", b"[" * 5000 + b"]" * 5000, "malformed JSON (nested too deeply)"),
    ("deep.toml", b"a = " + b"[" * 5000 + b"]" * 5000, "malformed TOML (nested too deeply)"),
    ("long.json", b'{"hosts": [{"ram": ' + b"9" * 5000 + b"}]}", "malformed JSON (Exceeds the limit"),
    ("hosts.json", b'{"hosts": {"a": 1}}', "needs a list of"),
    ("list.json", b"[1]", "needs a list of"),
    ("many.json", b'{"hosts": [' + b",".join([b'{"ram": "8GB"}'] * 65) + b"]}", "65 hosts?"),
    ("gpus.json", b'{"hosts": [{"gpus": ["64xA100", "A100"]}]}', "more than 64 GPUs"),
    ("ram.json", b'{"hosts": [{"ram": "0GB"}]}', "host 'host1': ram: '0GB' is not a size"),
    ("huge.json", b'{"hosts": [' + b" " * (2 << 20) + b"]}", "more than 1 MB"),
])
def test_hostile_machine_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserInputError, match=re.escape(message)):
        resolve_machine(str(path))


def test_overlong_machine_paths():
    with pytest.raises(UserInputError, match="cannot read \\(File name too long\\)"):
        resolve_machine("/" + "a" * 5000 + ".toml")
    with pytest.raises(UserInputError, match="no such file"):
        resolve_machine("/" + "a" * 5000)
