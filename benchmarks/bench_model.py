"""ModalTune model benchmark: parameter counts, peak memory and time of one training step vs bag size.

Each (N, checkpointing) point runs in a fresh subprocess so that the peak RSS (``ru_maxrss``) belongs to
that point alone; the reported figure is peak RSS minus the RSS after building the model and the batch,
i.e. what the training step itself adds. On CUDA the peak is ``torch.cuda.max_memory_allocated``.

Usage: python benchmarks/bench_model.py [--n 1000 2000 4000] [--device cpu|cuda] [--out benchmarks/results/model.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from modaltune.models.modaltune import ModalTune, merge_config, paper_config
from modaltune.models.registry import ModelDims


def paper_dims() -> ModelDims:
    # 331 pathways with 9,731 gene memberships, as in the authors' gene table.
    sizes = [29] * 331
    for i in range(9731 - sum(sizes)):
        sizes[i] += 1
    groups, off = [], 0
    for s in sizes:
        groups.append(list(range(off, off + s)))
        off += s
    return ModelDims(feature_dim=1536, n_genes=off, pathway_groups=groups)


def make_batch(n: int, dims: ModelDims, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    side = int(n**0.5) + 1
    cells = torch.randperm(side * side, generator=g)[:n]
    coords = torch.stack([cells // side, cells % side], 1).float() * 256 + 10  # one tile per 256-px cell
    batch = {
        "features": torch.randn(1, n, dims.feature_dim, generator=g),
        "coords": coords.unsqueeze(0),
        "patch_mask": torch.ones(1, n, dtype=torch.bool),
        "genes": torch.randn(1, dims.n_genes, generator=g),
        "has_genes": torch.tensor([True]),
    }
    return {k: v.to(device) for k, v in batch.items()}


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(n: int, ckpt: bool, device: str, amp: bool) -> dict:
    torch.manual_seed(0)
    dims = paper_dims()
    model = ModalTune(merge_config({"grad_checkpointing": ckpt}, paper_config()), dims).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=5e-4)
    batch = make_batch(n, dims, device)
    # optimizer state exists before the measured step (as in steady-state training)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    base = rss_mib()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated() / 2**20
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.autocast(device_type=device, dtype=torch.float16, enabled=amp):
        out = model(batch)["embedding"]
    out.float().square().sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t0
    cpu_s = time.process_time() - c0  # CPU seconds of this process: less sensitive to a shared machine
    res = {"n": n, "ckpt": ckpt, "device": device, "amp": amp, "step_s": round(step_s, 2), "cpu_s": round(cpu_s, 2),
           "rss_base_mib": round(base, 1),
           "rss_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    res["step_extra_mib"] = round(res["rss_peak_mib"] - base, 1)
    if device == "cuda":
        res["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        res["gpu_step_extra_mib"] = round(res["gpu_peak_mib"] - base_gpu, 1)
    return res


def param_counts() -> dict:
    model = ModalTune(paper_config(), paper_dims())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    parts = {name: sum(p.numel() for p in mod.parameters()) for name, mod in
             [("adapter.blocks", model.adapter.blocks), ("adapter.prompt_sa", model.adapter.prompt_sa),
              ("gene_encoder", model.gene_encoder), ("task_embed", model.task_embed),
              ("final_norm+final_project", torch.nn.ModuleList([model.final_norm, model.final_project]))]}
    parts["adapter.gene_pe"] = model.adapter.gene_pe.numel()
    parts["missing_genes (ours)"] = model.missing_genes.numel()
    return {"trainable": trainable, "frozen": frozen, "parts": parts}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 2000, 4000])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", action="store_true", help="fp16 autocast (CUDA)")
    ap.add_argument("--out", default=None, help="write a markdown report here")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--ckpt", action="store_true")
    ap.add_argument("--ckpt-modes", choices=["both", "on", "off"], default="both",
                    help="which activation-checkpointing settings to measure")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.n[0], args.ckpt, args.device, args.amp)))
        return

    counts = param_counts()
    print(json.dumps(counts, indent=1))
    rows = []
    for n in args.n:
        for ckpt in {"both": (False, True), "on": (True,), "off": (False,)}[args.ckpt_modes]:
            cmd = [sys.executable, __file__, "--worker", "--n", str(n), "--device", args.device]
            cmd += ["--ckpt"] if ckpt else []
            cmd += ["--amp"] if args.amp else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                rows.append({"n": n, "ckpt": ckpt, "error": proc.stderr.strip().splitlines()[-1]})
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    if args.out:
        write_report(Path(args.out), counts, rows, args)


def write_report(path: Path, counts: dict, rows: list[dict], args) -> None:
    lines = [
        "# ModalTune model benchmark",
        "",
        f"Command: `python benchmarks/bench_model.py --n {' '.join(map(str, args.n))} --device {args.device}"
        f"{' --amp' if args.amp else ''}{f' --threads {args.threads}' if args.threads else ''}"
        f"{'' if args.ckpt_modes == 'both' else ' --ckpt-modes ' + args.ckpt_modes} --out {args.out}`",
        f"Load average when the report was written: {os.getloadavg()} (shared machine: times are indicative)",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}"
        + (f", GPU {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
        "",
        "## Parameters (paper configuration: Prov-GigaPath LongNet 12x768, 331 pathways / 9,731 memberships)",
        "",
        f"- trainable: {counts['trainable']:,} (authors' hand count 33,524,890 + our 'missing genes' tokens "
        f"{counts['parts']['missing_genes (ours)']:,})",
        f"- frozen slide encoder: {counts['frozen']:,}",
    ]
    lines += [f"- {k}: {v:,}" for k, v in counts["parts"].items()]
    lines += [
        "",
        "## One training step (3 task passes, backward, AdamW), batch = 1 patient of N patches",
        "",
        "| N patches | activation checkpointing | step wall (s) | step CPU (s) | peak RSS (MiB) | added by the step (MiB) |"
        + (" GPU peak (MiB) |" if args.device == "cuda" else ""),
        "|---|---|---|---|---|---|" + ("---|" if args.device == "cuda" else ""),
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['ckpt']} | failed: {r['error']} | | | |")
            continue
        line = (f"| {r['n']} | {r['ckpt']} | {r['step_s']} | {r.get('cpu_s', '')} | {r['rss_peak_mib']} "
                f"| {r['step_extra_mib']} |")
        if args.device == "cuda":
            line += f" {r['gpu_peak_mib']} |"
        lines.append(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
