"""Hostile input (issue 21): malformed configs, safetensors headers, indexes, machine files, records
and sampling values are each one `runner: error:` line, exit 1 or 2, no traceback, in bounded time
and memory. The fuzz cases are generated from the default model's real config and the tiny
checkpoint's real files, then fed to `runner plan` and `runner generate` as real subprocesses."""

from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import sys
import time

import pytest

from runner.backend import Sampling
from runner.errors import UserInputError
from runner.model import DEFAULT_MODEL_ID, catalog_config


# ---- sampling values ---------------------------------------------------------------------------

@pytest.mark.parametrize("values,message", [
    ({"temperature": math.nan}, "temperature must be 0 (greedy) or between"),
    ({"temperature": math.inf}, "temperature must be 0 (greedy) or between"),
    ({"temperature": -1.0}, "temperature must be 0"),
    ({"temperature": 1e-300}, "temperature must be 0 (greedy) or between 1e-06"),
    ({"temperature": "0.5"}, "temperature must be"),
    ({"top_p": math.nan}, "top-p must be in (0, 1]"),
    ({"top_p": 0.0}, "top-p must be in (0, 1]"),
    ({"max_tokens": 0}, "max tokens must be"),
    ({"max_tokens": 2.5}, "max tokens must be"),
    ({"seed": 2**64}, "seed must be a whole number from 0 to 2**64 - 1"),
    ({"seed": -1}, "seed must be"),
    ({"seed": 10**5000}, "seed must be"),
])
def test_sampling_refuses_values_the_samplers_cannot_take(values, message):
    with pytest.raises(UserInputError) as caught:
        Sampling(**values)
    assert message in str(caught.value)


def test_sampling_takes_the_edges():
    assert Sampling(temperature=1e-6, top_p=1e-9, seed=2**64 - 1).seed == 2**64 - 1
    assert Sampling(temperature=0, seed=0).temperature == 0


# ---- the fuzz: generated malformed files through `runner plan` and `runner generate` ------------------
#
# Each case is (name, argv, files): files are written under the case's own folder; argv may use
# {dir}. All cases of one test run in ONE child process (python -c DRIVER) that limits its address
# space to MEMORY_LIMIT and calls runner.cli.main for each case with stderr captured and an alarm of
# CASE_SECONDS: a case that escapes with an exception (a traceback for the user), prints more than
# one line, exits 0, or runs out of time or memory fails the test with the case's name.

MEMORY_LIMIT = 4 * 1024**3
CASE_SECONDS = 30
SEED = 21

DRIVER = r"""
import contextlib, io, json, resource, signal, sys, time, traceback
resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
from runner.cli import main

class TimeUp(BaseException):
    pass

def alarm(signum, frame):
    raise TimeUp()

signal.signal(signal.SIGALRM, alarm)
results = []
for name, argv in json.load(sys.stdin):
    stderr, stdout = io.StringIO(), io.StringIO()
    started = time.monotonic()
    escaped = None
    signal.alarm(CASE_SECONDS)
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            code = main(argv)
    except TimeUp:
        code, escaped = None, "ran out of time"
    except BaseException:
        code, escaped = None, traceback.format_exc()
    finally:
        signal.alarm(0)
    results.append({"name": name, "code": code, "stderr": stderr.getvalue(), "escaped": escaped,
                    "seconds": time.monotonic() - started})
print(json.dumps(results))
"""


