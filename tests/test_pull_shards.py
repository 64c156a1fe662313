"""One host's share of a pipeline split: only the safetensors files holding its layers (and the
embeddings and head), from test_pull.py's Hub-compatible server. `runner pull --layers` on this
machine, and `runner launch --pull` over two hosts that are both this machine (no root needed);
tests/test_launch_hosts.py's fake hosts run the same over ssh where they can be made."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from runner.download import shards_for_layers
from fake_hosts import fake_hosts  # noqa: F401  (the fixture: skips without root)
from test_pull import Repo, hub, one_line_error, pull_env, runner, safetensors_file, snapshot  # noqa: F401

# Four shards as a converter might cut them: layer 2 straddles two files, the embeddings sit with the head.
WEIGHT_MAP = {
    "model.layers.0.self_attn.q_proj.weight": "model-00001-of-00004.safetensors",
    "model.layers.0.mlp.up_proj.weight": "model-00001-of-00004.safetensors",
    "model.layers.1.self_attn.q_proj.weight": "model-00002-of-00004.safetensors",
    "model.layers.2.input_layernorm.weight": "model-00002-of-00004.safetensors",
    "model.layers.2.mlp.up_proj.weight": "model-00003-of-00004.safetensors",
    "model.layers.3.self_attn.q_proj.weight": "model-00003-of-00004.safetensors",
    "model.embed_tokens.weight": "model-00004-of-00004.safetensors",
    "model.norm.weight": "model-00004-of-00004.safetensors",
    "lm_head.weight": "model-00004-of-00004.safetensors",
}
SHARD = "model-0000{}-of-00004.safetensors"


def test_shards_for_each_layer_range():
    assert shards_for_layers(WEIGHT_MAP, (0, 1)) == [SHARD.format(1), SHARD.format(4)]
    assert shards_for_layers(WEIGHT_MAP, (1, 2)) == [SHARD.format(2), SHARD.format(4)]
    assert shards_for_layers(WEIGHT_MAP, (2, 3)) == [SHARD.format(2), SHARD.format(3), SHARD.format(4)]
    assert shards_for_layers(WEIGHT_MAP, (0, 4)) == [SHARD.format(i) for i in (1, 2, 3, 4)]
    # a multimodal checkpoint's language model, and a layer 10 that is not layer 1
    other = {"language_model.model.layers.1.mlp.weight": "a.safetensors",
             "language_model.model.layers.10.mlp.weight": "b.safetensors",
             "vision_tower.blocks.0.weight": "c.safetensors"}
    assert shards_for_layers(other, (1, 2)) == ["a.safetensors", "c.safetensors"]


@pytest.fixture
def sharded_repo(tmp_path) -> dict[str, Path]:
    """config.json of a 4-layer Llama and the four shards of WEIGHT_MAP, each ~1 MB, with their index."""
    from conftest import TINY_LLAMA

    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(TINY_LLAMA, num_hidden_layers=4, model_type="llama",
                                                        dtype="float32")))
    files = {"config.json": folder / "config.json"}
    for index in range(1, 5):
        name = SHARD.format(index)
        tensors = {tensor: 250_000 // 3 for tensor, shard in WEIGHT_MAP.items() if shard == name}
        files[name] = safetensors_file(folder / name, tensors)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": WEIGHT_MAP}))
    files["model.safetensors.index.json"] = folder / "model.safetensors.index.json"
    return files


def cdn_gets(hub) -> list[dict]:
    return [e for e in list(hub.log) if e["method"] == "GET" and e["path"].startswith("/cdn/")]


def fetched(hub) -> set[str]:
    return {e["file"] for e in cdn_gets(hub)}


def test_pull_of_a_layer_range_fetches_its_shards_only_and_is_not_a_model_alone(hub, sharded_repo):
    from runner.errors import ModelNotFound
    from runner.model import load_spec

    hub.repos["test-org/sharded"] = Repo(dict(sharded_repo))
    share = runner("pull", "test-org/sharded", "--layers", "1:2")
    assert share.returncode == 0, share.stderr
    assert "test-org/sharded · layers 1-1 of 4: 2 of 4 safetensors files" in share.stderr
    assert fetched(hub) == {SHARD.format(2), SHARD.format(4)}
    folder = snapshot("test-org/sharded")
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(
        ["config.json", "model.safetensors.index.json", SHARD.format(2), SHARD.format(4)])
    assert share.stdout.strip().endswith("this host's share only (runner chat does not offer it alone)")
    marker = json.loads((folder / ".runner-pull-incomplete").read_text())
    assert marker["layers"] == [1, 2] and set(marker["verified"]) >= {SHARD.format(2), SHARD.format(4)}
    with pytest.raises(ModelNotFound):
        load_spec("test-org/sharded")

    hub.log.clear()     # the whole model now: only the two other shards travel
    whole = runner("pull", "test-org/sharded", "--force")
    assert whole.returncode == 0, whole.stderr
    assert fetched(hub) == {SHARD.format(1), SHARD.format(3)}
    assert not (folder / ".runner-pull-incomplete").exists()
    assert load_spec("test-org/sharded").path == folder


def test_layer_ranges_outside_the_model_are_one_line(hub, sharded_repo):
    hub.repos["test-org/sharded"] = Repo(dict(sharded_repo))
    line = one_line_error(runner("pull", "test-org/sharded", "--layers", "2:9"))
    assert line == "runner: error: --layers 2:9: test-org/sharded has 4 layers (0 to 3)"
    typo = runner("pull", "test-org/sharded", "--layers", "two")      # argparse's usage, as for every option
    assert typo.returncode == 2 and typo.stderr.strip().endswith("argument --layers: 'two' is not START:STOP (e.g. 0:40)")
    assert not fetched(hub)


def test_launch_pull_gives_each_host_its_layers(hub, sharded_repo):
    """Two hosts, both this machine (so both shares land in one cache): the plan's layer ranges,
    one `runner pull --layers` per host, at the listing's commit; together the whole model."""
    pytest.importorskip("mlx")
    hub.repos["test-org/sharded"] = Repo(dict(sharded_repo))
    result = runner("launch", "--hosts", "127.0.0.1,127.0.0.1", "test-org/sharded", "--split", "pipeline",
                    "--host-memory", "16,16", "--quant", "bf16", "--pull")
    assert result.returncode == 0, result.stderr
    shares = re.findall(r"runner: (127\.0\.0\.1#?\d?): pulling test-org/sharded \(layers (\d)-(\d)\) at 0123456789ab",
                        result.stderr)
    assert [(int(a), int(b)) for _, a, b in shares] == [(0, 1), (2, 3)], result.stderr
    assert "test-org/sharded · layers 0-1 of 4: 3 of 4 safetensors files" in result.stderr
    assert "test-org/sharded · layers 2-3 of 4: 3 of 4 safetensors files" in result.stderr
    assert f"every host holds its share of test-org/sharded in {snapshot('test-org/sharded')}\n" in result.stderr
    gets = [e["file"] for e in hub.log if e["method"] == "GET" and e["path"].startswith("/cdn/")]
    assert sorted(gets) == sorted([SHARD.format(1), SHARD.format(2), SHARD.format(4), SHARD.format(3)])  # each once
    assert not (snapshot("test-org/sharded") / ".runner-pull-incomplete").exists()   # both shares: the whole


