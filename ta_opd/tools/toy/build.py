"""Locate the toy teacher–student pair and its datasets: the shipped one, or build (once) and cache.

``python -m ta_opd.tools.toy.build [--cache-dir DIR] [--print-root]`` prints the paths (or only the
pair's folder). The default spec's pair ships with the package (``ta_opd.tools.toy.shipped``) and
is used as is: no build, no cache. Any other spec is built once into the cache: the cache key
hashes the spec, so a changed spec builds a new pair; a build goes to a temporary folder that is
renamed into place only when complete. ``--ship`` rebuilds the default spec and replaces the
shipped pair. Layout under ``<cache_dir>/<key>/`` (and ``assets/<key>/``):

    teacher/, student/     Hugging Face model folders (config, weights, tokenizer): load by path
    data/{train,val,test}.parquet   verl's dataset layout (see ta_opd.tools.toy.task.to_rows)
    manifest.json          spec, accuracies, the student's C distribution, build timings,
                           and the build environment (torch version, threads, CPU capability)

Reproducibility: the build runs in a child process pinned by ``BUILD_ENV``: one thread, and CPU
code paths that do not depend on the machine's instruction set (ATen's generic kernels instead
of its AVX2/AVX-512 ones, MKL's conditional-numerical-reproducibility "COMPATIBLE" path, oneDNN
capped at SSE4.1), with deterministic algorithms. Measured on one machine, each of those three
switches alone changes the built weights, so without them two x86 machines build different
pairs from the same spec. Remaining dependence: the torch/MKL version and the CPU architecture
family (x86 vs ARM), recorded in the manifest's ``build_environment``; and still two x86 machines
of one kind built different students from the default spec (issue 18), hence the shipped pair.
``BUILD_RECIPE`` and
``BUILD_ENV`` are part of the cache key: bump the recipe whenever the build procedure changes, so
an old cache is never reused for a new recipe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ta_opd.tools.built_pair import BuiltPair
from ta_opd.tools.toy import shipped, task
from ta_opd.tools.toy.tokenizer import VERSION as TOKENIZER_VERSION
from ta_opd.tools.toy.models import (STUDENT_ARCH, TEACHER_ARCH, build_model, answer_accuracy, sft, sft_examples)

DEFAULT_CACHE = Path(os.environ.get("TA_OPD_CACHE", Path.home() / ".cache" / "ta_opd")) / "toy"
# The build procedure's version, hashed into the cache key with the spec and BUILD_ENV.
# 1: in-process with the caller's threads and the CPU's native kernels; 2: a pinned child process.
BUILD_RECIPE = 2
BUILD_THREADS = 1
# The child process's environment (read by torch/MKL/oneDNN at import, hence a child process).
BUILD_ENV = {"OMP_NUM_THREADS": str(BUILD_THREADS), "MKL_NUM_THREADS": str(BUILD_THREADS),
             "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"}


@dataclass(frozen=True)
class ToySpec:
    version: int = 5
    min_digits: int = 2
    max_digits: int = 2
    n_train: int = 4000
    n_val: int = 200
    n_test: int = 300
    teacher_steps: int = 800
    teacher_semicolon_share: float = 0.5  # the teacher writes ";" or " " between steps
    teacher_r_share: float = 0.2  # and "R=" in 20 % of answers, "A:" otherwise (it can continue "R=")
    student_steps: int = 600
    student_space_share: float = 0.1  # the student mostly writes ";", always "R=" (never "A")
    # the student's systematic mistake (task.slipped_solution): each carry into a column whose
    # digits sum to >= 5 is dropped with this probability in its SFT solutions (slip_other: other columns)
    student_slip: float = 0.6
    student_slip_other: float = 0.05
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    report_topk: int = 16  # K used for the C-distribution report

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True) + json.dumps([TEACHER_ARCH, STUDENT_ARCH], sort_keys=True)
        blob += json.dumps({"build_recipe": BUILD_RECIPE, "build_env": BUILD_ENV}, sort_keys=True)
        blob += json.dumps({"tokenizer": TOKENIZER_VERSION})
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


ToyPair = BuiltPair  # the toy's folders (ta_opd/tools/built_pair.py)


def _paths(root: Path, manifest: dict) -> ToyPair:
    return ToyPair.at(root, manifest)


def load_or_build(cache_dir: str | Path | None = None, spec: ToySpec = ToySpec(), log=print) -> ToyPair:
    """The shipped pair when ``spec`` is the one it was built from (checked against its file
    hashes; ``cache_dir`` is not touched), else :func:`build_cached`."""
    root = shipped.find(spec.key())
    if root is not None:
        log(f"toy pair: using the shipped pair {root}")
        return _paths(root, shipped.check(root))
    return build_cached(cache_dir, spec, log)


def build_cached(cache_dir: str | Path | None = None, spec: ToySpec = ToySpec(), log=print) -> ToyPair:
    """The pair of ``spec`` from ``<cache_dir>/<key>/``, built there first if absent."""
    root = Path(cache_dir or DEFAULT_CACHE).expanduser() / spec.key()
    manifest = root / "manifest.json"
    if manifest.exists():
        log(f"toy pair: using cache {root}")
        return _paths(root, json.loads(manifest.read_text()))
    log(f"toy pair: building into {root} (once; later runs load the cache)")
    root.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_builds(root.parent, log)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{socket.gethostname()}-{os.getpid()}-", dir=root.parent))
    try:
        _build_in_child(tmp, spec, log)
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first: use its build
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _paths(root, json.loads(manifest.read_text()))


def _build_in_child(out: Path, spec: ToySpec, log) -> None:
    """Run :func:`_build` in a child process with ``BUILD_ENV`` (see the module docstring); its
    log lines are forwarded to ``log``; it writes ``out/manifest.json`` last."""
    pkg_root = str(Path(__file__).resolve().parents[3])  # the folder holding ta_opd/: the child imports this same ta_opd
    env = {**os.environ, **BUILD_ENV,
           "PYTHONPATH": os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "ta_opd.tools.toy.build", "--build-into", str(out), "--spec", json.dumps(asdict(spec))]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("toy pair:") or line.startswith("  sft step"):
                log(line.rstrip("\n"))
        code = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: do not leave a build running
            proc.kill()
            proc.wait()
    if code != 0 or not (out / "manifest.json").exists():
        tail = "\n".join(lines[-30:])
        raise RuntimeError(f"the toy build process failed (exit code {code}); its last output:\n{tail}")


def _child_main(out: str, spec_json: str) -> None:
    spec = ToySpec(**json.loads(spec_json))
    with deterministic_build():
        info = _build(Path(out), spec, lambda m: print(m, flush=True))
    (Path(out) / "manifest.json").write_text(json.dumps(info, indent=2))


def clean_stale_builds(parent: Path, log=print) -> list[str]:
    """Remove ``.building-<host>-<pid>-*`` folders of killed builds on this host (the pid is gone);
    builds still running, or on another host sharing the cache, are left alone."""
    gone = []
    for p in parent.glob(".building-*"):
        try:
            head, pid, _ = p.name.rsplit("-", 2)
            host, pid = head[len(".building-"):], int(pid)
        except ValueError:
            continue  # not one of ours
        if host != socket.gethostname() or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still building
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p.name)
        log(f"toy pair: removed {p.name}, left by a killed build (pid {pid})")
    return gone


@contextmanager
def deterministic_build(threads: int = BUILD_THREADS):
    """Run the block on ``threads`` intra-op threads with deterministic algorithms, then restore
    the caller's settings (the thread count decides how CPU kernels split their reductions, and
    so the float rounding of every SFT step)."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)


