"""One host's share of a pipeline split: only the safetensors files holding its layers (and the
embeddings and head), from test_pull.py's Hub-compatible server. `runner pull --layers` on this
machine, and `runner launch --pull` over two hosts that are both this machine (no root needed);
tests/test_launch_hosts.py's fake hosts run the same over ssh where they can be made.

Then `runner launch` starting from those shares: a real 4-layer Llama pulled as two shares into two
HF caches converts and loads only what each holds, with the whole model's logits bit for bit (no
root); a share lacking the split's layers is one line; over the fake hosts (root), launch --pull and
then launch -p give one process's greedy tokens."""

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


# ---- runner launch starting from the shares ----------------------------------------------------


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory) -> Path:
    """A real 4-layer tiny Llama (random weights, SmolLM2's tokenizer) cut into one shard per layer,
    the embeddings with layer 0 and the final norm and head with layer 3, as an index names them."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import TINY_LLAMA, _smollm2_tokenizer

    folder = tmp_path_factory.mktemp("sharded-llama")
    torch.manual_seed(0)
    config = LlamaConfig(**dict(TINY_LLAMA, num_hidden_layers=4), initializer_range=0.2, dtype="float32")
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    config.save_pretrained(str(folder))
    weights = model.state_dict()

    def shard_of(tensor: str) -> str:
        layer = re.search(r"layers\.(\d+)\.", tensor)
        index = int(layer.group(1)) + 1 if layer else (1 if "embed_tokens" in tensor else 4)
        return SHARD.format(index)

    weight_map = {tensor: shard_of(tensor) for tensor in weights}
    for shard in sorted(set(weight_map.values())):
        save_file({t: w.contiguous() for t, w in weights.items() if weight_map[t] == shard}, str(folder / shard),
                  metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _smollm2_tokenizer().save_pretrained(str(folder))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}))
    return folder


def served(folder: Path) -> Repo:
    return Repo({p.name: p for p in folder.iterdir() if p.is_file()})


def test_a_share_converts_and_loads_only_its_layers_with_the_whole_model_s_numbers(hub, sharded_llama):
    """`runner pull --layers` twice, into two HF caches: each share converts to MLX only what it
    holds, and its layers chained after the other's give the one-process logits bit for bit."""
    import os

    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.base import create_attention_mask

    from runner_mlx.convert import mlx_folder
    from runner_mlx.session import load_model_folder

    hub.repos["test-org/llama4"] = Repo(served(sharded_llama).files)
    shares = {}
    for layers in ((0, 2), (2, 4)):
        home = Path(os.environ["HF_HOME"]).with_name(f"hf-{layers[0]}")
        pulled = runner("pull", "test-org/llama4", "--layers", f"{layers[0]}:{layers[1]}",
                        env=pull_env(HF_HOME=str(home)))
        assert pulled.returncode == 0, pulled.stderr
        shares[layers] = home / "hub/models--test-org--llama4/snapshots" / Repo.commit
    first, second = shares[(0, 2)], shares[(2, 4)]
    assert not (first / SHARD.format(3)).exists() and not (second / SHARD.format(2)).exists()

    converted_first = mlx_folder(first, "bf16", layers=(0, 2))
    assert converted_first.name == f"{Repo.commit}-bf16-layers0-1"
    written = mx.load(str(converted_first / "model.safetensors"))
    assert {re.search(r"layers\.(\d+)\.", t).group(1) for t in written if "layers." in t} == {"0", "1"}
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(written)
    assert json.loads((converted_first / "runner-source.json").read_text())["layers"] == [0, 2]

    head, _ = load_model_folder(converted_first, layers=(0, 2))
    tail, _ = load_model_folder(mlx_folder(second, "bf16", layers=(2, 4)), layers=(2, 4))
    assert [layer is None for layer in head.model.layers] == [False, False, True, True]
    whole, _ = load_model_folder(mlx_folder(sharded_llama, "bf16"))
    ids = mx.array([[1, 504, 3358, 282, 4649, 30]])
    hidden = head.model.embed_tokens(ids)
    mask = create_attention_mask(hidden, None)
    for layer in [*head.model.layers[:2], *tail.model.layers[2:]]:
        hidden = layer(hidden, mask, cache=None)
    chained = tail.lm_head(tail.model.norm(hidden))
    assert np.array_equal(np.array(chained.astype(mx.float32)), np.array(whole(ids).astype(mx.float32)))


