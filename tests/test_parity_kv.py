"""`runner parity` across KV cache settings (`--b cuda:bf16,kv8`): a session's logits go through
its own KV cache, quantized as `--kv-bits` quantizes it, so the comparison measures what the
quantized cache does to the model's distributions. Real checkpoints, torch and mlx on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.backend import Message
from runner.cli import main
from runner.errors import BackendUnavailable, UserInputError
from runner.model import load_spec
from runner.parity import (
    Target,
    builtin_prompts,
    capture,
    compare,
    load_session,
    parse_target,
    read_record,
    thresholds_for,
)

PROMPTS = [p for p in builtin_prompts() if p.name in ("capital", "sky")]
CONTEXT = 256


# ---- the syntax -------------------------------------------------------------------------------


def test_a_target_names_its_kv_cache_bits():
    assert parse_target("cuda:bf16,kv8") == Target("cuda", "bf16", 8)
    assert parse_target("mlx:q4,kv4").label == "mlx:q4,kv4"
    assert parse_target("cuda:bf16") == Target("cuda", "bf16", None)
    # a quantized KV cache is judged as at least that many bits
    assert thresholds_for("bf16", "bf16,kv8").scheme == "8-bit"
    assert thresholds_for("bf16", "bf16,kv4").scheme == "4-bit"
    assert thresholds_for("q4", "q4,kv8").scheme == "4-bit"
    for bad, message in (("cuda:bf16,kv3", "kv8 or kv4"), ("cuda:bf16,", "kv8 or kv4"),
                         ("cuda:bf16,kv8,kv4", "kv8 or kv4"), ("cuda:kv8", "unknown quant")):
        with pytest.raises(UserInputError, match=message):
            parse_target(bad)


@pytest.mark.parametrize("argv", [["--b", "cuda:bf16,kv2"], ["--a", "cuda:bf16,8"]])
def test_a_bad_kv_setting_is_one_line_and_exit_2(argv, capsys):
    assert main(["parity", *argv, "--b", "cuda:bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("runner: error:") and "kv8 or kv4" in err[0]


# ---- a tiny real Llama whose heads (64) the KV cache can quantize ---------------------------------


@pytest.fixture(scope="module")
def tiny_llama64_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """conftest's tiny random Llama with heads of 64 values (one KV quantization group), its
    tokenizer files shared."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama-64")
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config.update(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    for item in tiny_llama_dir.iterdir():
        if not (folder / item.name).exists():
            (folder / item.name).symlink_to(item.resolve())
    return folder


def run_capture(folder: Path, target: str, token_ids=None):
    target = parse_target(target)
    try:
        session = load_session(load_spec(str(folder)), target, CONTEXT)
    except BackendUnavailable as error:
        pytest.skip(str(error))
    try:
        return capture(session, PROMPTS, token_ids=token_ids, context=CONTEXT, max_tokens=8, kv_bits=target.kv_bits)
    finally:
        session.close()


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_kv_quantization_shows_in_parity_and_shrinks_with_more_bits(tiny_llama64_dir, backend):
    plain = run_capture(tiny_llama64_dir, f"{backend}:fp32")
    again = run_capture(tiny_llama64_dir, f"{backend}:fp32", plain.prompt_ids())
    kv8 = run_capture(tiny_llama64_dir, f"{backend}:fp32,kv8", plain.prompt_ids())
    kv4 = run_capture(tiny_llama64_dir, f"{backend}:fp32,kv4", plain.prompt_ids())
    assert kv8.label == f"{backend}:fp32,kv8" and kv8.meta["kv_bits"] == 8 and plain.meta["kv_bits"] is None
    same = compare(plain, again)
    assert same.kl_max == 0.0 and same.top1 == 1.0 and same.passed
    at8, at4 = compare(plain, kv8), compare(plain, kv4)
    assert at8.thresholds.scheme == "8-bit" and at4.thresholds.scheme == "4-bit"
    # measured (cuda / mlx): kv8 mean KL 1.5e-3 / 2.0e-3 (top-1 96 % / 97 %), kv4 0.44 / 0.38 (35 % / 43 %)
    assert 0 < at8.kl_mean < at4.kl_mean / 20
    assert at8.kl_mean < 1e-2 < at4.kl_mean


def test_logits_read_the_quantized_cache_as_decoding_does(tiny_llama64_dir):
    """The cuda session's logits() at the last position are the decode path's (forward_step over
    a new quantized cache), and do not depend on how the positions are chunked: every position
    attends to the quantized K/V of all before it, as it does in a reply."""
    import numpy as np
    import torch

    session = load_session(load_spec(str(tiny_llama64_dir)), parse_target("cuda:fp32,kv4"), CONTEXT)
    try:
        ids = session.tokenize([Message("user", "What is the capital of France?")])
        whole = session.logits(ids)
        decoded = session.forward_step(torch.tensor([ids]), session.new_cache()).numpy()
        session.prefill_chunk = 5
        chunked = session.logits(ids)
    finally:
        session.close()
    np.testing.assert_allclose(whole[-1], decoded, atol=1e-4)
    np.testing.assert_allclose(chunked, whole, atol=1e-4)


def test_a_record_keeps_the_kv_setting(tiny_llama64_dir, tmp_path, capsys):
    a, b = str(tmp_path / "a.parity"), str(tmp_path / "b.parity")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\n")
    common = [str(tiny_llama64_dir), "--prompts", str(prompts), "--no-builtin-prompts", "--max-tokens", "4",
              "--context", str(CONTEXT)]
    assert main(["parity", "record", "--backend", "cuda:fp32", "-o", a, *common]) == 0
    assert main(["parity", "record", "--backend", "cuda:fp32,kv4", "-o", b, *common]) == 0
    assert read_record(b).label == "cuda:fp32,kv4" and read_record(a).label == "cuda:fp32"
    capsys.readouterr()
    main(["parity", "compare", a, b, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["results"][0]["other"] == "cuda:fp32,kv4" and report["results"][0]["kl_mean"] > 0
    assert report["results"][0]["thresholds"]["scheme"] == "4-bit"
    assert report["sessions"][0]["kv_bits"] == 4 and report["reference"]["kv_bits"] is None


# ---- the default model, real weights: what the README shows ----------------------------------------


@pytest.mark.slow
def test_kv8_and_kv4_on_the_default_model_through_the_cli(default_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\n\nWhy is the sky blue? Answer in one sentence.\n")
    argv = ["parity", str(default_model_dir), "--a", "cuda:bf16", "--b", "cuda:bf16,kv8", "--b", "cuda:bf16,kv4",
            "--b", "cuda:bf16", "--prompts", str(prompts), "--no-builtin-prompts", "--max-tokens", "8",
            "--context", "512", "--json"]
    main(argv)
    results = {r["other"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    kv8, kv4, same = results["cuda:bf16,kv8"], results["cuda:bf16,kv4"], results["cuda:bf16"]
    assert same["kl_max"] == 0.0 and same["top1"] == 1.0
    # measured: kv8 mean KL 2.9e-3, top-1 98.4 %; kv4 0.18, 86.6 %
    assert 0 < kv8["kl_mean"] < kv4["kl_mean"] / 5
    assert kv4["top1"] < kv8["top1"]


@pytest.mark.gpu
def test_on_a_gpu_the_fast_paths_session_reads_logits_through_the_plain_cache(tiny_llama64_dir):
    """The fast path (static cache, CUDA graphs) serves replies only: a session that uses it gives
    the logits of one that does not, and with kv8 (its quantized static cache) the logits move."""
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from runner.choice import LoadOptions, open_session, resolve
    from runner.hardware import detect_machine

    spec = load_spec(str(tiny_llama64_dir))
    ids = list(range(100, 300))     # 200 of its 256 positions

    def logits_of(kv_bits, fast_decode):
        choice = resolve(spec, detect_machine(), "cuda", "bf16", CONTEXT, kv_bits=kv_bits)
        session = open_session(choice, LoadOptions(chat=False, fast_decode=fast_decode))
        try:
            return session.device_summary, session.logits(ids)
        finally:
            session.close()

    fast_summary, fast = logits_of(None, True)
    _, plain = logits_of(None, False)
    kv8_summary, kv8 = logits_of(8, True)
    assert "fast decode (" in fast_summary and "fast decode (static 8-bit KV cache" in kv8_summary
    np.testing.assert_array_equal(fast, plain)
    assert np.abs(kv8 - plain).max() > 0