def build_environment() -> dict:
    """What the pair's floats depend on besides the spec (recorded in the manifest)."""
    import platform

    return {"build_recipe": BUILD_RECIPE, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
            "env": {k: os.environ.get(k) for k in BUILD_ENV}}


def _teacher_render(rng: random.Random, semicolon_share: float, r_share: float):
    def render(p):
        sep = ";" if rng.random() < semicolon_share else " "
        marker = "R=" if rng.random() < r_share else "A:"
        return task.solution(p, sep, marker)
    return render


def _student_render(rng: random.Random, slips: random.Random, spec: ToySpec):
    def render(p):
        sep = " " if rng.random() < spec.student_space_share else ";"
        return task.slipped_solution(p, slips, sep, "R=", slip=spec.student_slip, slip_other=spec.student_slip_other)
    return render


def _build(out: Path, spec: ToySpec, log) -> dict:
    import pandas as pd

    from ta_opd.tools.toy.tokenizer import build_tokenizer

    t0 = time.time()
    torch.manual_seed(spec.seed)
    tok = build_tokenizer()
    kw = dict(min_digits=spec.min_digits, max_digits=spec.max_digits)
    train = task.make_split(spec.n_train, spec.seed + 1, **kw)
    seen = {p.prompt for p in train}
    val = task.make_split(spec.n_val, spec.seed + 2, exclude=seen, **kw)
    seen |= {p.prompt for p in val}
    test = task.make_split(spec.n_test, spec.seed + 3, exclude=seen, **kw)
    (out / "data").mkdir(parents=True)
    for name, probs in (("train", train), ("val", val), ("test", test)):
        pd.DataFrame(task.to_rows(probs, name)).to_parquet(out / "data" / f"{name}.parquet")

    log(f"toy pair: SFT teacher ({spec.teacher_steps} steps)")
    t1 = time.time()
    teacher = build_model(tok, TEACHER_ARCH, spec.seed)
    ex = sft_examples(tok, train, _teacher_render(random.Random(spec.seed), spec.teacher_semicolon_share,
                                                  spec.teacher_r_share))
    sft(teacher, ex, steps=spec.teacher_steps, batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed,
        pad_id=tok.pad_token_id, log=log)
    t2 = time.time()
    log(f"toy pair: SFT student ({spec.student_steps} steps, carry slips, ';' and 'R=' format)")
    student = build_model(tok, STUDENT_ARCH, spec.seed + 1)
    ex = sft_examples(tok, train, _student_render(random.Random(spec.seed + 1), random.Random(spec.seed + 2), spec))
    sft(student, ex, steps=spec.student_steps, batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed + 1,
        pad_id=tok.pad_token_id, log=log)
    t3 = time.time()
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
    msgs, answers = [[{"role": "user", "content": p.prompt}] for p in test], [p.answer for p in test]
    acc_t = answer_accuracy(teacher, tok, msgs, answers)
    acc_s = answer_accuracy(student, tok, msgs, answers)
    # one sample per problem at temperature 1 (the rollout temperature): on-policy training learns
    # from these, so a student whose samples are far worse than its greedy answers is a poor toy
    acc_s_t1 = answer_accuracy(student, tok, msgs, answers, temperature=1.0, seed=spec.seed)
    c_report = compatibility_report(student, teacher, tok, train[:64], spec.report_topk, spec.seed)
    log(f"toy pair: held-out greedy accuracy teacher {acc_t:.3f}, student {acc_s:.3f} "
        f"(sampled at temperature 1: {acc_s_t1:.3f}); "
        f"C < 0.5 at {c_report['frac_C_below_0.5']:.3f} of student-rollout positions (K={spec.report_topk})")
    return {"spec": asdict(spec), "key": spec.key(), "vocab_size": len(tok),
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "student_params": sum(p.numel() for p in student.parameters()),
            "teacher_accuracy": acc_t, "student_accuracy": acc_s, "student_sampled_accuracy_t1": acc_s_t1,
            "compatibility": c_report,
            "build_environment": build_environment(),
            "seconds": {"data": t1 - t0, "teacher_sft": t2 - t1, "student_sft": t3 - t2, "total": time.time() - t0}}


