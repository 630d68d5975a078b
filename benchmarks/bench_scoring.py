"""Scoring and selection cost, measured side by side in one run (not a test).

1. Throughput of the support statistics + normalization + selection, positions/s, for
   V in {128, 4,096, 151,936} and N in {16,384, 262,144}, one thread and all threads
   (K = 16, K' = 64, rho = 0.1, teachability selector). The statistics pass reads full student
   logits; logits larger than --tile-mb are scored as repeated calls over a tile of rows (the
   per-position cost is the same; normalization and selection always see all N positions).
   ``support_pos_per_s`` is the V = 128, N = 262,144, one-thread point. The top-K-only entry
   point (``topk_position_stats``: student top-K + entropy and teacher top-K' in, no logits) is
   reported next to it as ``topk_entry_pos_per_s``.
2. At V = 151,936, --positions positions and hidden size --hidden (fp32 logits):
     stats_vs_logsoftmax  the statistics pass relative to ONE torch.log_softmax over the same
                          logits (target <= 1.2)
     stats_vs_lmhead      the same pass relative to the LM-head matmul that produced the logits
     peak_extra_mem_gb    peak resident memory the statistics pass adds on top of the logits
                          (target <= 0.5 GB), in a fresh process (Linux clear_refs)
     select_1M_s          normalization + budget selection + metrics for 1,048,576 positions,
                          the slowest selector
   and, for reference, a naive chunked pass, the pass through ``rows=`` (the verl hook) and the
   pass with the old fixed chunk of 8 rows.
The machine's load average is printed: other processes slow every number down alike, so
compare the ratios. Timings are medians over --repeats runs.
Usage: OMP_NUM_THREADS=1 python benchmarks/bench_scoring.py [--quick]
(the thread count of the throughput table is set inside; OMP_NUM_THREADS only caps "all").
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

from ta_opd import TAConfig, available_selectors, select_positions, sparse_position_stats
from ta_opd.stats import PositionStats, topk_position_stats


def _median_time(fn, repeats: int, cpu: bool = False):
    """Median wall seconds of fn(); with cpu=True also the median CPU seconds of this process
    (one thread: close to the wall time the same work takes on an idle machine)."""
    times, cpus = [], []
    for _ in range(repeats):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        del out
    if cpu:
        return statistics.median(times), statistics.median(cpus)
    return statistics.median(times)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# a child measuring peak memory runs with glibc's mmap threshold fixed at 64 KiB, so a freed tensor's
# pages go back to the kernel and the resident set follows the live tensors (otherwise glibc keeps
# freed blocks and the same configuration's peak varied by 0.3 GB between runs); not for timing
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def reset_peak() -> None:
    """Reset this process's VmHWM (peak resident set) to its current resident set."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_extra_gb(fn) -> float:
    """Peak RSS above the RSS before fn(), after resetting the kernel's high-water mark.

    Run in a fresh process (see --mem-child): in a process that already freed large buffers,
    the allocator's retained pages would hide the pass's own temporaries."""
    gc.collect()
    before = _rss_kb("VmRSS")
    reset_peak()
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
    """A plausible teacher top-K': half of the student's top ids (reordered), half other ids,
    with full-vocabulary log-probs of total mass 0.9, in descending order."""
    n = logits.shape[0]
    s_top = logits.topk(k_prime, dim=-1).indices
    shared = s_top[:, torch.randperm(k_prime, generator=gen)[: k_prime // 2]]
    other = torch.randint(0, logits.shape[1], (n, k_prime - k_prime // 2), generator=gen)
    ids = torch.cat([shared, other], dim=-1)
    # distinct ids per row are not required by the stats
    logp = torch.log_softmax(torch.randn(n, k_prime, generator=gen) * 2, dim=-1) + torch.log(torch.tensor(0.9))
    return ids, logp.sort(dim=-1, descending=True).values


def _grid(stats: PositionStats, n: int) -> tuple[PositionStats, torch.Tensor]:
    """(N,) statistics as a (N / 512, 512) batch of sequences, all valid."""
    t = 512 if n % 512 == 0 else n
    grid = PositionStats.from_scalars({k: v.reshape(-1, t) for k, v in stats.scalars().items()})
    return grid, torch.ones(n // t, t, dtype=torch.bool)


def _concat_stats(parts: list[PositionStats]) -> PositionStats:
    return PositionStats.from_scalars({k: torch.cat([p.scalars()[k] for p in parts]) for k in PositionStats.SCALARS})


def support_throughput(n: int, vocab: int, tile_mb: int, repeats: int, gen: torch.Generator,
                       cfg: TAConfig) -> tuple[float, float, float, float]:
    """(positions/s of stats + normalization + selection, the same from CPU seconds, seconds of
    the stats pass, seconds of normalization + selection) for n positions at ``vocab``."""
    tile = max(1, min(n, tile_mb * 2**20 // (4 * vocab)))
    calls = -(-n // tile)
    logits = torch.randn(tile, vocab, generator=gen) * 3
    ids, lp = teacher_topk(logits, 64, gen)

    def stats_pass():
        parts, left = [], n
        while left > 0:
            m = min(tile, left)
            parts.append(sparse_position_stats(logits[:m], ids[:m], lp[:m], topk=cfg.topk, **cfg.stats_chunking()))
            left -= m
        return parts[0] if calls == 1 else _concat_stats(parts)

    st = stats_pass()
    grid, valid = _grid(st, n)
    t_stats, c_stats = _median_time(stats_pass, repeats, cpu=True)
    t_sel, c_sel = _median_time(lambda: select_positions(grid, valid, cfg, step=1), repeats, cpu=True)
    return n / (t_stats + t_sel), n / (c_stats + c_sel), t_stats, t_sel


def topk_entry_throughput(n: int, repeats: int, gen: torch.Generator, cfg: TAConfig) -> tuple[float, float]:
    """positions/s of topk_position_stats + normalization + selection (V = 151,936: the
    vocabulary only sizes the lookup table; no logits exist on this path)."""
    vocab = 151936
    s_lp = torch.log_softmax(torch.randn(n, cfg.teacher_topk, generator=gen) * 2, dim=-1) + torch.log(torch.tensor(0.8))
    s_lp = s_lp.sort(dim=-1, descending=True).values[:, : cfg.topk]
    s_ids = torch.stack([torch.randperm(vocab, generator=gen)[: cfg.topk] for _ in range(64)]).repeat(n // 64 + 1, 1)[:n]
    t_ids = torch.cat([s_ids[:, torch.randperm(cfg.topk, generator=gen)], torch.randint(0, vocab, (n, cfg.teacher_topk - cfg.topk), generator=gen)], -1)
    t_lp = (torch.log_softmax(torch.randn(n, cfg.teacher_topk, generator=gen) * 2, -1) + torch.log(torch.tensor(0.9))).sort(-1, descending=True).values
    h = torch.rand(n, generator=gen) * 4

    def run():
        st = topk_position_stats(s_ids, s_lp, t_ids, t_lp, topk=cfg.topk, vocab_size=vocab, student_entropy=h)
        grid, valid = _grid(st, n)
        return select_positions(grid, valid, cfg, step=1)

    run()
    wall, cpu = _median_time(run, repeats, cpu=True)
    return n / wall, n / cpu


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


def _load() -> str:
    return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def throughput_table(a, gen) -> tuple[float, float]:
    cfg = TAConfig(topk=a.topk, teacher_topk=a.teacher_topk, budget=0.1)
    all_threads = torch.get_num_threads()
    points = [(v, n) for v in (128, 4096, 151936) for n in (16384, 262144)]
    if a.quick:  # the acceptance point, the small and medium V at N = 16,384, V = 151,936 at 1,024
        points = [(128, 262144), (128, 16384), (4096, 16384), (151936, 1024)]
    support = None
    print(f"\nstatistics + normalization + selection, positions/s (K={a.topk}, K'={a.teacher_topk}, rho=0.1; {_load()})")
    print("pos/s(cpu): from the process's CPU seconds, shown for one thread (the machine is shared)")
    print(f"{'V':>8} {'N':>8} {'threads':>7} {'pos/s':>12} {'pos/s(cpu)':>12} {'stats s':>9} {'select s':>9}")
    for vocab, n in points:
        for threads in sorted({1, all_threads}):
            if a.quick and threads != 1 and (vocab, n) != (128, 16384):
                continue
            torch.set_num_threads(threads)
            rate, rate_cpu, t_stats, t_sel = support_throughput(n, vocab, a.tile_mb, a.repeats, gen, cfg)
            cpu_col = f"{rate_cpu:>12,.0f}" if threads == 1 else f"{'-':>12}"
            print(f"{vocab:>8} {n:>8} {threads:>7} {rate:>12,.0f} {cpu_col} {t_stats:>9.3f} {t_sel:>9.3f}", flush=True)
            if (vocab, n, threads) == (128, 262144, 1):
                support = (rate, rate_cpu)
    torch.set_num_threads(1)
    topk_rate = topk_entry_throughput(262144, a.repeats, gen, cfg)
    print(f"top-K-only entry point (topk_position_stats) + selection, N=262144, 1 thread: "
          f"{topk_rate[0]:,.0f} pos/s ({topk_rate[1]:,.0f} from CPU seconds)")
    torch.set_num_threads(all_threads)
    return support, topk_rate


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="TA-OPD scoring benchmark")
    p.add_argument("--positions", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--teacher-topk", type=int, default=64)
    p.add_argument("--chunk", type=int, default=None, help="rows per chunk (default: from the byte budget)")
    p.add_argument("--tile-mb", type=int, default=512, help="largest logits tensor of the throughput table")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="fewer points and repeats: < 2 min on a loaded 2-core machine")
    p.add_argument("--no-table", action="store_true", help="skip the throughput table (part 1)")
    p.add_argument("--mem-child", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    if a.quick:
        a.positions, a.hidden, a.repeats, a.tile_mb = 512, 256, 1, 128
    if a.mem_child:
        return memory_child(a)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"N={a.positions} hidden={a.hidden} V={a.vocab} K={a.topk} K'={a.teacher_topk} "
          f"chunk={a.chunk or 'auto'}; {_load()}", flush=True)
    support, topk_rate = ((float("nan"),) * 2,) * 2 if a.no_table else throughput_table(a, gen)

    hidden = torch.randn(a.positions, a.hidden, generator=gen)
    lm_head = torch.randn(a.vocab, a.hidden, generator=gen) * (a.hidden ** -0.5) * 4
    t_lmhead = _median_time(lambda: hidden @ lm_head.T, a.repeats)
    logits = hidden @ lm_head.T  # (N, V) fp32
    del lm_head
    print(f"\nlogits {tuple(logits.shape)} {logits.dtype}: {logits.numel() * 4 / 1024**3:.2f} GB; {_load()}", flush=True)
    tk_ids, tk_logp = teacher_topk(logits, a.teacher_topk, gen)

    def stats_pass(chunk=a.chunk, **kw):
        return sparse_position_stats(logits, tk_ids, tk_logp, topk=a.topk, chunk_size=chunk, **kw)

    # log_softmax and the statistics pass alternate, so that load changes hit both alike
    t_lsm, t_stats = [], []
    for _ in range(a.repeats):
        t_lsm.append(_median_time(lambda: torch.log_softmax(logits, dim=-1), 1))
        t_stats.append(_median_time(stats_pass, 1))
    t_lsm, t_stats = statistics.median(t_lsm), statistics.median(t_stats)
    t_fixed8 = _median_time(lambda: stats_pass(chunk=8), a.repeats)
    t_naive = _median_time(lambda: naive_stats(logits, tk_ids, tk_logp, a.topk, 256), a.repeats)
    rows = torch.arange(a.positions)  # the verl hook's path: rows of a packed tensor, gathered per chunk
    t_rows = _median_time(lambda: stats_pass(rows=rows), a.repeats)
    mem = measure_memory_in_child(argv or [])
    st = stats_pass()
    print(f"lm_head matmul        {t_lmhead:8.3f} s")
    print(f"log_softmax           {t_lsm:8.3f} s")
    print(f"statistics pass       {t_stats:8.3f} s  (missing-id positions: {float((st.missing > 0).float().mean()):.2f})")
    print(f"  with chunk_size=8   {t_fixed8:8.3f} s  (fixed8_vs_stats={t_fixed8 / t_stats:.2f})")
    print(f"naive chunked pass    {t_naive:8.3f} s  (naive_vs_logsoftmax={t_naive / t_lsm:.2f})")
    print(f"statistics via rows=  {t_rows:8.3f} s  (stats_rows_vs_stats={t_rows / t_stats:.2f})", flush=True)
    del logits, hidden, st
    gc.collect()

    n_seq, seq_len = (64, 512) if a.quick else (512, 2048)
    sel = selection_seconds(n_seq, seq_len, a.repeats)
    for name, sec in sel.items():
        print(f"select {n_seq * seq_len} positions  {name:<26}{sec:8.3f} s")
    slowest = max(sel.values())
    print(f"{_load()}; topk_entry_pos_per_s={topk_rate[0]:.0f} (cpu {topk_rate[1]:.0f}) "
          f"support_pos_per_s_cpu={support[1]:.0f}")
    print(f"stats_vs_logsoftmax={t_stats / t_lsm:.2f} stats_vs_lmhead={t_stats / t_lmhead:.2f} "
          f"peak_extra_mem_gb={mem:.3f} select_1M_s={slowest:.3f} support_pos_per_s={support[0]:.0f}")


if __name__ == "__main__":
    sys.exit(main())
