"""llama.cpp with CUDA on one GPU, in one run: runner's llamacpp backend with its layers offloaded
(issue 20), and llama.cpp's own tools against runner's fast path on the Llama-3.1-8B shape with
random weights (issue 19's peer side by side).

    # here, once: a trimmed copy of the llama.cpp that llama-cpp-python 0.3.36 binds, its Python
    # package and diskcache, in the ignored folder .llamacpp (18 MiB, carried to the GPU machine)
    python3 bench/llamacpp_gpu.py prepare --sdist /tmp/lcp/llama_cpp_python-0.3.36
    # on the GPU machine (nothing to download there: nvcc, CMake, ninja, torch are in its image)
    PYTHONPATH=.bnb:.devpy:src:backends:tests RUNNER_TEST_TOKENIZER=$PWD/.devtok \
        python3 bench/llamacpp_gpu.py run --out $OUT
    # the same flow on a CPU, small: a 2-layer checkpoint, a CPU-only build, no runner CUDA part
    .venv/bin/python bench/llamacpp_gpu.py run --tiny --jobs 2

`run`, in this order (the build runs in the background from the start, niced; it and the
converter are stopped with SIGSTOP while anything is timed):
1. build llama.cpp (-DGGML_CUDA=ON, sm_90 only) : libllama + ggml, llama-bench, llama-quantize;
2. write the 8B-shaped random BF16 checkpoint (bench/cuda_speed.py's write_checkpoint) with the
   repo's SmolLM2 tokenizer (the converter pads its 49,152 tokens to the config's 128,256);
3. convert it with llama.cpp's convert_hf_to_gguf.py (BF16); meanwhile the copy bandwidth
   (cuda_speed.copy_bandwidth) and runner's NF4 and BF16 fast path on the checkpoint (cuda_speed's
   load, FastDecoder and decode_rate: 256 tokens after a 16-token prompt);
4. once built: pytest tests/test_llamacpp_gpu.py; llama-quantize the BF16 file to Q4_0;
   llama-bench -n 128 -p 0 -ngl 99 on Q4_0 and BF16;
5. runner's llamacpp backend on both files as a user runs it: `runner plan`, `runner generate`,
   sessions through resolve/open_session: llama.cpp's buffers against the plan, decode tok/s
   against raw llama-cpp-python (Llama.generate, top-k 1) on the same file, alternating rounds,
   greedy tokens and logits against the same file on the CPU (the plan for a machine without a GPU).
Prints a table last; JSON and logs under --out. The backend steps and the test run in processes
that never import torch, as `runner generate file.gguf` does; `torch probe` loads the Q4_0 file in
a process that has (a build without `--exclude-libs` crashed there: bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "backends"), str(ROOT / "bench")]
SOURCE = ROOT / ".llamacpp" / "llama.cpp"     # the trimmed llama.cpp (prepare)
PYTHON_PACKAGES = ROOT / ".llamacpp" / "py"   # llama_cpp (llama-cpp-python 0.3.36) and diskcache
RESULTS: dict = {}
PROMPT = "Count from {start} to 1000, one number per line."
PAUSED: list[subprocess.Popen] = []           # background work stopped while something is timed


def log(*parts) -> None:
    print(*parts, flush=True)


def record(section: str, **values) -> None:
    RESULTS.setdefault(section, {}).update(values)
    log(f"[{section}]", json.dumps(values, default=str))


class quiet:
    """SIGSTOP the background build and converter while timing, SIGCONT after."""

    def __enter__(self):
        for process in PAUSED:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGSTOP)

    def __exit__(self, *exc):
        for process in PAUSED:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGCONT)


# ---- prepare (here) --------------------------------------------------------------------------

DROP = ["docs", "models", "tests", "benches", "examples", "pocs", "media", "app", "skills", "scripts", "ci",
        "grammars", "docker", ".git", "vendor/miniaudio", "vendor/stb"]


def prepare(sdist: Path) -> None:
    """The trimmed copy: llama.cpp without docs, models, tests, examples, the other ggml backends
    and the tools beyond llama-bench and llama-quantize; CMakeLists of vendor/ and tools/ cut to match."""
    target = ROOT / ".llamacpp"
    if target.exists():
        shutil.rmtree(target)
    source = sdist / "vendor" / "llama.cpp"
    shutil.copytree(source, SOURCE, ignore=shutil.ignore_patterns("__pycache__"))
    for name in DROP:
        path = SOURCE / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)     # .git: the submodule's gitlink file
    for folder in (SOURCE / "ggml" / "src").iterdir():
        if folder.is_dir() and folder.name.startswith("ggml-") and folder.name not in ("ggml-cpu", "ggml-cuda"):
            shutil.rmtree(folder)
    for folder in (SOURCE / "tools").iterdir():
        if folder.is_dir() and folder.name not in ("llama-bench", "quantize"):
            shutil.rmtree(folder)
    tools = SOURCE / "tools" / "CMakeLists.txt"
    text = tools.read_text()
    tools.write_text(text[:text.index("if (EMSCRIPTEN)")] + "add_subdirectory(llama-bench)\nadd_subdirectory(quantize)\n")
    vendor = SOURCE / "vendor" / "CMakeLists.txt"
    vendor.write_text("".join(line for line in vendor.read_text().splitlines(keepends=True)
                              if "miniaudio" not in line and "add_subdirectory(stb)" not in line))
    shutil.copytree(sdist / "llama_cpp", PYTHON_PACKAGES / "llama_cpp", ignore=shutil.ignore_patterns("__pycache__", "server"))
    import diskcache   # pure Python, llama_cpp imports it; the GPU image has none

    shutil.copytree(Path(diskcache.__file__).parent, PYTHON_PACKAGES / "diskcache", ignore=shutil.ignore_patterns("__pycache__"))
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    log(f"{target}: {size / 2**20:.1f} MiB")


# ---- build -----------------------------------------------------------------------------------

def start_build(build: Path, cuda: bool, jobs: int, out: Path) -> subprocess.Popen:
    """cmake + ninja in the background (niced, its own process group so it can be paused).
    Only one CUDA architecture (sm_90) and three targets; fatbins uncompressed (faster to write,
    same code); CUDA graphs and flash attention on, as in llama.cpp's own build."""
    build.mkdir(parents=True, exist_ok=True)
    options = ["-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DGGML_NATIVE=ON",
               # the GPU image's g++ (/opt/gcc) links libstdc++ statically: without this, each library
               # exports its own copy, and in a process that also maps the system libstdc++ (torch) the
               # tokenizer's std::regex crashed (bench/RESULTS.md, "Where it crashes")
               "-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL"]
    if cuda:
        options += ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90-real", "-DGGML_CUDA_GRAPHS=ON",
                    "-DGGML_CUDA_NCCL=OFF", "-DGGML_CUDA_COMPRESSION_MODE=none", *cuda_hints(build)]
    script = (f"set -e; cd {build}; s=$(date +%s); cmake -S {SOURCE} -B . {' '.join(options)}; c=$(date +%s); "
              f"nice -n 19 ninja -j{jobs} llama llama-bench llama-quantize; e=$(date +%s); "
              f"echo BUILD_TIMES configure=$((c - s))s compile=$((e - c))s")
    handle = open(out / "llamacpp_build.log", "w")
    return subprocess.Popen(["bash", "-c", script], stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def cuda_hints(build: Path) -> list[str]:
    """CMake cache entries for what CUDA's CMake module may not find in a toolkit assembled from
    pip wheels: cuBLAS (torch's nvidia-cublas wheel: headers and libcublas.so.13, no unversioned
    name) and the driver's libcuda.so.1. Empty where the toolkit has them."""
    toolkits = [path for path in sorted(Path("/usr/local").glob("cuda*")) if path.is_dir()]
    roots = [*toolkits, *Path(sys.prefix).glob("lib/python3*/site-packages/nvidia"),
             *(Path(p) / "nvidia" for p in sys.path if p.endswith("site-packages"))]
    hints = []

    def find(pattern: str, under: list[Path]) -> Path | None:
        for root in under:
            for found in sorted(root.rglob(pattern)) if root.is_dir() else []:
                return found
        return None

    if find("libcublas.so", toolkits) is None:
        for name in ("cublas", "cublasLt"):
            library = find(f"lib{name}.so*", roots)
            if library is not None:
                hints.append(f"-DCUDA_{name}_LIBRARY={library}")
        header = find("cublas_v2.h", roots)
        if header is not None:   # cuBLAS's headers alone: that folder may hold another CUDA runtime's too
            include = build / "cublas-include"
            include.mkdir(parents=True, exist_ok=True)
            for path in header.parent.glob("cublas*.h"):
                (include / path.name).unlink(missing_ok=True)
                (include / path.name).symlink_to(path)
            hints += [f"-DCMAKE_CUDA_FLAGS=-I{include}", f"-DCMAKE_CXX_FLAGS=-I{include}"]
    if find("libcuda.so", toolkits) is None:
        driver = find("libcuda.so*", [Path("/usr/local/nvidia/lib64"), Path("/usr/lib/x86_64-linux-gnu"),
                                       Path("/usr/lib64")])
        if driver is not None:
            hints.append(f"-DCUDA_cuda_driver_LIBRARY={driver}")
    record("cuda hints", toolkits=[str(path) for path in toolkits], hints=hints)
    return hints


def finish(process: subprocess.Popen, name: str, log_path: Path, started: float) -> bool:
    code = process.wait()
    tail = log_path.read_text(errors="replace").splitlines()[-6:] if log_path.exists() else []
    record(name, returncode=code, seconds=time.perf_counter() - started, tail=tail)
    return code == 0


# ---- the checkpoint and llama.cpp's own tools ---------------------------------------------------

def write_tiny_checkpoint(folder: Path) -> None:
    """The 8B's config shrunk to 2 layers of hidden 256 (for the CPU rehearsal), random BF16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "done").exists():
        return
    config = json.loads((ROOT / "src/runner/catalog/meta-llama--Llama-3.1-8B-Instruct.json").read_text())
    config.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16).save_pretrained(str(folder))
    (folder / "done").write_text("ok")


def add_tokenizer(folder: Path) -> None:
    """The repo's SmolLM2 tokenizer (RUNNER_TEST_TOKENIZER, or .devtok) with its chat template."""
    tokenizer = Path(os.environ.get("RUNNER_TEST_TOKENIZER", ROOT / ".devtok"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer / name, folder / name)


def start_convert(checkpoint: Path, gguf_file: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SOURCE / 'gguf-py'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    handle = open(out / "llamacpp_convert.log", "w")
    command = shlex.join([sys.executable, str(SOURCE / "convert_hf_to_gguf.py"), str(checkpoint), "--outtype", "bf16",
                          "--outfile", str(gguf_file)])
    return subprocess.Popen(["bash", "-c", f"set -e; {command}; echo CONVERT_SECONDS=$SECONDS"], stdout=handle,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def run_tool(name: str, command: list[str], out: Path, timeout: float) -> str:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    with open(out / "tools.log", "a") as handle:      # one file: few come back from the GPU machine
        handle.write(f"==== {name}: {' '.join(command)}\n{result.stdout}{result.stderr}\n")
    record(name, returncode=result.returncode, seconds=time.perf_counter() - started,
           tail=(result.stdout + result.stderr).splitlines()[-4:])
    if result.returncode:
        raise RuntimeError(f"{name} failed ({result.returncode})")
    return result.stdout


def bytes_per_token(path: Path) -> int:
    """What a decode step reads of the file: every tensor but the token embeddings (one row)."""
    from runner.gguf import read_gguf

    total = 0
    for tensor in read_gguf(path).tensors:
        total += tensor.nbytes // tensor.shape[1] if tensor.name == "token_embd.weight" else tensor.nbytes
    return total


def llama_bench(binaries: Path, files: dict[str, Path], out: Path, gpu: bool) -> None:
    command = [str(binaries / "llama-bench"), "-n", "128", "-p", "0", "-ngl", "99" if gpu else "0", "-o", "json"]
    for path in files.values():
        command += ["-m", str(path)]
    with quiet():
        rows = json.loads(run_tool("llama-bench", command, out, 300))
    bandwidth = RESULTS.get("machine", {}).get("copy_bandwidth_gb_s", 0) * 1e9
    for (name, path), row in zip(files.items(), rows):
        per_token = bytes_per_token(path)
        record(f"llama-bench {name}", tok_s=row["avg_ts"], stdev=row["stddev_ts"], n_gen=row["n_gen"],
               flash_attn=row.get("flash_attn"), n_gpu_layers=row.get("n_gpu_layers"), build=row.get("build_commit"),
               backends=row.get("backends"), gpu=row.get("gpu_info"), model_type=row.get("model_type"),
               bytes_per_token=per_token, roofline_tok_s=bandwidth / per_token if bandwidth else None,
               fraction_of_roofline=row["avg_ts"] * per_token / bandwidth if bandwidth else None)


# ---- runner's fast path on the same checkpoint ------------------------------------------------

def runner_fast_path(checkpoint: Path) -> None:
    """runner's NF4 and BF16 decode as bench/cuda_speed.py's nf4 and bf16 sections time their
    default fast path (the article's HF baselines, profiles and variants left out), and as a
    session streams it (a step ahead, the token fed on the GPU): 128 tokens after a 16-token
    prompt, as llama-bench's tg128 decodes from an almost empty cache."""
    import cuda_speed as speed
    import torch

    from runner.model import load_spec
    from runner_cuda.fast.decoder import FastDecoder

    bandwidth = RESULTS["machine"]["copy_bandwidth_gb_s"] * 1e9
    for quant in ("nf4", "bf16"):
        try:
            speed.free()
            model, load_s = speed.load(checkpoint, quant)
            per_token = speed.bytes_read_per_token(model)
            decoder = FastDecoder(model, max_len=speed.LONG_PROMPT + speed.NEW_TOKENS + 16)
            speed.fast_generate(decoder, speed.prompt(speed.SHORT_PROMPT), 300)   # compiles, captures the graphs
            with quiet():
                result = speed.decode_rate(speed.fast_generate, decoder)
            record(f"runner {quant}", decode_tok_s=result["decode_tok_s"], ttft_1k_s=result["ttft_1k_s"], load_s=load_s,
                   bytes_per_token=per_token, roofline_tok_s=bandwidth / per_token,
                   fraction_of_roofline=result["decode_tok_s"] * per_token / bandwidth)
            with quiet():
                streamed = speed.decode_ahead(speed.session_over(model, decoder, quant, load_spec(speed.MODEL_ID)),
                                              position=speed.SHORT_PROMPT, repeats=2)
            best = max(streamed["tok_s_ahead"])
            record(f"runner {quant} session", tok_s=best, fraction_of_roofline=best * per_token / bandwidth,
                   **{k: v for k, v in streamed.items() if k != "tok_s_ahead"}, tok_s_ahead=streamed["tok_s_ahead"])
            del decoder, model
        except Exception as error:
            record(f"runner {quant}", error=repr(error), trace=traceback.format_exc()[-1500:])
        speed.free()
    torch.cuda.empty_cache()


# ---- runner's llamacpp backend ------------------------------------------------------------------

def runner_cli(*args: str, out: Path, name: str) -> str:
    command = [sys.executable, "-c", "import sys; from runner.cli import main; sys.exit(main(sys.argv[1:]))", *args]
    return run_tool(name, command, out, 300)


def rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def backend_on(name: str, path: Path, gpu: bool, rounds: int, tokens: int) -> None:
    """One file through runner's llamacpp backend, on the GPU (this machine's plan) and on the CPU."""
    import llama_cpp
    import numpy as np

    from runner.backend import Message, Sampling
    from runner.choice import open_session, resolve
    from runner.hardware import detect_machine, resolve_machine
    from runner.model import load_spec

    record("machine", llama_cpp_python=llama_cpp.__version__, gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()))
    spec = load_spec(str(path))
    choice = resolve(spec, detect_machine(), None, None, 2048)
    session = open_session(choice)
    report = session.memory()
    record(f"backend {name}", summary=session.device_summary, plan=[
        {"device": s.device, "layers": s.layers, "embeddings": s.embeddings, "head": s.head, "weights": s.weights_bytes,
         "kv": s.kv_cache_bytes, "overhead": s.overhead_bytes, "total": s.total_bytes} for s in choice.plan.placement],
        measured=report.measured, planned=report.planned, kv_measured=session.kv_cache_bytes, warnings=session.warnings)
    offload = session.llm.model_params.n_gpu_layers
    raw = llama_cpp.Llama(str(path), n_ctx=2048, n_batch=512, n_ubatch=512, n_gpu_layers=offload, n_threads=session.threads,
                          n_threads_batch=session.threads, flash_attn=True, verbose=False)
    question = [Message("user", "What is the capital of France?")]
    eos = session.eos_ids

    def ours(prompt, count):
        return list(session.stream([Message("user", prompt)], Sampling(max_tokens=count)))

    def theirs(prompt, count):
        def tokens():
            for token in raw.generate(session.tokenize([Message("user", prompt)]), temp=0, top_k=1):
                if token in eos:
                    return
                yield token
        out = []
        for token in tokens():
            out.append(token)
            if len(out) == count:
                break
        return out

    ours(PROMPT.format(start=0), 16)            # warm both
    theirs(PROMPT.format(start=0), 16)
    speeds = {"runner": [], "raw": []}
    with quiet():
        for round_ in range(rounds):
            times = []
            for _ in session.stream([Message("user", PROMPT.format(start=round_ + 1))], Sampling(max_tokens=tokens)):
                times.append(time.perf_counter())
            speeds["runner"].append(rate(times))
            times = []
            for token in raw.generate(session.tokenize([Message("user", PROMPT.format(start=round_ + 1))]), temp=0, top_k=1):
                times.append(time.perf_counter())
                if token in eos or len(times) == tokens:
                    break
            speeds["raw"].append(rate(times))
    chunks = ours(question[0].content, 24)
    gpu_reply, text = [c.token for c in chunks if c.token is not None and c.token not in eos], "".join(c.text for c in chunks)
    raw_reply = theirs(question[0].content, 24)
    record(f"backend {name}", runner_tok_s=statistics.median(speeds["runner"]), raw_tok_s=statistics.median(speeds["raw"]),
           runner_rounds=speeds["runner"], raw_rounds=speeds["raw"],
           runner_over_raw=statistics.median(speeds["runner"]) / statistics.median(speeds["raw"]),
           greedy_equal_raw=gpu_reply == raw_reply, text=text)
    raw.close()
    if not gpu:
        session.close()
        return
    ids = session.tokenize(question) + gpu_reply
    on_gpu = session.logits(ids)
    session.close()
    cpu = open_session(resolve(spec, resolve_machine("cpu-64GB"), None, None, 512))
    try:
        chunks = list(cpu.stream(question, Sampling(max_tokens=24)))
        cpu_reply, cpu_text = [c.token for c in chunks if c.token is not None and c.token not in eos], "".join(c.text for c in chunks)
        on_cpu = cpu.logits(ids)
    finally:
        summary, cpu_buffers = cpu.device_summary, cpu.buffers   # no cuda:0 entry: nothing of it ran on the GPU
        cpu.close()

    def log_softmax(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    a, b = log_softmax(on_cpu), log_softmax(on_gpu)
    kl = (np.exp(a) * (a - b)).sum(-1)
    first = next((i for i, (x, y) in enumerate(zip(gpu_reply, cpu_reply)) if x != y), None)
    record(f"backend {name}", cpu_summary=summary, cpu_measured=cpu_buffers, greedy_equal_cpu=gpu_reply == cpu_reply, first_difference_at=first,
           gpu_text=text, cpu_text=cpu_text, kl_mean=float(kl.mean()), kl_max=float(kl.max()),
           top1_agreement=float((on_gpu.argmax(-1) == on_cpu.argmax(-1)).mean()))


# ---- the run ----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare")
    prep.add_argument("--sdist", type=Path, required=True)
    run = sub.add_parser("run")
    run.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/llamacpp-gpu-out")))
    run.add_argument("--work", type=Path, default=Path("/tmp/llamacpp-gpu"))
    run.add_argument("--jobs", type=int, default=os.cpu_count())
    run.add_argument("--tiny", action="store_true", help="a 2-layer checkpoint, a CPU-only build: the flow on a CPU")
    run.add_argument("--rounds", type=int, default=3)
    run.add_argument("--skip", default="", help="stages to leave out: runner (runner's NF4/BF16), bench (llama-bench), "
                                                "backend (runner's llamacpp backend on both files, step 5)")
    one = sub.add_parser("backend", help="one GGUF through runner's llamacpp backend (a process without torch)")
    one.add_argument("name")
    one.add_argument("file", type=Path)
    one.add_argument("--cpu-only", action="store_true")
    one.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.sdist)
        return
    if args.command == "backend":
        try:
            backend_on(args.name, args.file, not args.cpu_only, args.rounds, 128)
        finally:
            print("BACKEND_RESULTS " + json.dumps(RESULTS, default=str), flush=True)
        return
    signal.signal(signal.SIGTERM, stop)      # `timeout`: still write the JSON and the table, stop the build
    try:
        run_all(args)
    finally:
        for process in PAUSED:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGCONT)
                os.killpg(process.pid, signal.SIGTERM)
        (args.out / "llamacpp_gpu.json").write_text(json.dumps(RESULTS, indent=2, default=str))
        summary()


def stop(signum, frame) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def run_all(args) -> None:
    import torch

    gpu = torch.cuda.is_available() and not args.tiny
    skip = set(filter(None, args.skip.split(",")))
    out, work = args.out, args.work
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    build, binaries = work / "build", work / "build" / "bin"
    os.environ["LLAMA_CPP_LIB_PATH"] = str(binaries)
    os.environ["LD_LIBRARY_PATH"] = f"{binaries}{os.pathsep}{os.environ.get('LD_LIBRARY_PATH', '')}"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(PYTHON_PACKAGES), str(SOURCE / "gguf-py"), str(ROOT / "src"),
                                                str(ROOT / "backends"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    sys.path[:0] = [str(PYTHON_PACKAGES), str(SOURCE / "gguf-py"), str(ROOT / "tests")]
    started = time.perf_counter()
    record("machine", gpu=torch.cuda.get_device_name() if gpu else "none (CPU rehearsal)", torch=torch.__version__,
           cores=os.cpu_count(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           nvcc=subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:])
    builder = start_build(build, gpu, args.jobs, out)
    PAUSED.append(builder)
    found = [str(Path(h.split("=", 1)[1]).parent) for h in RESULTS.get("cuda hints", {}).get("hints", []) if "_LIBRARY=" in h]
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([*dict.fromkeys(found), os.environ["LD_LIBRARY_PATH"]])
    checkpoint = work / ("llama-tiny-random" if args.tiny else "llama-3.1-8b-random")
    t = time.perf_counter()
    if args.tiny:
        write_tiny_checkpoint(checkpoint)
    else:
        import cuda_speed

        cuda_speed.write_checkpoint(checkpoint)
    add_tokenizer(checkpoint)
    record("checkpoint", seconds=time.perf_counter() - t, folder=str(checkpoint))
    bf16_file, q4_file = work / "model-bf16.gguf", work / "model-q4_0.gguf"
    t = time.perf_counter()
    converter = start_convert(checkpoint, bf16_file, out) if not bf16_file.exists() else None
    if converter is not None:
        PAUSED.append(converter)
    if gpu and "runner" not in skip:
        import cuda_speed

        with quiet():
            record("machine", copy_bandwidth_gb_s=cuda_speed.copy_bandwidth() / 1e9)
        runner_fast_path(checkpoint)
    if not finish(builder, "build", out / "llamacpp_build.log", started):
        raise RuntimeError("the llama.cpp build failed")
    tests = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests/test_llamacpp_gpu.py"), "-q", "-rs", "-s",
                            "-p", "no:cacheprovider"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    (out / "pytest.log").write_text(tests.stdout + tests.stderr)
    record("pytest tests/test_llamacpp_gpu.py", returncode=tests.returncode, tail=tests.stdout.splitlines()[-6:])
    if converter is not None and not finish(converter, "convert bf16", out / "llamacpp_convert.log", t):
        raise RuntimeError("convert_hf_to_gguf.py failed")
    if not args.tiny:
        shutil.rmtree(checkpoint)        # the disk: 16 GB back before Q4_0 is written
    if not q4_file.exists():
        run_tool("quantize q4_0", [str(binaries / "llama-quantize"), str(bf16_file), str(q4_file), "Q4_0",
                                   str(args.jobs)], out, 300)
    files = {"Q4_0": q4_file, "BF16": bf16_file}
    if "bench" not in skip:
        llama_bench(binaries, files, out, gpu)
    runner_cli("plan", str(q4_file), out=out, name="runner plan")
    runner_cli("generate", str(q4_file), "-p", "What is the capital of France?", "--max-tokens", "24", "--json",
               out=out, name="runner generate")
    os.environ["OMP_NUM_THREADS"] = str(os.cpu_count())   # the CPU side: every core (the load average still counts the build)
    if gpu:
        torch_probe(q4_file)
    if "backend" not in skip:
        backend_process("Q4_0", q4_file, gpu, args.rounds)
        backend_process("BF16", bf16_file, gpu, args.rounds)
    record("total", seconds=time.perf_counter() - started)


def backend_process(name: str, path: Path, gpu: bool, rounds: int) -> None:
    """`backend` in a process of its own, without torch (as `runner generate file.gguf` runs)."""
    command = [sys.executable, "-X", "faulthandler", str(Path(__file__).resolve()), "backend", name, str(path),
               "--rounds", str(rounds), *([] if gpu else ["--cpu-only"])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400)
    lines = result.stdout.splitlines()
    for line in lines:
        if line.startswith("BACKEND_RESULTS "):
            for section, values in json.loads(line.split(" ", 1)[1]).items():
                record(section, **values)
    if result.returncode:
        record(f"backend {name}", returncode=result.returncode, stderr=result.stderr.splitlines()[-12:])


PROBE = """import sys
import torch
if sys.argv[2] == "cuda":
    torch.ones(1, device="cuda")
import llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_gpu_layers=99, n_ctx=512, flash_attn=True, verbose=False)
print("loaded with torch", torch.__version__, "in the process; n_vocab", llm.n_vocab())
"""


def torch_probe(path: Path) -> None:
    """Does a model load into llama.cpp's CUDA backend in a process that has imported torch
    (`runner parity --a cuda:... --b llamacpp` would be one)?"""
    for variant in ("import", "cuda"):
        result = subprocess.run([sys.executable, "-X", "faulthandler", "-c", PROBE, str(path), variant],
                                capture_output=True, text=True, timeout=120)
        record(f"torch probe ({variant})", returncode=result.returncode,
               tail=(result.stdout + result.stderr).strip().splitlines()[-8:])


def summary() -> None:
    log("\n==== summary ====")
    for section, values in RESULTS.items():
        keep = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in values.items() if k not in ("trace", "plan")}
        log(f"{section:28s} {json.dumps(keep, default=str)[:900]}")

    def speed(name: str) -> float | None:       # llama-bench's tok_s, runner's decode_tok_s or a session's tok_s
        values = RESULTS.get(name, {})
        return values.get("tok_s", values.get("decode_tok_s"))

    log("\nside by side (decode tok/s, fraction of the copy-bandwidth roofline):")
    for name in ("llama-bench Q4_0", "runner nf4", "runner nf4 session", "llama-bench BF16", "runner bf16",
                 "runner bf16 session"):
        if speed(name):
            log(f"  {name:18s} {speed(name):8.1f} tok/s  {RESULTS[name].get('fraction_of_roofline') or 0:6.1%}")
    for mine, peer in (("runner nf4", "llama-bench Q4_0"), ("runner bf16", "llama-bench BF16"),
                       ("runner nf4 session", "llama-bench Q4_0"), ("runner bf16 session", "llama-bench BF16")):
        if speed(mine) and speed(peer):
            log(f"  {mine} / {peer}: {speed(mine) / speed(peer):.3f}")


if __name__ == "__main__":
    main()