@torch.no_grad()
def compatibility_report(student, teacher, tok, problems, k: int, seed: int) -> dict:
    """Distribution of C (Eq. 10) on student rollouts, scored exactly (dense path)."""
    from ta_opd.stats import dense_position_stats
    from ta_opd.rollout import encode_prompt, generate, rollout_logits

    prompts = [encode_prompt(tok, [{"role": "user", "content": p.prompt}]) for p in problems]
    ro = generate(student, prompts, max_new_tokens=40, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                  temperature=1.0, generator=torch.Generator().manual_seed(seed))
    st = dense_position_stats(rollout_logits(student, ro), rollout_logits(teacher, ro), topk=k)  # (B, R) each
    c = st.C[ro.response_mask]
    qs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    return {"positions": int(c.numel()), "frac_C_below_0.5": float((c < 0.5).float().mean()),
            "frac_C_below_0.1": float((c < 0.1).float().mean()),
            "C_quantiles": dict(zip(["p05", "p25", "p50", "p75", "p95"], torch.quantile(c, qs).tolist()))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="build or locate the cached toy teacher-student pair")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--print-root", action="store_true",
                   help="print only the pair's folder (for scripts: T=$(python -m ta_opd.tools.toy.build --print-root))")
    p.add_argument("--ship", action="store_true",
                   help="build the default spec (in a temporary folder; with --cache-dir: its cached build, "
                        f"built there if absent) and replace the shipped pair under {shipped.ASSETS} with it")
    p.add_argument("--build-into", default=None, help=argparse.SUPPRESS)  # internal: the pinned child
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.build_into is not None:
        _child_main(a.build_into, a.spec)
        return
    if a.ship:
        _ship(a.cache_dir)
        return
    if a.print_root:
        print(load_or_build(a.cache_dir, log=lambda m: print(m, file=sys.stderr)).root)
        return
    pair = load_or_build(a.cache_dir)
    print(json.dumps({k: str(v) for k, v in asdict(pair).items() if k != "manifest"}, indent=2))
    print(json.dumps(pair.manifest, indent=2))


def _ship(cache_dir: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="ta_opd_toy_ship_") as tmp:
        pair = build_cached(cache_dir or tmp, ToySpec())
        dest = shipped.ship(pair.root)
    m = pair.manifest
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"shipped {dest} ({size / 1e6:.2f} MB): teacher accuracy {m['teacher_accuracy']:.3f}, student "
          f"{m['student_accuracy']:.3f} greedy / {m['student_sampled_accuracy_t1']:.3f} sampled; re-measure "
          "docs/toy.md if these changed")


if __name__ == "__main__":
    main()
