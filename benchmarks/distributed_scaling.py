"""Task-parallel scaling of meta-training: tasks/s at world size 1 and 2 (gloo, 127.0.0.1), and the pieces of a
scaling model — compute time per task, serial per-iteration work, and one all-reduce of |w| floats.

    PYTHONPATH=src python benchmarks/distributed_scaling.py [--tasks 256] [--iters 15] [--repeats 3] [--worlds 1 2]

Setting: MMP on sine (MLP 1-40-40-1, |w| = 1761), K = 10 support points, 15 inner SGD steps, a global minibatch
of ``--tasks`` tasks each iteration, one thread per process. With p > 1 ranks two ways of sampling run side by
side in the same processes (their order alternating between repeats):

- ``full``: every rank builds the whole global minibatch and the learner keeps its share (a plain list: what
  ``metaprox train`` did before sharded sampling);
- ``sharded``: every rank draws the random numbers of the whole minibatch but builds only its share
  (``SineFamily.sample(part=...)`` → a ``TaskShare``: what ``metaprox train`` does now).

The world sizes alternate ``--repeats`` times (the machine is shared: the best repeat is the least
disturbed); each process is a fresh ``torch.multiprocessing.spawn`` child. Per iteration we record

- ``sample``: drawing the minibatch (serial: ``full`` builds all B tasks on every rank, ``sharded`` B/p);
- ``step``: ``MetaLearner.step`` — the local share's solves and meta-gradient, the all-reduce, the update;
- ``reduce``: the time inside ``reducer.sum`` (the all-reduce *including* waiting for the slower rank);

and separately ``allreduce_us``: the median of 200 back-to-back all-reduces of a (|w| + 8)-float buffer after a
barrier — the communication cost alone. The single-process runs also time the step at the batch ``B/p`` of
every other world size ``p``, so the model ``T(p) = sample(B) + step_1(B/p) + allreduce(p)`` can be checked
against the measured ``p``-process iteration of ``full`` sampling.
Writes ``benchmarks/results/distributed_scaling.json``, then prints the scaling model's predicted efficiency at
8, 64 and 512 workers (``--predict-only`` redoes only that, from the saved JSON): see :func:`predict` and
docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sine import make_rule  # noqa: E402

from metaprox.distributed import AllReduceReducer, LocalReducer  # noqa: E402
from metaprox.tasks.share import TaskShare  # noqa: E402
from metaprox.tasks.sine import SineFamily  # noqa: E402


class _Timed:
    """Wraps a reducer and accumulates the seconds spent in ``sum``."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0
        self.rank, self.world_size = inner.rank, inner.world_size

    def part(self, n):
        return self.inner.part(n)

    def sum(self, tensors, scalars):
        t0 = time.perf_counter()
        out = self.inner.sum(tensors, scalars)
        self.seconds += time.perf_counter() - t0
        return out


