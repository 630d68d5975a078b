"""Scoring and selection cost, measured side by side in one run (not a test).

At hidden size 2,048, V = 151,936 and 4,096 positions (fp32 logits, 2.5 GB):
  stats_vs_logsoftmax  the statistics pass over full student logits (student top-K, entropy,
                       D, C and its bound against a teacher top-K' with K' = 64) relative to ONE
                       torch.log_softmax over the same logits (target <= 3.0)
  stats_vs_lmhead      the same pass relative to the LM-head matmul that produced the logits
  peak_extra_mem_gb    peak resident memory the statistics pass adds on top of the logits
                       (target <= 0.5 GB); measured with Linux's peak-RSS reset (clear_refs)
  select_1M_s          normalization + budget selection + metrics for 1,048,576 positions,
                       the slowest selector (target <= 1.0 s)
Also printed for reference: a naive chunked pass (full log_softmax per chunk, then gathers), and
the statistics pass through ``rows=`` (how the verl hook scores a packed tensor) relative to the
contiguous pass.
Timings are medians over --repeats runs. Usage: python benchmarks/bench_scoring.py [--quick]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time
import warnings

import torch

from ta_opd import TAConfig, available_selectors, select_positions, sparse_position_stats
from ta_opd.stats import PositionStats


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return statistics.median(times)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_gb(fn) -> float:
    """Peak RSS above the RSS before fn(), after resetting the kernel's high-water mark.

    Run in a fresh process (see --mem-child): in a process that already freed large buffers,
    the allocator's retained pages would hide the pass's own temporaries."""
    gc.collect()
    before = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    out = fn()
    peak = _rss_kb("VmHWM")
    del out
    return (peak - before) / 1024**2


def naive_stats(logits, tk_ids, tk_logp, k, chunk):
    """Reference point: a straightforward chunked pass writing full log-probs per chunk."""
    out = []
    for a in range(0, logits.shape[0], chunk):
        lp = torch.log_softmax(logits[a:a + chunk], dim=-1)
        h = -(lp.exp() * lp).sum(-1)
        top = lp.topk(k, dim=-1)
        s_at_t = lp.gather(-1, tk_ids[a:a + chunk, :k])
        out.append((h, top.values, s_at_t))
    return out


def teacher_topk(logits: torch.Tensor, k_prime: int, gen: torch.Generator):
    """A plausible teacher top-K': half of the student's top ids (reordered), half other ids."""
    n = logits.shape[0]
    s_top = logits.topk(k_prime, dim=-1).indices
    shared = s_top[:, torch.randperm(k_prime, generator=gen)[: k_prime // 2]]
    other = torch.randint(0, logits.shape[1], (n, k_prime - k_prime // 2), generator=gen)
    ids = torch.cat([shared, other], dim=-1)
    # distinct ids per row are not required by the stats; log-probs with total mass 0.9
    logp = torch.log_softmax(torch.randn(n, k_prime, generator=gen) * 2, dim=-1) + torch.log(torch.tensor(0.9))
    return ids, logp.sort(dim=-1, descending=True).values


def selection_seconds(n_seq: int, seq_len: int, repeats: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    shape = (n_seq, seq_len)
    D = torch.rand(shape, generator=gen) * 5
    C = torch.rand(shape, generator=gen)
    H = torch.rand(shape, generator=gen) * 4
    z = torch.zeros(shape)
    ids = torch.zeros(*shape, 1, dtype=torch.long)
    stats = PositionStats(D=D, C=C, C_low=C, C_high=C, C_hat=C, H=H, D_spread=z,
                          missing=torch.zeros(shape, dtype=torch.int32), student_topk_ids=ids, teacher_topk_ids=ids)
    valid = torch.ones(shape, dtype=torch.bool)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in available_selectors():
            cfg = TAConfig(selector=name)
            out[name] = _median_time(lambda: select_positions(stats, valid, cfg, step=1), repeats)
    return out


def memory_child(a) -> None:
    """Fresh process: logits + teacher top-K' only, then the statistics pass; prints the GB."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(a.positions, a.vocab, generator=gen) * 3
    tk_ids, tk_logp = teacher_topk(logits, a.teacher_topk, gen)
    gb = peak_extra_gb(lambda: sparse_position_stats(logits, tk_ids, tk_logp, topk=a.topk, chunk_size=a.chunk))
    print(f"PEAK_EXTRA_GB={gb:.6f}")


