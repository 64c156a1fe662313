"""The comparison math, the record format and the CLI of `runner parity`, on arrays made here.

No backend is loaded: these captures are built from logits arrays the way `capture()` builds them
from a session (the real-backend tests are in test_parity_backends.py).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from runner.cli import main
from runner.errors import UserInputError
from runner.parity import (
    DEFAULT_THRESHOLDS,
    Capture,
    PromptCapture,
    builtin_prompts,
    common_prefix,
    compare,
    kl_exact,
    kl_top_k,
    log_softmax64,
    parse_target,
    read_prompts,
    read_record,
    summarize_logits,
    thresholds_for,
    top_k,
    write_record,
)

VOCAB = 300


def make_capture(logits_by_prompt, ids_by_prompt, prompt_lengths, quant="fp32", config="c0", tokenizer="t0",
                 keep_logits=True, k=64):
    prompts = []
    for index, (logits, ids, p) in enumerate(zip(logits_by_prompt, ids_by_prompt, prompt_lengths)):
        ids = np.asarray(ids, dtype=np.int64)
        logits = np.asarray(logits, dtype=np.float32)
        top_ids, top_logits, lse, next_lp = summarize_logits(ids, logits, k)
        prompts.append(PromptCapture(f"p{index}", ids[:p], ids[p:], f"reply {index}", top_ids, top_logits, lse,
                                     next_lp, logits if keep_logits else None))
    meta = {"format": "runner-parity/1", "model": f"model-{config}", "config_sha256": config,
            "tokenizer_sha256": tokenizer, "backend": "test", "quant": quant,
            "prompts": [{"name": p.name, "messages": []} for p in prompts]}
    return Capture(meta, prompts)


@pytest.fixture
def pair():
    """A reference and a slightly perturbed copy: 3 prompts of 20 positions, 12 of them prompt."""
    rng = np.random.default_rng(0)
    logits = [rng.normal(0, 3, (20, VOCAB)) for _ in range(3)]
    ids = [rng.integers(0, VOCAB, 20) for _ in range(3)]
    noisy = [x + rng.normal(0, 0.05, x.shape) for x in logits]
    return make_capture(logits, ids, [12] * 3), make_capture(noisy, ids, [12] * 3, quant="nf4")


def test_log_softmax64_is_stable_and_normalized():
    logits = np.array([[1000.0, 999.0, -1000.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    logprobs = log_softmax64(logits)
    assert logprobs.dtype == np.float64
    assert np.allclose(np.exp(logprobs).sum(axis=1), 1.0)
    assert logprobs[0, 0] == pytest.approx(-np.log1p(np.exp(-1.0)))
    assert np.allclose(logprobs[1], -np.log(3))


def test_kl_exact_against_a_hand_computed_value():
    p, q = np.array([0.75, 0.25]), np.array([0.5, 0.5])
    expected = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)
    assert kl_exact(np.log(p)[None], np.log(q)[None])[0] == pytest.approx(expected, rel=1e-12)
    same = np.random.default_rng(1).normal(size=(4, VOCAB))
    assert np.allclose(kl_exact(same, same), 0.0, atol=1e-15)


def test_top_k_is_sorted_and_breaks_ties_like_argmax():
    logits = np.array([[0.0, 5.0, 5.0, 1.0, 3.0]], dtype=np.float32)
    ids, values = top_k(logits, 3)
    assert ids.tolist() == [[1, 2, 4]]
    assert values.tolist() == [[5.0, 5.0, 3.0]]
    assert ids[0, 0] == np.argmax(logits[0])


def test_kl_from_top_k_is_a_lower_bound_that_is_close_for_peaked_distributions():
    rng = np.random.default_rng(2)
    p = rng.normal(0, 4, (50, VOCAB))
    q = p + rng.normal(0, 0.3, p.shape)
    exact = kl_exact(p, q)
    lp, lq = log_softmax64(p), log_softmax64(q)
    pi, _ = top_k(p, 64)
    qi, _ = top_k(q, 64)
    estimate = kl_top_k(pi, np.take_along_axis(lp, pi.astype(np.int64), 1), qi,
                        np.take_along_axis(lq, qi.astype(np.int64), 1))
    assert np.all(estimate <= exact + 1e-12)
    assert estimate.mean() > 0.9 * exact.mean()
    full = np.tile(np.arange(VOCAB), (50, 1))
    assert np.allclose(kl_top_k(full, lp, full, lq), exact, rtol=1e-9, atol=1e-12)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


def test_identical_captures_are_exactly_equal(pair):
    reference, _ = pair
    result = compare(reference, reference)
    assert result.kl_mean == 0.0 and result.kl_max == 0.0
    assert result.top1 == 1.0 and result.top5 == 1.0
    assert result.greedy_same == 3
    assert result.passed and result.thresholds.scheme == "fp32"


def test_a_small_perturbation_is_measured_and_judged_by_the_looser_side(pair):
    reference, other = pair
    result = compare(reference, other)
    assert result.thresholds == DEFAULT_THRESHOLDS["4-bit"]
    assert result.kl_exact
    assert 0 < result.kl_mean < 1e-2
    assert result.kl_p99 <= result.kl_max
    assert result.positions == 60
    assert result.passed
    strict = compare(reference, other, thresholds_for("fp32", "fp32"))
    assert not strict.passed and "mean KL" in strict.reasons[0]


def test_a_different_model_fails_on_kl_and_top1(pair):
    reference, _ = pair
    rng = np.random.default_rng(3)
    unrelated = make_capture([rng.normal(0, 3, (20, VOCAB)) for _ in range(3)],
                             [p.token_ids for p in reference.prompts], [12] * 3, quant="q4")
    result = compare(reference, unrelated)
    assert not result.passed
    assert result.top1 < 0.2
    assert any("top-1" in reason for reason in result.reasons)


def test_nan_logits_fail_the_verdict(pair):
    reference, _ = pair
    broken = [np.where(np.arange(VOCAB) == 7, np.nan, p.logits) for p in reference.prompts]
    result = compare(reference, make_capture(broken, [p.token_ids for p in reference.prompts], [12] * 3))
    assert not result.passed


def test_positions_stop_after_the_first_different_reply_token(pair):
    reference, _ = pair
    ids = [p.token_ids.copy() for p in reference.prompts]
    ids[0][15] = (ids[0][15] + 1) % VOCAB   # reply token 3 of prompt 0 differs
    other = make_capture([p.logits for p in reference.prompts], ids, [12] * 3)
    result = compare(reference, other)
    # prompt 0: positions 0..15 (position 14 predicted token 15, where they part); others: all 20
    assert result.positions == 15 + 20 + 20
    assert result.greedy_first_diff == [3, None, None]
    assert result.greedy_matched == [3, 8, 8]
    assert result.greedy_same == 2


def test_perplexity_uses_prompt_tokens_only():
    logits = np.zeros((6, VOCAB))          # uniform: perplexity is the vocabulary size
    result = compare(make_capture([logits], [[1, 2, 3, 4, 5, 6]], [4]), make_capture([logits], [[1, 2, 3, 4, 5, 6]], [4]))
    assert result.ppl_reference == pytest.approx(VOCAB)


def test_thresholds():
    assert thresholds_for("fp32", "fp32").scheme == "fp32"
    assert thresholds_for("bf16", "fp32").scheme == "16-bit"
    assert thresholds_for("q8", "bf16").scheme == "8-bit"
    assert thresholds_for("int8", "q4").scheme == "4-bit"
    custom = thresholds_for("fp32", "nf4", max_kl=0.5, min_top1=0.5)
    assert (custom.max_kl, custom.min_top1) == (0.5, 0.5)
    with pytest.raises(UserInputError, match="unknown quant"):
        thresholds_for("fp32", "q3")


def test_parse_target():
    assert parse_target("cuda:bf16").label == "cuda:bf16"
    for bad in ("cuda", ":bf16", "mlx:"):
        with pytest.raises(UserInputError, match="BACKEND:QUANT"):
            parse_target(bad)
    with pytest.raises(UserInputError, match="unknown quant"):
        parse_target("mlx:q3")
    with pytest.raises(UserInputError, match="unknown backend 'foo'"):     # the backend before the quant
        parse_target("foo:q3")


def test_prompts(tmp_path):
    builtin = builtin_prompts()
    assert builtin[0].name == "capital" and "France" in builtin[0].messages[0].content
    assert len({p.name for p in builtin}) == len(builtin)
    text = tmp_path / "mine.txt"
    text.write_text("First prompt\non two lines.\n\n\nSecond prompt.\n")
    prompts = read_prompts(text)
    assert [p.name for p in prompts] == ["mine-1", "mine-2"]
    assert prompts[0].messages[0].content == "First prompt\non two lines."
    as_json = tmp_path / "mine.json"
    as_json.write_text(json.dumps(["plain", {"name": "x", "messages": [{"role": "user", "content": "hi"}]}]))
    assert [p.name for p in read_prompts(as_json)] == ["prompt-1", "x"]
    as_json.write_text('[{"messages": [{"role": "robot", "content": "hi"}]}]')
    with pytest.raises(UserInputError, match="role"):
        read_prompts(as_json)
    with pytest.raises(UserInputError, match="cannot read"):
        read_prompts(tmp_path / "missing.txt")


def test_record_round_trip(tmp_path, pair):
    reference, other = pair
    path = write_record(reference, tmp_path / "a.parity")
    loaded = read_record(path)
    assert loaded.meta["model"] == reference.meta["model"]
    for a, b in zip(reference.prompts, loaded.prompts):
        assert b.logits is None and b.reply_text == a.reply_text
        for name in ("prompt_ids", "reply_ids", "top_ids", "top_logits", "logsumexp", "next_logprob"):
            assert np.array_equal(getattr(a, name), getattr(b, name)) and getattr(a, name).dtype == getattr(b, name).dtype
    in_memory = compare(reference, other)
    from_records = compare(loaded, read_record(write_record(other, tmp_path / "b.parity")))
    assert not from_records.kl_exact
    assert from_records.top1 == in_memory.top1 and from_records.top5 == in_memory.top5
    assert from_records.ppl_other == pytest.approx(in_memory.ppl_other, rel=1e-12)
    assert from_records.kl_mean <= in_memory.kl_mean
    assert from_records.kl_mean == pytest.approx(in_memory.kl_mean, rel=0.5)


def test_records_of_different_models_tokenizers_or_prompts_are_refused(pair):
    reference, _ = pair
    ids = [p.token_ids for p in reference.prompts]
    logits = [p.logits for p in reference.prompts]
    with pytest.raises(UserInputError, match="not the same model config"):
        compare(reference, make_capture(logits, ids, [12] * 3, config="c1"))
    with pytest.raises(UserInputError, match="not the same tokenizer"):
        compare(reference, make_capture(logits, ids, [12] * 3, tokenizer="t1"))
    with pytest.raises(UserInputError, match="different token ids"):
        compare(reference, make_capture(logits, ids, [11] * 3))


def test_not_a_record_is_refused(tmp_path):
    bogus = tmp_path / "bogus.parity"
    bogus.write_text("hello")
    with pytest.raises(UserInputError, match="not a runner parity record"):
        read_record(bogus)


def test_cli_compare_prints_a_table_and_sets_the_exit_code(tmp_path, pair, capsys):
    reference, other = pair
    a = str(write_record(reference, tmp_path / "a.parity"))
    b = str(write_record(other, tmp_path / "b.parity"))
    assert main(["parity", "compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "test:nf4" in out and "PASS" in out and "a lower bound" in out
    assert main(["parity", "compare", a, b, "--max-kl", "1e-9"]) == 1
    assert "FAIL: mean KL" in capsys.readouterr().out
    assert main(["parity", "compare", a, b, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["results"][0]["verdict"] == "PASS"


def test_cli_refuses_a_record_of_another_model(tmp_path, pair, capsys):
    reference, _ = pair
    other = make_capture([p.logits for p in reference.prompts], [p.token_ids for p in reference.prompts], [12] * 3,
                         config="c1")
    a = str(write_record(reference, tmp_path / "a.parity"))
    b = str(write_record(other, tmp_path / "b.parity"))
    assert main(["parity", "compare", a, b]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not the same model config" in err[0] and "b.parity" in err[0]


@pytest.mark.parametrize("argv, message", [
    (["parity", "--b", "cuda"], "BACKEND:QUANT"),
    (["parity", "--b", "cuda:q3"], "unknown quant"),
    (["parity"], "--b BACKEND:QUANT"),
    (["parity", "compare", "only-one.parity"], "two or more records"),
    (["parity", "compare", "x.parity", "y.parity"], "no such record"),
    (["parity", "record", "--backend", "mlx:q4"], "-o FILE"),
    (["parity", "record", "-o", "x.parity"], "--backend"),
    (["parity", "--b", "cuda:nf4", "--min-top1", "90"], "fraction"),
    (["parity", "--b", "cuda:nf4", "-o", "x.parity"], "record"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_prefix_shared_by_prompts_is_counted_once():
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 3, (10, VOCAB))
    first = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    second = [5, 6, 7, 8, 1, 2, 3, 4, 13, 14]     # the same first 4 tokens (a system prompt)
    reference = make_capture([logits, logits], [first, second], [8, 8])
    other = make_capture([logits + 0.1 * rng.normal(size=logits.shape), logits], [first, second], [8, 8])
    result = compare(reference, other)
    assert result.positions == 10 + 6


def test_model_identity_ignores_how_transformers_wrote_the_config(tmp_path):
    from runner.parity import config_sha256

    v4 = {"model_type": "llama", "hidden_size": 576, "rope_theta": 100000, "rope_scaling": None,
          "torch_dtype": "bfloat16", "transformers_version": "4.42.3"}
    v5 = {"model_type": "llama", "hidden_size": 576, "dtype": "float32", "transformers_version": "5.24.0",
          "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    other_theta = dict(v4, rope_theta=10000)
    hashes = []
    for name, config in (("v4", v4), ("v5", v5), ("theta", other_theta)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        hashes.append(config_sha256(tmp_path / name))
    assert hashes[0] == hashes[1] != hashes[2]


# ---- records of the wrong shape: one clear error (issue 21) -------------------------------------

def _tampered(tmp_path, pair, meta_change=None, arrays=None, raw_meta=None):
    """A record written by write_record, then rewritten with its meta changed or arrays replaced."""
    import io
    import zipfile

    source = write_record(pair[0], tmp_path / "good.parity")
    path = tmp_path / "bad.parity"
    with zipfile.ZipFile(source) as good, zipfile.ZipFile(path, "w") as bad:
        for info in good.infolist():
            data = good.read(info.filename)
            if info.filename == "meta.json":
                meta = json.loads(data)
                if meta_change is not None:
                    meta_change(meta)
                data = raw_meta if raw_meta is not None else json.dumps(meta)
            elif arrays and info.filename in arrays:
                replacement = arrays[info.filename]
                if isinstance(replacement, bytes):
                    data = replacement
                else:
                    buffer = io.BytesIO()
                    np.save(buffer, replacement, allow_pickle=False)
                    data = buffer.getvalue()
            bad.writestr(info.filename, data)
    return path


@pytest.mark.parametrize("change,message", [
    (lambda m: m.clear(), "format None"),
    (lambda m: m.update(quant=["fp32"]), "'quant' must be a string"),
    (lambda m: m.update(quant="fp3"), "unknown quant 'fp3'"),
    (lambda m: m.update(backend=None), "'backend' must be a string"),
    (lambda m: m.update(config_sha256=5), "'config_sha256' must be a string"),
    (lambda m: m.update(prompts="p0"), "'prompts' must be a list of objects"),
    (lambda m: m.update(prompts=[1, 2, 3]), "'prompts' must be a list of objects"),
    (lambda m: m.update(replies=["a"]), "'replies' must be a list of strings, one per prompt"),
    (lambda m: m.update(replies=None), "'replies' must be a list of strings"),
    (lambda m: m.update(prompts=[], replies=[]), "no prompts"),
])
def test_record_with_a_wrong_meta_is_refused(tmp_path, pair, change, message):
    with pytest.raises(UserInputError, match=re.escape(message)):
        read_record(_tampered(tmp_path, pair, change))


@pytest.mark.parametrize("raw,message", [
    (b"[1, 2]", "meta.json: not a JSON object"),
    (b"\xff\xfe", "not UTF-8"),
    (b'{"format": NaN}', "NaN is not a number JSON allows"),
    (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
])
def test_record_with_malformed_meta_json_is_refused(tmp_path, pair, raw, message):
    with pytest.raises(UserInputError, match=re.escape(message)):
        read_record(_tampered(tmp_path, pair, raw_meta=raw))


@pytest.mark.parametrize("arrays,message", [
    ({"0/top_ids.npy": np.zeros((3, 64), np.int32)}, "prompt 1: top_ids has shape (3, 64), expected (20, 64)"),
    ({"1/logsumexp.npy": np.zeros(5)}, "prompt 2: logsumexp has shape (5,)"),
    ({"0/prompt_ids.npy": np.zeros(12, np.float32)}, "0/prompt_ids.npy is 1-D float32, not 1-D integers"),
    ({"0/top_logits.npy": np.zeros(20)}, "0/top_logits.npy is 1-D float64, not 2-D floats"),
    ({"0/reply_ids.npy": np.array(["a"])}, "0/reply_ids.npy is 1-D <U1"),
    ({"0/logsumexp.npy": b"not an array"}, "not a runner parity record"),
    ({"0/logsumexp.npy": "huge"}, "claims (10000000000,)"),
])
def test_record_with_arrays_of_the_wrong_shape_is_refused(tmp_path, pair, arrays, message):
    import io

    if arrays.get("0/logsumexp.npy") == "huge":   # a header claiming 80 GB, with no data behind it
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**10,)})
        arrays = {"0/logsumexp.npy": header.getvalue()}
    with pytest.raises(UserInputError, match=re.escape(message)):
        read_record(_tampered(tmp_path, pair, arrays=arrays))


def test_record_that_is_not_a_zip_or_is_a_zip_bomb(tmp_path, monkeypatch):
    import zipfile

    from runner import parity

    path = tmp_path / "x.parity"
    path.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(UserInputError, match="not a runner parity record"):
        read_record(path)
    # sizes are read from the zip's directory before anything is decompressed (limits scaled down here)
    monkeypatch.setattr(parity, "RECORD_MAX_ENTRY_BYTES", 1 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("meta.json", b" " * (1 << 20 | 1))      # 1 MiB of spaces: 1 kB compressed
    assert path.stat().st_size < 10_000
    with pytest.raises(UserInputError, match="meta.json is larger than any record runner writes"):
        read_record(path)


def test_prompts_file_that_is_not_utf8_or_json(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(b"\xff\xfe[]")
    with pytest.raises(UserInputError, match="not UTF-8"):
        read_prompts(path)
    path.write_bytes(b'["' + b"[" * 5000)
    with pytest.raises(UserInputError, match="malformed JSON"):
        read_prompts(path)
    path.write_bytes(b"[" * 5000 + b"]" * 5000)
    with pytest.raises(UserInputError):
        read_prompts(path)


def test_identity_of_a_hostile_folder(tmp_path):
    from runner.parity import config_sha256

    (tmp_path / "config.json").write_text('{"eos_token_id": [2, "x", true, 7], "rope_theta": "ten thousand"}')
    assert len(config_sha256(tmp_path)) == 64
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(UserInputError, match="holds a list, not a JSON object"):
        config_sha256(tmp_path)