def _iterations(batch: int, iters: int, reducer, sharded: bool = False, warmup: int = 2) -> dict[str, float]:
    learner = make_rule("mmp", steps=15, execution="auto")
    timed = _Timed(reducer)
    learner.reducer = timed
    fam, gen = SineFamily(), torch.Generator().manual_seed(0)
    part = reducer.part(batch)
    samples, steps, reduces, shares = [], [], [], []
    for i in range(warmup + iters):
        c0 = time.process_time()
        t0 = time.perf_counter()
        if sharded:  # only this rank's share is built; the whole minibatch's random numbers are drawn
            tasks = TaskShare.uniform(fam.sample(batch, 10, gen, part=part), batch, part, 10, 0)
        else:
            tasks = fam.sample(batch, 10, gen)
        t1 = time.perf_counter()
        timed.seconds = 0.0
        learner.step(tasks, monitor=False)
        t2 = time.perf_counter()
        c2 = time.process_time()
        if i >= warmup:
            shares.append((c2 - c0) / (t2 - t0))
            samples.append(t1 - t0)
            steps.append(t2 - t1)
            reduces.append(timed.seconds)
    med = statistics.median
    return {"sample_s": med(samples), "step_s": med(steps), "reduce_s": med(reduces),
            "iter_s": med([a + b for a, b in zip(samples, steps, strict=True)]), "cpu_share": med(shares),
            "params": sum(p.numel() for p in learner.fmodel.params())}


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str, repeat: int) -> None:
    torch.set_num_threads(1)
    result: dict = {"world": world}
    if world == 1:
        result["full"] = _iterations(args.tasks, args.iters, LocalReducer())
        for p in args.worlds:
            if p > 1:
                result[f"share{p}"] = _iterations(-(-args.tasks // p), args.iters, LocalReducer())
    else:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world)
        try:
            for mode in (("full", "sharded") if repeat % 2 == 0 else ("sharded", "full")):
                result[mode] = _iterations(args.tasks, args.iters, AllReduceReducer(), sharded=mode == "sharded")
            buf = torch.zeros(result["full"]["params"] + 8)
            times = []
            for _ in range(200):
                torch.distributed.barrier()
                t0 = time.perf_counter()
                torch.distributed.all_reduce(buf)
                times.append(time.perf_counter() - t0)
            result["allreduce_us"] = statistics.median(times) * 1e6
            result["allreduce_bytes"] = buf.numel() * 4
        finally:
            torch.distributed.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    if world > 1:  # torch 2.13's gloo can abort at interpreter teardown (as in metaprox.cli.run): skip it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# Interconnects of the predictions: (name, latency α per message in s, bandwidth in bytes/s). Assumptions, not
# measurements: TCP over 10 GbE as gloo uses it between CPU nodes; InfiniBand HDR-class 100 Gb/s with NCCL.
INTERCONNECTS = [("10GbE TCP (gloo)", 50e-6, 1.25e9), ("100Gb/s InfiniBand (NCCL)", 5e-6, 12.5e9)]
# (name, floats |w|, per-task compute in s, per-task serial sampling in s): the sine row is filled in from the
# measurement; the Conv-4 row's compute is the measured 1-thread CPU MMP iteration of benchmarks/omniglot_conv4.py
# (batched+channels_last, 600 ms for 5 tasks on this shared machine), its sampling assumed negligible.
CONV4 = ("Omniglot Conv-4/32 (|w| = 28357)", 28357, 0.120, 0.0)


def allreduce_s(p: int, floats: int, alpha: float, bw: float, algo: str = "ring") -> float:
    """Ring all-reduce: 2(p−1)/p·4|w|/bw + 2(p−1)·α; "tree" (recursive halving/doubling): 2·log2(p)·α instead
    of the ring's 2(p−1)·α latency term, same bandwidth term."""
    import math

    if p == 1:
        return 0.0
    lat = 2 * (p - 1) * alpha if algo == "ring" else 2 * math.log2(p) * alpha
    return 2 * (p - 1) / p * 4 * floats / bw + lat


def predict(p: int, share: int, compute: float, sample: float, floats: int, alpha: float, bw: float,
            algo: str = "ring", sharded_sampling: bool = False) -> float:
    """Weak-scaling efficiency at ``p`` workers with ``share`` tasks each (global batch ``share·p``):
    ``T_1 / T_p`` with ``T_1 = share·(compute + sample)`` and
    ``T_p = share·compute + (share if sharded_sampling else share·p)·sample + allreduce(p)``."""
    t1 = share * (compute + sample)
    tp = share * compute + (share if sharded_sampling else share * p) * sample + allreduce_s(p, floats, alpha, bw,
                                                                                           algo)
    return t1 / tp


def predictions(summary: dict) -> list[dict]:
    st = summary["setting"]
    w1 = summary["worlds"]["1"]
    sine = (f"sine MLP (|w| = {st['params']})", st["params"], w1["step_s"] / st["global_batch"],
            w1["sample_s"] / st["global_batch"])
    rows = []
    for name, floats, compute, sample in (sine, CONV4):
        for share in ((32,) if compute < 0.01 else (4,)):
            for net, alpha, bw in INTERCONNECTS:
                for algo in ("ring", "tree"):
                    for sharded in ((False, True) if sample else (False,)):
                        rows.append({"model": name, "tasks_per_worker": share, "interconnect": net, "allreduce": algo,
                                     "sampling": "sharded" if sharded else "every rank draws all",
                                     **{str(p): round(predict(p, share, compute, sample, floats, alpha, bw, algo,
                                                              sharded), 3) for p in (2, 8, 64, 512)}})
    return rows


def _print_predictions(rows: list[dict]) -> None:
    print("| model | tasks/worker | interconnect | all-reduce | sampling | E(2) | E(8) | E(64) | E(512) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['tasks_per_worker']} | {r['interconnect']} | {r['allreduce']} | {r['sampling']} | "
              + " | ".join(f"{r[str(p)]:.2f}" for p in (2, 8, 64, 512)) + " |")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, args: argparse.Namespace, repeat: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        torch.multiprocessing.spawn(_worker, args=(world, _free_port(), args, out, repeat), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=256, help="global task minibatch B")
    p.add_argument("--iters", type=int, default=15, help="timed outer iterations per run (after 2 warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats of the world sizes")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="world sizes (1 is always run)")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "distributed_scaling.json"))
    p.add_argument("--predict-only", action="store_true", help="print the predictions from the saved --json")
    args = p.parse_args()
    if args.predict_only:
        _print_predictions(predictions(json.loads(Path(args.json).read_text())))
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    args.worlds = sorted(set(args.worlds) | {1})
    runs: dict[int, list[dict]] = {p: [] for p in args.worlds}
    for repeat in range(args.repeats):
        for world in args.worlds:
            runs[world].append(_run(world, args, repeat))
    best = {p: min(runs[p], key=lambda r: r["full"]["iter_s"]) for p in args.worlds}
    b, one = args.tasks, best[1]
    t1 = one["full"]["iter_s"]
    worlds = {}
    for p in args.worlds:
        r = best[p]["full"]
        row = {"cpu_share": r["cpu_share"], "tasks_per_s": b / r["iter_s"], "iter_s": r["iter_s"],
               "sample_s": r["sample_s"],
               "step_s": r["step_s"], "speedup": t1 / r["iter_s"], "efficiency": t1 / (p * r["iter_s"])}
        if p > 1:
            allreduce_s = min(x["allreduce_us"] for x in runs[p]) * 1e-6
            # the model: serial sampling + one process's step on its share + one bare all-reduce
            predicted = one["full"]["sample_s"] + one[f"share{p}"]["step_s"] + allreduce_s
            # the same with the CPU each process really got on this shared machine (process time / wall time):
            # compute stretched by (share of the 1-process run) / (share of rank 0 here)
            stretch = one["full"]["cpu_share"] / r["cpu_share"]
            contended = (one["full"]["sample_s"] + one[f"share{p}"]["step_s"]) * stretch + allreduce_s
            row.update(reduce_in_step_s=r["reduce_s"], allreduce_us=allreduce_s * 1e6,
                       allreduce_bytes=runs[p][0]["allreduce_bytes"], share_step_1proc_s=one[f"share{p}"]["step_s"],
                       predicted_iter_s=predicted, predicted_speedup=t1 / predicted,
                       measured_over_predicted=r["iter_s"] / predicted, cpu_share=r["cpu_share"],
                       predicted_with_cpu_share_iter_s=contended,
                       measured_over_predicted_with_cpu_share=r["iter_s"] / contended)
            sh = min((x["sharded"] for x in runs[p]), key=lambda x: x["iter_s"])
            row["sharded"] = {"tasks_per_s": b / sh["iter_s"], "iter_s": sh["iter_s"], "sample_s": sh["sample_s"],
                              "step_s": sh["step_s"], "speedup": t1 / sh["iter_s"], "cpu_share": sh["cpu_share"],
                              "sample_full_over_sharded": r["sample_s"] / sh["sample_s"]}
        worlds[str(p)] = row
    summary = {
        "setting": {"rule": "mmp", "family": "sine", "model": "MLP 1-40-40-1", "params": one["full"]["params"],
                    "support": 10, "inner_steps": 15, "global_batch": b, "iters": args.iters,
                    "repeats": args.repeats, "threads_per_process": 1, "backend": "gloo (127.0.0.1)",
                    "cpus": len(os.sched_getaffinity(0)), "load_avg_at_end": os.getloadavg()[0],
                    "torch": torch.__version__},
        "compute_per_task_us": one["full"]["step_s"] / b * 1e6,
        "worlds": worlds,
        "all_runs": {str(k): v for k, v in runs.items()},
    }
    summary["predictions"] = predictions(summary)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(f"B = {b}, |w| = {summary['setting']['params']}, {summary['setting']['cpus']} CPUs, load avg "
          f"{summary['setting']['load_avg_at_end']:.1f}; compute {summary['compute_per_task_us']:.0f} µs/task "
          f"(1 process, batch B)")
    for p, w in worlds.items():
        line = (f"world {p}: {w['tasks_per_s']:.0f} tasks/s, iter {w['iter_s'] * 1e3:.1f} ms (sample "
                f"{w['sample_s'] * 1e3:.2f} + step {w['step_s'] * 1e3:.1f}), speedup {w['speedup']:.2f}, "
                f"efficiency {w['efficiency']:.2f}")
        if p != "1":
            line += (f"; in reducer {w['reduce_in_step_s'] * 1e3:.2f} ms, bare all-reduce of {w['allreduce_bytes']}"
                     f" B {w['allreduce_us']:.0f} µs; model {w['predicted_iter_s'] * 1e3:.1f} ms (speedup "
                     f"{w['predicted_speedup']:.2f}), measured/model {w['measured_over_predicted']:.2f}; CPU share "
                     f"{w['cpu_share']:.2f} vs {worlds['1']['cpu_share']:.2f} at world 1 → contended model "
                     f"{w['predicted_with_cpu_share_iter_s'] * 1e3:.1f} ms, measured/model "
                     f"{w['measured_over_predicted_with_cpu_share']:.2f}")
            sh = w["sharded"]
            line += (f"\n  sharded sampling: {sh['tasks_per_s']:.0f} tasks/s, iter {sh['iter_s'] * 1e3:.1f} ms (sample "
                     f"{sh['sample_s'] * 1e3:.2f} + step {sh['step_s'] * 1e3:.1f}), speedup {sh['speedup']:.2f}; "
                     f"sampling full/sharded {sh['sample_full_over_sharded']:.2f}×, CPU share {sh['cpu_share']:.2f}")
        print(line)
    _print_predictions(summary["predictions"])
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