def measure_memory_in_child(argv: list[str], script: str = __file__) -> float:
    """Run ``script`` with ``--mem-child`` in a fresh process and read the PEAK_EXTRA_GB it prints."""
    res = subprocess.run([sys.executable, script, *argv, "--mem-child"], capture_output=True, text=True, check=True)
    for line in res.stdout.splitlines():
        if line.startswith("PEAK_EXTRA_GB="):
            return float(line.split("=", 1)[1])
    raise RuntimeError(f"memory child printed no result: {res.stdout!r} {res.stderr!r}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="TA-OPD scoring benchmark")
    p.add_argument("--positions", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--teacher-topk", type=int, default=64)
    p.add_argument("--chunk", type=int, default=TAConfig().chunk_size)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    p.add_argument("--mem-child", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    if a.quick:
        a.positions, a.hidden, a.vocab, a.repeats = 256, 256, 32000, 1
    if a.mem_child:
        return memory_child(a)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"N={a.positions} hidden={a.hidden} V={a.vocab} K={a.topk} K'={a.teacher_topk} chunk={a.chunk}",
          flush=True)

    hidden = torch.randn(a.positions, a.hidden, generator=gen)
    lm_head = torch.randn(a.vocab, a.hidden, generator=gen) * (a.hidden ** -0.5) * 4
    t_lmhead = _median_time(lambda: hidden @ lm_head.T, a.repeats)
    logits = hidden @ lm_head.T  # (N, V) fp32
    del lm_head
    print(f"logits {tuple(logits.shape)} {logits.dtype}: {logits.numel() * 4 / 1024**3:.2f} GB", flush=True)
    tk_ids, tk_logp = teacher_topk(logits, a.teacher_topk, gen)

    def stats_pass():
        return sparse_position_stats(logits, tk_ids, tk_logp, topk=a.topk, chunk_size=a.chunk)

    t_lsm = _median_time(lambda: torch.log_softmax(logits, dim=-1), a.repeats)
    t_stats = _median_time(stats_pass, a.repeats)
    t_naive = _median_time(lambda: naive_stats(logits, tk_ids, tk_logp, a.topk, 256), a.repeats)
    rows = torch.arange(a.positions)  # the verl hook's path: rows of a packed tensor, gathered per chunk
    t_rows = _median_time(lambda: sparse_position_stats(logits, tk_ids, tk_logp, topk=a.topk, chunk_size=a.chunk,
                                                        rows=rows), a.repeats)
    mem = measure_memory_in_child(argv or [])
    st = stats_pass()
    print(f"lm_head matmul        {t_lmhead:8.3f} s")
    print(f"log_softmax           {t_lsm:8.3f} s")
    print(f"statistics pass       {t_stats:8.3f} s  (missing-id positions: {float((st.missing > 0).float().mean()):.2f})")
    print(f"naive chunked pass    {t_naive:8.3f} s  (naive_vs_logsoftmax={t_naive / t_lsm:.2f})")
    print(f"statistics via rows=  {t_rows:8.3f} s  (stats_rows_vs_stats={t_rows / t_stats:.2f})", flush=True)
    del logits, hidden, st
    gc.collect()

    n_seq, seq_len = (64, 512) if a.quick else (512, 2048)
    sel = selection_seconds(n_seq, seq_len, a.repeats)
    for name, sec in sel.items():
        print(f"select {n_seq * seq_len} positions  {name:<26}{sec:8.3f} s")
    slowest = max(sel.values())
    print(f"stats_vs_logsoftmax={t_stats / t_lsm:.2f} stats_vs_lmhead={t_stats / t_lmhead:.2f} "
          f"peak_extra_mem_gb={mem:.3f} select_1M_s={slowest:.3f}")


if __name__ == "__main__":
    sys.exit(main())
