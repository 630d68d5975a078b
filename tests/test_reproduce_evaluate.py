"""The evaluation command (recipe.ta_opd.reproduce.evaluate) on CPU: a real verl FSDP checkpoint merged by verl's
own merger, the toy pair's trained checkpoints on the toy task (hf backend), then the aggregation.

EvalScope is not exercised here: it cannot share this virtualenv (it pins antlr4-python3-runtime 4.13,
which breaks Hydra/omegaconf and so verl) and its benchmarks load from the network. The same command
runs it on GPU through ``--backend evalscope``; here the task arguments it would get are checked."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from recipe.ta_opd.reproduce import evaluate as E
from recipe.ta_opd.reproduce import results as R
from ta_opd.errors import TAConfigError

ROOT = Path(__file__).resolve().parents[1]

# writes a verl FSDP actor checkpoint of a tiny Qwen3 (toy tokenizer) with verl's own
# FSDPCheckpointManager on a 1-rank gloo group (FSDP2 on a ("fsdp",) mesh, as verl builds it)
FSDP_WRITER = textwrap.dedent("""
    import os, sys, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from omegaconf import OmegaConf
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, Qwen3Config
    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager
    from ta_opd.tools.toy.tokenizer import build_tokenizer
    tok = build_tokenizer()
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                      tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(sys.argv[1], "reference.pt"))
    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("fsdp",))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    run = os.path.join(sys.argv[1], "run")
    ck = FSDPCheckpointManager(model, None, None, processing_class=tok,
                               checkpoint_config=OmegaConf.create({"save_contents": ["model"], "load_contents": ["model"]}))
    ck.save_checkpoint(os.path.join(run, "global_step_3", "actor"), global_step=3)
    open(os.path.join(run, "latest_checkpointed_iteration.txt"), "w").write("3")
    torch.distributed.destroy_process_group()
