"""`runner chat` and `runner generate` given the id of a model of which the Hugging Face cache holds
only one host's share of a split (`runner pull --layers`, `runner launch --pull`): one line that
says so and what to run instead, not "not in the Hugging Face cache" (nor, for a catalog id,
"download them first" when a share of it is here)."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_LLAMA
from runner.cli import main


def write_share(cache, model_id: str, layers: tuple[int, int]) -> None:
    """A snapshot as `runner pull MODEL --layers A:B` leaves it: config.json, its marker with the range."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(dict(TINY_LLAMA, num_hidden_layers=4, model_type="llama")))
    (snapshot / ".runner-pull-incomplete").write_text(json.dumps({"verified": {}, "layers": list(layers)}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)


@pytest.mark.parametrize("command", [["generate", "-p", "Hi"], ["chat"]])
@pytest.mark.parametrize("model_id", ["test-org/sharded", "meta-llama/Llama-3.1-8B-Instruct"])   # the second: in the catalog
def test_a_share_is_one_line_naming_it(tmp_path, monkeypatch, capsys, command, model_id):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    write_share(tmp_path, model_id, (1, 3))
    assert main([command[0], model_id, *command[1:]]) == 2
    err = capsys.readouterr().err
    assert err == (f"runner: error: {model_id}: this Hugging Face cache holds only layers 1-2 of it, one host's "
                   f"share of a split (runner pull --layers); run it over the hosts with "
                   f"`runner launch --hosts A,B {model_id}`, or download the rest: runner pull {model_id}\n")


def test_a_pull_cut_off_is_not_called_a_share(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    write_share(tmp_path, "test-org/cut", (0, 1))
    marker = next(tmp_path.glob("models--test-org--cut/snapshots/*")) / ".runner-pull-incomplete"
    marker.write_text(json.dumps({"verified": {}}))        # a whole-model pull that did not finish
    assert main(["generate", "test-org/cut", "-p", "Hi"]) == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err
