"""The MLX backend on one process: real mlx (CPU), real mlx-lm conversion, real tokenizer."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from mlx_helpers import PROMPT, copy_model, greedy_tokens, load, runner

pytest.importorskip("mlx_lm")


@pytest.fixture(scope="module")
def tiny_q4(tiny_llama_dir):
    session = load(tiny_llama_dir, "q4")
    yield session
    session.close()


def test_q4_conversion_is_mlx_lm_format_with_progress_and_is_reused(tiny_llama_dir, tmp_path):
    source = copy_model(tiny_llama_dir, tmp_path / "tiny-reuse")
    progress = []
    session = load(source, "q4", progress)
    folder = session.folder
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    assert folder.parent.name == "mlx" and folder.name == "tiny-reuse-q4"
    stages = [p.stage for p in progress]
    assert any(s.startswith("converting tiny-reuse to MLX (4-bit, group 64)") for s in stages)
    assert ("converting layers", 2, 2) in [(p.stage, p.done, p.total) for p in progress]
    assert ("loading layers", 2, 2) in [(p.stage, p.done, p.total) for p in progress]
    assert not list(folder.parent.glob(".*partial*")), "no temporary folder left behind"
    first_tokens = greedy_tokens(session, max_tokens=8)
    session.close()

    progress.clear()
    session = load(source, "q4", progress)                   # second time: no conversion
    assert not any(p.stage.startswith("converting") for p in progress)
    assert greedy_tokens(session, max_tokens=8) == first_tokens
    session.close()

    # the source changes in place (same name): the old conversion must not be reused
    weights = source / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-64:] = bytes(64)                                   # change some weights, same size
    weights.write_bytes(bytes(raw))
    progress.clear()
    session = load(source, "q4", progress)
    assert any("tiny-reuse-q4 is out of date (the source or runner changed)" in p.stage for p in progress)
    session.close()


def test_greedy_stream_matches_raw_mlx_lm(tiny_q4):
    from mlx_lm.generate import stream_generate

    from runner.backend import Message, Sampling

    prompt = tiny_q4.tokenize([Message("user", PROMPT)])
    raw = list(stream_generate(tiny_q4._model, tiny_q4._tokenizer, prompt, max_tokens=12))
    chunks = list(tiny_q4.stream([Message("user", PROMPT)], Sampling(max_tokens=12)))
    assert [c.token for c in chunks] == [r.token for r in raw]
    reply = [c.token for c in chunks]
    full, before = (tiny_q4._tokenizer.decode(ids, skip_special_tokens=True) for ids in (prompt + reply, prompt))
    assert "".join(c.text for c in chunks) == full[len(before):]   # not mlx-lm's text: it drops the first space
    last = chunks[-1]
    assert last.finish_reason == "length" and last.generation_tokens == 12
    assert last.prompt_tokens == len(prompt) and last.generation_tps > 0 and last.peak_memory > 0
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_chat_template_is_the_tokenizers(tiny_q4, tiny_llama_dir):
    from transformers import AutoTokenizer

    from runner.backend import Message

    messages = [Message("system", "Be brief."), Message("user", PROMPT)]
    expected = AutoTokenizer.from_pretrained(str(tiny_llama_dir)).apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True, return_dict=False)
    assert tiny_q4.tokenize(messages) == list(expected)


def test_seeded_sampling_repeats_and_differs_from_greedy(tiny_q4):
    from runner.backend import Message, Sampling

    hot = Sampling(temperature=1.5, top_p=0.95, max_tokens=12, seed=7)
    first = [c.token for c in tiny_q4.stream([Message("user", PROMPT)], hot)]
    again = [c.token for c in tiny_q4.stream([Message("user", PROMPT)], hot)]
    other = [c.token for c in tiny_q4.stream([Message("user", PROMPT)], Sampling(1.5, 0.95, 12, seed=8))]
    assert first == again
    assert first != other
    assert first != greedy_tokens(tiny_q4, max_tokens=12)


def test_cancel_stops_between_tokens_and_leaves_the_session_usable(tiny_q4):
    from runner.backend import Message, Sampling

    cancel = threading.Event()
    seen = []
    for chunk in tiny_q4.stream([Message("user", PROMPT)], Sampling(max_tokens=200), cancel):
        seen.append(chunk)
        if len(seen) == 3:
            cancel.set()
    assert seen[-1].finish_reason == "cancelled"
    assert len([c for c in seen if c.token is not None]) == 3
    assert greedy_tokens(tiny_q4, max_tokens=6) == greedy_tokens(tiny_q4, max_tokens=6)


def test_logits_are_float32_and_agree_with_greedy(tiny_q4):
    from runner.backend import Message

    prompt = tiny_q4.tokenize([Message("user", PROMPT)])
    logits = tiny_q4.logits(prompt)
    assert logits.dtype.name == "float32" and logits.shape == (len(prompt), 49152)
    assert int(logits[-1].argmax()) == greedy_tokens(tiny_q4, max_tokens=1)[0]


def test_memory_is_measured_by_mlx(tiny_q4):
    import mlx.core as mx

    report = tiny_q4.memory()
    assert report.measured["mlx"] == mx.get_active_memory() > 0
    assert report.peak["mlx"] >= report.measured["mlx"]


def test_eos_list_comes_from_generation_config(tiny_llama_dir, tmp_path):
    """A model that stops on two ids (as Llama 3 does) stops on either."""
    from runner.backend import Message, Sampling

    source = copy_model(tiny_llama_dir, tmp_path / "tiny-eos")
    probe = load(source, "q4")
    first = greedy_tokens(probe, max_tokens=3)
    probe.close()
    # make the model's third greedy token an end-of-sequence id
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, first[2]]}))
    session = load(source, "q4")
    chunks = list(session.stream([Message("user", PROMPT)], Sampling(max_tokens=20)))
    session.close()
    assert [c.token for c in chunks] == first[:3]     # the stop chunk's token is the end-of-sequence id
    assert chunks[-1].finish_reason == "stop" and chunks[-1].generation_tokens == 3


def test_an_mlx_folder_that_is_already_quantized_loads_as_is(tiny_q4):
    from runner.errors import UserInputError

    session = load(tiny_q4.folder, "q4")
    assert session.folder == tiny_q4.folder
    assert greedy_tokens(session, max_tokens=5) == greedy_tokens(tiny_q4, max_tokens=5)
    session.close()
    with pytest.raises(UserInputError, match="already quantized to q4; load it with --quant q4"):
        load(tiny_q4.folder, "q8")


def test_wired_limit_warning_says_what_to_do_and_the_risk():
    from runner_mlx.memory import GB, wired_limit_warning

    assert wired_limit_warning(10 * GB, recommended=96 * GB, wired=96 * GB, ram=128 * GB) is None
    text = wired_limit_warning(100 * GB, recommended=96 * GB, wired=96 * GB, ram=128 * GB)
    assert "sudo sysctl iogpu.wired_limit_mb=112641" in text and "freeze" in text and "8 GB" in text
    text = wired_limit_warning(125 * GB, recommended=96 * GB, wired=96 * GB, ram=128 * GB)
    assert "sysctl" not in text and "smaller quant" in text


# ---- bad input, through the real CLI ------------------------------------------------------------


def test_mlx_not_installed_says_how_to_install(tiny_llama_dir):
    hide_mlx = "import sys\nsys.modules['mlx'] = None\nsys.modules['mlx_lm'] = None"
    done = runner("launch", str(tiny_llama_dir), "--hosts", "127.0.0.1,127.0.0.1", "-p", "hi",
                  python_prelude=hide_mlx, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == ("runner: error: backend 'mlx' cannot run here: mlx and mlx_lm not installed; "
                                   "pip install 'runner[mlx]'")


def test_corrupt_weights_is_a_clear_error(tiny_llama_dir, tmp_path):
    from runner.errors import LoadError

    source = copy_model(tiny_llama_dir, tmp_path / "tiny-truncated")
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    with pytest.raises(LoadError, match=r"model.safetensors: truncated or corrupt \(100000 bytes, its header describes") as caught:
        load(source, "q4")
    assert caught.value.exit_code == 2


def test_missing_tensors_are_one_short_line(tiny_llama_dir, tmp_path):
    """mlx-lm names every missing parameter; the error keeps the count and the first names."""
    from safetensors.numpy import load_file, save_file

    from runner.errors import CorruptWeights

    source = copy_model(tiny_llama_dir, tmp_path / "tiny-embeddings-only")
    weights = source / "model.safetensors"
    save_file({name: array for name, array in load_file(weights).items() if "layers" not in name}, weights)
    with pytest.raises(CorruptWeights, match=r"mlx-lm cannot read these weights \(Missing \d+ parameters: model") as caught:
        load(source, "q4")
    assert len(str(caught.value)) < len(str(source)) + 400 and str(caught.value).endswith("…)")


def test_model_type_mlx_lm_does_not_know_is_refused(tiny_llama_dir, tmp_path):
    from runner.errors import UnsupportedModel
    from runner_mlx.convert import mlx_folder

    source = copy_model(tiny_llama_dir, tmp_path / "tiny-unknown")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "llama_from_the_future"}))
    with pytest.raises(UnsupportedModel, match="mlx-lm .* cannot run model_type 'llama_from_the_future'"):
        mlx_folder(source, "q4")


# ---- the default model, as a person runs it -----------------------------------------------------


@pytest.mark.slow
def test_default_model_answers_paris_in_bf16_and_q8(default_model_dir):
    import subprocess
    import sys

    for quant in ("bf16", "q8"):
        done = subprocess.run([sys.executable, "-m", "runner.cli", "generate", "--backend", "mlx", "--quant", quant,
                               "-p", PROMPT, "--max-tokens", "24"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "Paris" in done.stdout, (quant, done.stdout)
        assert f"mlx on CPU (mlx[cpu]), " in done.stderr


def test_fp32_logits_match_transformers_with_rope_parameters(tiny_llama_dir, tmp_path):
    """transformers 5 writes RoPE as rope_parameters (SmolLM2: theta 100000); mlx-lm 0.32 reads only
    a top-level rope_theta. The MLX session must still compute what transformers computes."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    source = copy_model(tiny_llama_dir, tmp_path / "tiny-rope")
    config = json.loads((source / "config.json").read_text())
    config.pop("rope_theta", None)
    config["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    (source / "config.json").write_text(json.dumps(config))
    ids = list(range(100, 160))                       # long enough for the rotation to matter
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    session = load(source, "fp32")
    got = session.logits(ids)
    session.close()
    assert np.abs(got - expected).max() < 1e-3


def test_the_prompt_and_reply_stay_inside_the_planned_context(tiny_q4):
    """The session holds `context` tokens (256 here), as the plan counted its KV cache: a longer
    prompt is one line before anything runs, and a reply stops where the context ends."""
    from runner.backend import Sampling
    from runner.errors import UserInputError

    with pytest.raises(UserInputError, match="the prompt is 300 tokens but the context is 256"):
        tiny_q4.stream_tokens([1] * 300, Sampling(max_tokens=4))
    chunks = list(tiny_q4.stream_tokens([1] * 250, Sampling(max_tokens=100)))
    assert chunks[-1].generation_tokens <= 6 and chunks[-1].finish_reason in ("length", "stop")