def test_a_share_without_the_layers_asked_is_one_line_and_missing_weights_are_never_made_up(hub, sharded_llama):
    from runner.errors import CorruptWeights, UserInputError
    from runner_mlx.convert import mlx_folder, read_layers

    hub.repos["test-org/llama4"] = Repo(served(sharded_llama).files)
    assert runner("pull", "test-org/llama4", "--layers", "0:2").returncode == 0
    share = snapshot("test-org/llama4")
    with pytest.raises(UserInputError) as refused:
        mlx_folder(share, "bf16", layers=(1, 3), holder="10.0.0.2")
    assert str(refused.value) == ("10.0.0.2 holds layers 0-1 of test-org/llama4; this split needs 1-2 there: "
                                  "runner launch --pull fetches them")
    with pytest.raises(UserInputError) as whole:
        mlx_folder(share, "bf16")
    assert str(whole.value) == ("this machine holds only layers 0-1 of test-org/llama4 (one host's share for "
                                "runner launch): runner pull test-org/llama4 fetches the rest")
    # a marker that claims more than the files hold: refused, not run on mlx's random initial weights
    with pytest.raises(CorruptWeights, match=r"the weights of layers 0-2 .* are not all there \(Missing 9 parameters"):
        read_layers(share, (0, 3))


def test_runner_list_shows_a_share_with_its_layers(hub, sharded_llama):
    hub.repos["test-org/llama4"] = Repo(served(sharded_llama).files)
    assert runner("pull", "test-org/llama4", "--layers", "2:4").returncode == 0
    listed = runner("list")
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith("test-org/llama4"))
    assert line.endswith("share (layers 2-3): runner launch starts from it; runner pull test-org/llama4 fetches the rest")


def test_launch_refuses_a_host_whose_share_lacks_its_layers(hub, sharded_llama):
    """Two ranks on this machine read one HF cache: its share (layers 0-1) serves rank 0 only; the
    launch stops before any rank starts, naming the host and the layers it lacks."""
    pytest.importorskip("mlx")
    hub.repos["test-org/llama4"] = Repo(served(sharded_llama).files)
    assert runner("pull", "test-org/llama4", "--layers", "0:2").returncode == 0
    result = runner("launch", "--hosts", "127.0.0.1,127.0.0.1", "test-org/llama4", "--split", "pipeline",
                    "--host-memory", "16,16", "--quant", "bf16", "-p", "Hi")
    assert one_line_error(result) == ("runner: error: 127.0.0.1#1 holds layers 0-1 of test-org/llama4; this split "
                                      "needs 2-3 there: runner launch --pull fetches them")
    tensor = runner("launch", "--hosts", "127.0.0.1,127.0.0.1", "test-org/llama4", "--split", "tensor",
                    "--host-memory", "16,16", "--quant", "bf16", "-p", "Hi")
    assert one_line_error(tensor) == ("runner: error: 127.0.0.1#0 holds layers 0-1 of test-org/llama4; this split "
                                      "needs 0-3 there: runner launch --pull fetches them")