""")


def _toy_items(path, n=6):
    rows = [{"data_source": "ta_opd_toy_addition", "prompt": [{"role": "user", "content": f"{10 + i}+{20 + i}"}],
             "ability": "math", "reward_model": {"ground_truth": str(30 + 2 * i), "style": "rule"},
             "extra_info": {"index": i}} for i in range(n)]
    pd.DataFrame(rows).to_parquet(path)
    return path


def _args(*targets, out, **kw):
    argv = [*map(str, targets), "--out", str(out)]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag, *map(str, v)] if isinstance(v, (list, tuple)) else [flag, str(v)]
    return argv


@pytest.mark.slow
def test_verl_fsdp_checkpoint_merged_by_verl_and_evaluated(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    port = str(29500 + os.getpid() % 400)
    res = subprocess.run([sys.executable, "-c", FSDP_WRITER, str(tmp_path), port], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    actor = tmp_path / "run/global_step_3/actor"
    assert (actor / "fsdp_config.json").exists() and (actor / "model_world_size_1_rank_0.pt").exists()
    data = _toy_items(tmp_path / "toy.parquet")
    out = tmp_path / "eval"
    argv = _args(tmp_path / "run", out=out, name="toy__full", backend="hf", benchmarks=["toy_addition"],
                 seeds=[0], dataset_file=[f"toy_addition={data}"], max_tokens=6, min_extraction_rate=0)
    assert E.main(argv) == 0
    merged = out / "_merged/run/step_3"
    from safetensors.torch import load_file

    got, ref = load_file(merged / "model.safetensors"), torch.load(tmp_path / "reference.pt")
    assert set(got) == set(ref)
    # verl's merger writes bf16: equal to the FSDP-trained weights cast to bf16
    assert all(torch.equal(got[k], ref[k].to(got[k].dtype)) for k in ref)
    rec = json.loads((out / "toy__full/toy_addition/seed0.json").read_text())
    assert (rec["run"], rec["step"], rec["n"], rec["backend"], rec["chat_template"]) == ("toy__full", 3, 6, "hf", True)
    assert rec["checkpoint"] == str(tmp_path / "run/global_step_3") and rec["model"] == str(merged)
    assert rec["generation"] == {"temperature": 0.6, "top_p": 0.95, "max_tokens": 6, "n": 1}


def _train(cache, out, selector, budget, steps=2):
    from hydra import compose, initialize_config_dir

    from recipe.ta_opd.main import run
    from tests.conftest import TINY

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with initialize_config_dir(config_dir=str(ROOT / "recipe/ta_opd/config"), version_base=None):
            cfg = compose("ta_opd_trainer", overrides=[
                f"ta_opd.selector={selector}", f"ta_opd.budget={budget}", f"trainer.total_training_steps={steps}",
                f"trainer.save_freq={steps}", f"trainer.test_freq={steps}", "ta_opd.cpu.eval_size=4",
                "data.train_batch_size=4", f"trainer.default_local_dir={out}", "trainer.logger=[]",
                f"ta_opd.toy.cache_dir={cache}", *[f"+ta_opd.toy.spec.{k}={v}" for k, v in TINY.items()]])
        return run(cfg)
    finally:
        os.chdir(cwd)


@pytest.mark.slow
def test_toy_runs_evaluate_then_aggregate(tiny_pair, tmp_path, capsys):
    cache, pair = tiny_pair
    runs = tmp_path / "runs"
    _train(cache, runs / R.run_name("toy", "full"), "full", 1.0)
    _train(cache, runs / R.run_name("toy", "teachability", 0.1), "teachability", 0.1)
    out = tmp_path / "eval"
    argv = _args(runs, out=out, backend="hf", benchmarks=["toy_addition"], seeds=[0, 1],
                 dataset_file=[f"toy_addition={pair.test_file}"], max_tokens=24, temperature=1.0)
    # the tiny pair writes no "A:<n>" answers: the sanity check fails loudly and writes no record
    assert E.main(argv) == 3
    err = capsys.readouterr().err
    assert "SANITY CHECK FAILED" in err and "extractable final answer" in err and "no record was written" in err
    assert not list(out.rglob("seed*.json")) or all("generations" in p.name for p in out.rglob("seed*.json"))
    # with the check disabled, every (run, benchmark, seed) gets a record
    assert E.main(argv + ["--min-extraction-rate", "0"]) == 0
    recs = sorted(out.rglob("seed?.json"))
    assert [p.relative_to(out).as_posix() for p in recs] == [
        "toy__full/toy_addition/seed0.json", "toy__full/toy_addition/seed1.json",
        "toy__teachability__rho0.10/toy_addition/seed0.json", "toy__teachability__rho0.10/toy_addition/seed1.json"]
    rec = json.loads(recs[2].read_text())
    assert rec["step"] == 2 and rec["n"] == 16 and rec["extraction_rate"] is not None and rec["harness"] == "ta_opd.hf"
    gens = json.loads((out / "toy__full/toy_addition/seed0.generations.json").read_text())
    assert len(gens) == 16 and rec["score"] == pytest.approx(100 * sum(g["score"] for g in json.loads(
        (out / "toy__teachability__rho0.10/toy_addition/seed0.generations.json").read_text())) / 16)
    # resumable: nothing left to run
    capsys.readouterr()
    assert E.main(argv + ["--min-extraction-rate", "0"]) == 0
    assert "0 of 2 (benchmark, seed) pairs to run" in capsys.readouterr().out
    written = R.aggregate(out, tmp_path / "agg", benchmarks=["toy_addition"], seeds=2)
    t3 = pd.read_csv(written["table3_csv"])
    full = [json.loads(p.read_text())["score"] for p in recs[:2]]
    row = t3[t3["method"] == "full"].iloc[0]
    assert row["toy_addition_mean"] == pytest.approx(sum(full) / 2) and row["avg"] == pytest.approx(sum(full) / 2)
    assert pd.isna(t3[t3["method"] == "entropy"].iloc[0]["avg"])
    assert "| Full OPD |" in Path(written["table3_md"]).read_text()


def test_answer_extraction_and_grading():
    assert E.last_boxed("so \\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert E.last_boxed("\\boxed{unclosed") is None and E.last_boxed("no answer") is None
    assert E.extract("choice", "reasoning...\nANSWER: C") == "C" and E.extract("choice", "I pick C") is None
    assert E.extract("toy", "7+5+0=12 4+8+1=13 A:132") == 132
    assert E.extraction_rate("boxed", ["\\boxed{3}", "3", "x \\boxed{4}", ""]) == 0.5
    assert E.extraction_rate(None, ["def f(): pass"]) is None
    assert E.grade("math_500", "thus \\boxed{\\frac{1}{2}}", "\\frac{1}{2}") == 1.0
    assert E.grade("math_500", "thus \\boxed{3}", "4") == 0.0
    assert E.grade("toy_addition", "7+5+0=12 4+8+1=13 A:132", "132") == 1.0
    with pytest.raises(E.SanityError, match="'aime24', seed 2: only 10.0%"):
        E.sanity_check("r", "aime24", 2, 0.1, 0.5)
    E.sanity_check("r", "humaneval", 0, None, 0.5)  # no final answer to extract: not checked


def test_evalscope_task_arguments():
    gen = E.Generation(temperature=0.6, top_p=0.95, max_tokens=8192)
    t = E.evalscope_task("s__tip__rho0.10", "http://127.0.0.1:8000/v1", "math_500", 3, gen, Path("/w"), None, None)
    assert t["dataset"] == "math_500" and t["seed"] == 3 and t["model"] == "s__tip__rho0.10"
    assert t["generation"] == {"temperature": 0.6, "top_p": 0.95, "max_tokens": 8192, "seed": 3, "n": 1}
    # the driver imports only the standard library at module level (it runs in the EvalScope venv)
    src = (ROOT / "recipe/ta_opd/reproduce/evalscope_driver.py").read_text()
    top = [ln for ln in src.splitlines() if ln.startswith(("import ", "from "))]
    assert all(ln.split()[1] in ("__future__", "glob", "json", "os", "sys") for ln in top), top


def test_bad_inputs_named(tmp_path, capsys):
    data = _toy_items(tmp_path / "toy.parquet")
    (tmp_path / "empty_run").mkdir()
    assert E.main(_args(tmp_path / "empty_run", out=tmp_path / "o", backend="hf", benchmarks=["toy_addition"],
                        dataset_file=[f"toy_addition={data}"])) == 2
    assert "run folder" in (err := capsys.readouterr().err) and "empty_run" in err and "has no checkpoints" in err
    runs = tmp_path / "runs"
    (runs / "a__full/checkpoints/global_step_1/actor").mkdir(parents=True)
    (runs / "a__full/checkpoints/latest_checkpointed_iteration.txt").write_text("1")
    (runs / "b__full").mkdir()
    assert E.main(_args(runs, out=tmp_path / "o", backend="hf", benchmarks=["toy_addition"],
                        dataset_file=[f"toy_addition={data}"])) == 2
    err = capsys.readouterr().err
    assert "global_step_1" in err and "neither a Hugging Face actor/ folder nor verl FSDP shards" in err
    assert E.main(_args(runs, out=tmp_path / "o", benchmarks=["aime2024"])) == 2
    assert "benchmark 'aime2024' is unknown" in capsys.readouterr().err
    assert E.main(_args(runs, out=tmp_path / "o", backend="hf", benchmarks=["gpqa_diamond"])) == 2
    assert "benchmark 'gpqa_diamond' cannot run on --backend hf" in capsys.readouterr().err
    assert E.main(_args(runs, out=tmp_path / "o", benchmarks=["aime24"])) == 2
    assert "--evalscope-python" in capsys.readouterr().err
    assert E.main(_args("Qwen/Qwen3-1.7B", out=tmp_path / "o", evalscope_python=sys.executable)) == 2
    assert "needs --hub" in capsys.readouterr().err
    with pytest.raises(TAConfigError, match="max_tokens"):
        E.Generation(max_tokens=0)


# --- the EvalScope route, against a stand-in OpenAI server (opt-in: needs an EvalScope virtualenv) ---

EVALSCOPE_PY = os.environ.get("TA_OPD_EVALSCOPE_PYTHON")


def _mock_openai(requests):
    """Answers 'Compute a+b.' with \\boxed{a+b} when a is even, \\boxed{0} otherwise (score 50 %)."""
    import re
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send({"object": "list", "data": [{"id": "m", "object": "model"}]})

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(req)
            a, b = map(int, re.search(r"Compute (\d+)\+(\d+)", req["messages"][-1]["content"]).groups())
            text = f"Adding them. \\boxed{{{a + b if a % 2 == 0 else 0}}}"
            self._send({"id": "x", "object": "chat.completion", "created": 0, "model": req["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}})

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.mark.slow
@pytest.mark.skipif(not EVALSCOPE_PY, reason="set TA_OPD_EVALSCOPE_PYTHON to an EvalScope virtualenv's python "
                    "(pip install -r requirements-eval.txt); EvalScope cannot share verl's environment")
def test_evalscope_route_against_a_stand_in_server(tmp_path):
    data = tmp_path / "math500"  # a local copy of the benchmark's dataset folder (its "test" split)
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps({"problem": f"Compute {a}+{a + 1}.", "answer": str(2 * a + 1), "level": 1 + a % 5,
                                        "unique_id": f"q{a}", "solution": ""}) + "\n" for a in range(8)))
    requests = []
    srv = _mock_openai(requests)
    try:
        argv = _args("stand-in/model", out=tmp_path / "eval", name="s__tip__rho0.10", benchmarks=["math_500"],
                     seeds=[7], dataset_file=[f"math_500={data}"], evalscope_python=EVALSCOPE_PY,
                     api_url=f"http://127.0.0.1:{srv.server_address[1]}/v1")
        assert E.main(argv + ["--hub"]) == 0
    finally:
        srv.shutdown()
    rec = json.loads((tmp_path / "eval/s__tip__rho0.10/math_500/seed7.json").read_text())
    assert rec["score"] == pytest.approx(50.0) and rec["n"] == 8 and rec["extraction_rate"] == 1.0
    assert rec["harness"].startswith("evalscope ") and rec["backend"] == "vllm"
    # what reached the server: chat messages with the boxed-answer instruction, our generation settings and seed
    r = requests[0]
    assert r["model"] == "s__tip__rho0.10" and r["messages"][-1]["role"] == "user"
    assert "\\boxed{}" in r["messages"][-1]["content"]
    assert (r["temperature"], r["top_p"], r["max_tokens"], r["seed"]) == (0.6, 0.95, 8192, 7)