def test_launch_pull_with_a_tensor_split_gives_each_host_every_shard(hub, sharded_repo):
    pytest.importorskip("mlx")
    hub.repos["test-org/sharded"] = Repo(dict(sharded_repo))
    result = runner("launch", "--hosts", "127.0.0.1,127.0.0.1", "test-org/sharded", "--split", "tensor",
                    "--host-memory", "16,16", "--quant", "bf16", "--pull")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("pulling test-org/sharded (all layers: tensor split) at 0123456789ab") == 2
    assert "layers" not in json.dumps([line for line in result.stdout.splitlines() if line.startswith("ready:")])
    assert fetched(hub) == {SHARD.format(i) for i in (1, 2, 3, 4)}
    assert not (snapshot("test-org/sharded") / ".runner-pull-incomplete").exists()
    assert "runner launch does not start from shares" not in result.stderr


def test_launch_pull_refuses_a_prompt_and_a_folder(hub, tmp_path):
    pytest.importorskip("mlx")
    assert "give no -p" in one_line_error(runner("launch", "--hosts", "127.0.0.1,127.0.0.1", "test-org/x", "--pull",
                                                 "-p", "Hi"))
    assert "local folder" in one_line_error(runner("launch", "--hosts", "127.0.0.1,127.0.0.1", str(tmp_path), "--pull"))