def run_cases(cases, tmp_path, timeout):
    """Write each case's files, run all cases in one limited child, return its results."""
    runs = []
    for name, argv, files in cases:
        folder = tmp_path / f"case-{len(runs)}"
        folder.mkdir()
        for relative, content in files.items():
            path = folder / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, tuple):          # (header bytes, total size): a sparse weights file
                head, size = content
                path.write_bytes(head)
                os.truncate(path, max(size, len(head)))
            elif isinstance(content, os.PathLike):  # a file of the tiny checkpoint, linked
                path.symlink_to(content)
            else:
                path.write_bytes(content if isinstance(content, bytes) else content.encode())
        runs.append((name, [part.format(dir=folder) for part in argv]))
    env = dict(os.environ, RUNNER_HOME=str(tmp_path / "home"), HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_CACHE", None)
    driver = DRIVER.replace("MEMORY_LIMIT", str(MEMORY_LIMIT)).replace("CASE_SECONDS", str(CASE_SECONDS))
    done = subprocess.run([sys.executable, "-c", driver], input=json.dumps(runs), capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def assert_one_line_errors(results):
    failures = []
    for result in results:
        lines = result["stderr"].strip().splitlines()
        errors = [line for line in lines if line.startswith("runner: error:")]
        ok = (result["escaped"] is None and result["code"] in (1, 2) and len(errors) == 1
              and "Traceback" not in result["stderr"] and result["seconds"] < CASE_SECONDS)
        if not ok:
            failures.append(f"{result['name']}: exit {result['code']}, {result['seconds']:.1f} s, "
                            f"stderr {result['stderr'][-500:]!r}, escaped {str(result['escaped'])[-1500:]}")
    assert not failures, "\n".join(failures)


# -- generators ---------------------------------------------------------------------------------

NUMBER_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                 "max_position_embeddings", "num_key_value_heads", "head_dim")
BAD_VALUES = ("-1", "0", "1000000000000", '"12"', "1.5", "null", "[]", "{}", "true", "9" * 5000, "NaN", "Infinity",
              "-Infinity", '"' + "x" * 100_000 + '"', "[" * 3000 + "]" * 3000)


def malformed_configs(rng: random.Random, count: int):
    """config.json texts that are each wrong in one generated way."""
    base = catalog_config(DEFAULT_MODEL_ID)
    text = json.dumps(base)
    yield "not an object: list", "[1, 2, 3]"
    yield "not an object: string", '"llama"'
    yield "not an object: null", "null"
    yield "deep nesting", "[" * 100_000 + "]" * 100_000
    yield "empty", ""
    for index in range(count):
        kind = rng.choice(("value", "missing", "truncated", "bytes"))
        if kind == "value":
            field, value = rng.choice(NUMBER_FIELDS), rng.choice(BAD_VALUES)
            yield f"{field}={value[:20]}", text.replace(f'"{field}": {json.dumps(base[field])}', f'"{field}": {value}')
        elif kind == "missing":
            field = rng.choice(("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                "vocab_size", "max_position_embeddings", "model_type"))
            yield f"no {field}", json.dumps({k: v for k, v in base.items() if k != field})
        elif kind == "truncated":
            at = rng.randrange(1, len(text) - 1)
            yield f"cut at {at}", text[:at]
        else:
            at = rng.randrange(0, len(text))
            yield f"byte 0xff at {at}", text[:at].encode() + b"\xff" + text[at:].encode()


def malformed_headers(rng: random.Random, real_header: dict, data_size: int):
    """(name, header bytes, file size) of safetensors files that are each wrong in one way."""
    def file(header, size=None):
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw, 8 + len(raw) + (data_size if size is None else size)

    names = [n for n in real_header if n != "__metadata__"]
    yield "empty file", b"", 0
    yield "4 bytes", b"\x01\x02\x03\x04", 4
    raw = json.dumps(real_header).encode()
    yield "length 2**63", struct.pack("<Q", 2**63) + raw, 8 + len(raw) + data_size
    yield "length beyond the file", struct.pack("<Q", len(raw) + 10) + raw, 8 + len(raw)
    yield "header a list", *file(b"[1, 2]")
    yield "header not UTF-8", *file(b"\xff" * 16)
    yield "header with NaN", *file(b'{"a": NaN}')
    yield "header nested", *file(b"[" * 5000 + b"]" * 5000)
    yield "cut data", *file(real_header, data_size // 2)
    yield "extra data", *file(real_header, data_size + 7)
    for index in range(6):
        name = rng.choice(names)
        header = json.loads(raw)
        change = rng.choice(("dtype", "shape", "offsets", "entry", "drop"))
        if change == "dtype":
            header[name]["dtype"] = rng.choice(("F99", 5, None, "BF16" if header[name]["dtype"] != "BF16" else "F64"))
        elif change == "shape":
            header[name]["shape"] = rng.choice(("[]x", [-1], [2**40, 2**40], ["64"], None))
        elif change == "offsets":
            header[name]["data_offsets"] = rng.choice(([5, 1], [0], None, [0, 2**70], "0-8"))
        elif change == "entry":
            header[name] = rng.choice(("F32", [], None, 0))
        else:
            del header[name]
        yield f"{change} of {name}", *file(header)


def tiny_header(tiny_llama_dir):
    path = tiny_llama_dir / "model.safetensors"
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    return header, path.stat().st_size - 8 - length


def model_files(tiny_llama_dir):
    """The tiny checkpoint's small files, linked into a case's folder (its weights are the case's own)."""
    return {p.name: p for p in tiny_llama_dir.iterdir() if p.name != "model.safetensors"}


def malformed_indexes(rng: random.Random, real_names: list[str]):
    good = {name: "model.safetensors" for name in real_names}
    yield "index a list", b"[]"
    yield "index not JSON", b'{"weight_map": '
    yield "index with NaN", b'{"weight_map": NaN}'
    yield "weight_map a list", json.dumps({"weight_map": list(good)})
    yield "weight_map empty", json.dumps({"weight_map": {}})
    yield "shard outside the folder", json.dumps({"weight_map": dict(good, **{real_names[0]: "../../etc/passwd"})})
    yield "shard not a string", json.dumps({"weight_map": dict(good, **{real_names[0]: 7})})
    yield "shard missing", json.dumps({"weight_map": dict(good, **{real_names[0]: "model-00002.safetensors"})})
    yield "index not UTF-8", b'{"weight_map": {"\xff": "model.safetensors"}}'


def malformed_machine_files(rng: random.Random):
    yield "self.toml", "self.toml", '[[hosts]]\ngpus = "self.toml"\n'
    yield "self.json", "self.json", '{"hosts": [{"mac": "self.json"}]}'
    yield "hosts a table", "m.json", '{"hosts": {"a": 1}}'
    yield "no hosts", "m.toml", 'label = "x"\n'
    yield "toml nested", "m.toml", "a = " + "[" * 5000 + "]" * 5000
    yield "json nested", "m.json", "[" * 5000 + "]" * 5000
    yield "not UTF-8", "m.toml", b"\xff\xfe[[hosts]]"
    yield "5000-digit ram", "m.json", '{"hosts": [{"ram": ' + "9" * 5000 + "}]}"
    yield "too many hosts", "m.json", json.dumps({"hosts": [{"ram": "8GB"}] * 100})
    for index in range(8):
        key = rng.choice(("gpus", "mac", "ram", "disk", "wired_limit"))
        value = rng.choice(("", "0GB", "-5GB", "9" * 400 + "TB", "99999xA100", "A100-7GB", "M2Ultra-0GB",
                            ["A100"] * 70, None, {"x": 1}, 1e308, "nan", "a" * 5000))
        host = {"mac": "M2Ultra-192GB"} if key == "wired_limit" else {}
        host[key] = value
        if key in ("ram", "disk"):
            host.setdefault("gpus", "A100")
        yield f"{key}={str(value)[:20]}", "m.json", json.dumps({"hosts": [host]})


# -- the tests ------------------------------------------------------------------------------------

def test_fuzz_plan_with_malformed_configs_and_machine_files(tmp_path):
    rng = random.Random(SEED)
    cases = [(f"plan config {name}", ["plan", "{dir}"], {"config.json": text})
             for name, text in malformed_configs(rng, 30)]
    cases += [(f"plan machine {name}", ["plan", "meta-llama/Llama-3.1-8B-Instruct", "--machine", f"{{dir}}/{file}"],
               {file: content}) for name, file, content in malformed_machine_files(rng)]
    cases.append(("plan overlong path", ["plan", "/" + "a" * 5000], {}))
    cases.append(("plan overlong machine path", ["plan", "--machine", "/" + "a" * 5000 + ".toml"], {}))
    started = time.monotonic()
    results = run_cases(cases, tmp_path, timeout=120)
    assert len(results) == len(cases) > 50
    assert_one_line_errors(results)
    assert time.monotonic() - started < 60


def test_fuzz_generate_with_malformed_configs(tmp_path):
    rng = random.Random(SEED + 1)
    cases = [(f"generate config {name}", ["generate", "{dir}", "-p", "hi", "--max-tokens", "2"],
              {"config.json": text}) for name, text in malformed_configs(rng, 10)]
    cases += [("generate --temperature nan", ["generate", "-p", "hi", "--temperature", "nan"], {}),
              ("generate --seed 2**64", ["generate", "-p", "hi", "--seed", str(2**64)], {})]
    assert_one_line_errors(run_cases(cases, tmp_path, timeout=120))


@pytest.mark.slow
def test_fuzz_generate_with_malformed_headers_and_indexes(tmp_path, tiny_llama_dir):
    """Through the torch backend's load (torch imported once in the child): each refused in one line."""
    rng = random.Random(SEED + 2)
    header, data_size = tiny_header(tiny_llama_dir)
    argv = ["generate", "{dir}", "-p", "hi", "--max-tokens", "2"]
    cases = [(f"generate header {name}", argv, {**model_files(tiny_llama_dir), "model.safetensors": (head, size)})
             for name, head, size in malformed_headers(rng, header, data_size)]
    weights = tiny_llama_dir / "model.safetensors"
    cases.append(("generate tokenizer_config nested", argv,
                  {**model_files(tiny_llama_dir), "model.safetensors": tiny_llama_dir / "model.safetensors",
                   "tokenizer_config.json": "[" * 100_000 + "]" * 100_000}))
    cases += [(f"generate index {name}", argv, {**model_files(tiny_llama_dir), "model.safetensors": weights,
                                                "model.safetensors.index.json": index})
              for name, index in malformed_indexes(rng, [n for n in header if n != "__metadata__"])]
    assert_one_line_errors(run_cases(cases, tmp_path, timeout=600))