def test_the_chat_and_serve_source_finds_a_share_and_checks_its_layers_before_any_rank_starts(hub, sharded_llama):
    from runner.errors import UserInputError
    from runner.tui.loading import ModelChoice
    from runner_mlx.launcher import request_hosts
    from runner_mlx.remote import LaunchSource

    hub.repos["test-org/llama4"] = Repo(served(sharded_llama).files)
    assert runner("pull", "test-org/llama4", "--layers", "2:4").returncode == 0
    source = LaunchSource(request_hosts("127.0.0.1,127.0.0.1", None, [16, 16], 5, rank0_here=True), "pipeline", 256)
    choice = ModelChoice("test-org/llama4", "mlx", "bf16", 256)
    spec, plan = source.plan(choice, None)
    assert spec.path == snapshot("test-org/llama4") and plan.parallel == "pipeline"
    with pytest.raises(UserInputError) as refused:
        source.load(choice, spec, plan, None)
    source.close()
    assert str(refused.value) == ("127.0.0.1#0 holds layers 2-3 of test-org/llama4; this split needs 0-1 there: "
                                  "runner launch --pull fetches them")


@pytest.mark.slow
def test_launch_over_ssh_starts_from_each_host_s_share_with_one_process_tokens(fake_hosts, bridge_hub, sharded_llama,
                                                                              tmp_path, monkeypatch, runner_home):
    """The whole user path over two fake hosts: runner launch --pull (each host fetches its share
    into its own HF cache), then the same runner launch with -p: each rank converts and loads only
    the layers its host holds, and the greedy tokens are one process's on the whole model."""
    import shutil

    from mlx_helpers import PROMPT, greedy_tokens, load

    session = load(sharded_llama, "bf16")
    expected = greedy_tokens(session, max_tokens=16)
    session.close()
    bridge_hub.repos["test-org/llama4"] = served(sharded_llama)
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    (runner_home / "cache").mkdir(exist_ok=True)
    endpoint = f"http://{fake_hosts.subnet}.254:{bridge_hub.server_address[1]}"
    env = {**pull_env(HF_ENDPOINT=endpoint), "PATH": fake_hosts.env["PATH"]}
    options = ["--hosts", ",".join(fake_hosts.ips), "test-org/llama4", "--split", "pipeline",
               "--host-memory", "16,16", "--quant", "bf16"]
    share = home / f"hub/models--test-org--llama4/snapshots/{Repo.commit}"
    converted = runner_home / "cache/models/mlx"
    for earlier in converted.glob(f"{Repo.commit}-bf16-layers*"):      # another test's, in this session's cache
        shutil.rmtree(earlier)
    # host 2: an HF cache and a runner cache of its own, as on a second machine
    with fake_hosts.hidden(2, home), fake_hosts.hidden(2, runner_home / "cache"):
        pulled = runner("launch", *options, "--pull", env=env)
        assert pulled.returncode == 0, pulled.stderr
        assert "the same runner launch without --pull starts test-org/llama4 from these shares" in pulled.stderr
        launched = runner("launch", *options, "-p", PROMPT, "--max-tokens", "16", "--show-tokens", env=env)
        assert launched.returncode == 0, launched.stderr
        deadline = time.monotonic() + 15
        while [p for host in (1, 2) for p in fake_hosts.processes(host)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for host in (1, 2) for p in fake_hosts.processes(host)]
    assert sorted(p.name for p in share.glob("*.safetensors")) == [SHARD.format(i) for i in (1, 2, 4)]
    assert json.loads((share / ".runner-pull-incomplete").read_text())["layers"] == [0, 2]
    tokens = re.search(r"runner: tokens: ([\d ]+)", launched.stderr)
    assert tokens and [int(t) for t in tokens.group(1).split()] == expected, launched.stderr
    h1, h2 = fake_hosts.ips
    assert f"rank 0 ({h1}): layers 0-1" in launched.stderr and f"rank 1 ({h2}): layers 2-3" in launched.stderr
    assert f"converting {Repo.commit} to MLX (bfloat16, layers 0-1), once" in launched.stderr
    assert (converted / f"{Repo.commit}-bf16-layers0-1").is_dir()          # host 1's, here
    assert not (converted / f"{Repo.commit}-bf16-layers2-3").exists()      # host 2's stayed on host 2