# ---- over ssh: two fake hosts (network namespaces with their own sshd; root only) --------------


@pytest.fixture
def bridge_hub(fake_hosts):
    """test_pull's server on this machine's address on the fake hosts' bridge (.254), its CDN on a
    second address of the bridge (.253): another host, as the Hub's CDN is (huggingface_hub follows
    a redirect to the same host and would miss the Hub's headers there)."""
    import subprocess
    import threading

    from test_pull import LocalHub

    cdn = f"{fake_hosts.subnet}.253"
    bridge = ["dev", f"{fake_hosts.prefix}-br"]
    subprocess.run(["ip", "addr", "add", f"{cdn}/24", *bridge], check=True, capture_output=True)
    server = LocalHub("0.0.0.0")
    server.cdn_host = cdn
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    subprocess.run(["ip", "addr", "del", f"{cdn}/24", *bridge], capture_output=True)


def test_launch_pull_over_ssh_fetches_on_each_host_its_shards_only(fake_hosts, bridge_hub, sharded_repo, tmp_path,
                                                                   monkeypatch):
    """runner launch --pull here; each fake host runs its runner pull over ssh, host 2 into a cache
    folder of its own (a tmpfs in its mount namespace), so each host's files can be told apart."""
    import subprocess

    bridge_hub.repos["test-org/sharded"] = Repo(dict(sharded_repo))
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    endpoint = f"http://{fake_hosts.subnet}.254:{bridge_hub.server_address[1]}"
    env = {**pull_env(HF_ENDPOINT=endpoint), "PATH": fake_hosts.env["PATH"]}
    share = f"hub/models--test-org--sharded/snapshots/{Repo.commit}"
    bridge_hub.hold_after[SHARD.format(1)] = 100_000      # host 1's first shard stalls until released
    with fake_hosts.hidden(2, home):
        launch = subprocess.Popen([str(Path(__file__).parents[1] / ".venv/bin/runner"), "launch", "--hosts",
                                   ",".join(fake_hosts.ips), "test-org/sharded", "--split", "pipeline",
                                   "--host-memory", "16,16", "--quant", "bf16", "--pull"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                  stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60    # host 2 fetches shard 3 while host 1 still waits for shard 1
            while not any(e.get("file") == SHARD.format(3) for e in cdn_gets(bridge_hub)):
                assert time.monotonic() < deadline and launch.poll() is None, "host 2 did not start meanwhile"
                time.sleep(0.05)
            assert not [e for e in cdn_gets(bridge_hub) if e.get("file") == SHARD.format(1) and e["range"]]
        finally:
            bridge_hub.release.set()
            stdout, stderr = launch.communicate(timeout=240)
        result = subprocess.CompletedProcess(launch.args, launch.returncode, stdout, stderr)
        assert result.returncode == 0, result.stderr
        on_host_2 = subprocess.run(["nsenter", "-t", str(fake_hosts.sshd_pid(2)), "-m", "ls", "-A", str(home / share)],
                                   capture_output=True, text=True, check=True).stdout.split()
    assert f"{fake_hosts.ips[0]}: pulling test-org/sharded (layers 0-1)" in result.stderr
    assert f"{fake_hosts.ips[1]}: pulling test-org/sharded (layers 2-3)" in result.stderr
    for ip, layers in zip(fake_hosts.ips, ("0-1", "2-3")):   # both at once, each line named by its host
        assert f"{ip} │ ready: test-org/sharded layers {layers}, " in result.stderr, result.stderr
    on_host_1 = sorted(p.name for p in (home / share).iterdir())
    assert on_host_1 == sorted([".runner-pull-incomplete", "config.json", "model.safetensors.index.json",
                                SHARD.format(1), SHARD.format(2), SHARD.format(4)])
    assert sorted(on_host_2) == sorted([".runner-pull-incomplete", "config.json", "model.safetensors.index.json",
                                        SHARD.format(2), SHARD.format(3), SHARD.format(4)])
    assert json.loads((home / share / ".runner-pull-incomplete").read_text())["layers"] == [0, 2]
    assert sorted(fetched(bridge_hub)) == sorted(SHARD.format(i) for i in (1, 2, 3, 4))
    assert sorted(e["file"] for e in cdn_gets(bridge_hub) if not e["range"]) == sorted(
        SHARD.format(i) for i in (1, 2, 4, 2, 3, 4))           # each host its own, shard 1 resumed once
