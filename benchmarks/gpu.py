"""The GPU benchmark (`benchmarks/gpu.sh`, under 5 minutes on one GPU): all-MiniLM-L6-v2, MarginMSE, real
passages. Training samples/s and peak memory for the project's model and loss vs sentence-transformers' model
and MarginMSELoss on the same batches, at bf16 autocast on CUDA (fp32 on CPU); the project with torch.compile,
and with unpadded (varlen) flash attention where flash-attn is installed; encoding passages/s, project
(eager and with task.compile) vs sentence-transformers' `encode`. On a machine without a GPU it runs on CPU (a test keeps it working).

    bash benchmarks/gpu.sh [--batch-size 32] [--steps 20] [--passages 4096] [--quick]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time

import torch

from benchmarks.common import BACKBONE, backbone_path, passages, setup, train_examples


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _peak_mb(dev) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None


def _reset(dev):
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def project_step(dev, bf16: bool, compile_: bool = False, attn: str = "sdpa"):
    """One training step of the project's BiEncoder + MarginMSELoss (what RetrieverModule.training_step runs)."""
    from marco_lightning.losses import MarginMSELoss
    from marco_lightning.models import BiEncoder

    torch.manual_seed(0)
    model = BiEncoder(BACKBONE, similarity="dot", attn_implementation=attn).to(dev).train()
    loss_fn, optimizer = MarginMSELoss(), torch.optim.AdamW(model.parameters(), lr=2e-5, fused=dev.type == "cuda")
    collate = model.collator().train
    forward = torch.compile(model.candidate_scores) if compile_ else model.candidate_scores

    def step(examples):
        batch = collate(examples)
        batch = {k: ({n: t.to(dev) for n, t in v.items()} if isinstance(v, dict) else
                     v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            scores = forward(batch)
        loss = loss_fn(scores.float(), batch["teacher"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def st_step(dev, bf16: bool):
    """sentence-transformers' model and MarginMSELoss, its own tokenisation, the same optimizer."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MarginMSELoss

    torch.manual_seed(0)
    st = SentenceTransformer(backbone_path(), device=str(dev))
    st.train()
    loss_fn = MarginMSELoss(st)
    optimizer = torch.optim.AdamW(st.parameters(), lr=2e-5, fused=dev.type == "cuda")

    def step(examples):
        columns = [[q for q, _, _ in examples], [d[0] for _, d, _ in examples], [d[1] for _, d, _ in examples]]
        features = [{k: v.to(dev) if torch.is_tensor(v) else v for k, v in st.tokenize(c).items()} for c in columns]
        labels = torch.tensor([t[0] - t[1] for _, _, t in examples], device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(features, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def timed_steps(make, dev, examples, batch_size: int, steps: int, warmup: int) -> dict:
    _reset(dev)
    start = time.perf_counter()
    step = make()
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    for b in batches[:warmup]:
        step(b)
    _sync(dev)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(steps):
        step(batches[(warmup + i) % len(batches)])
    _sync(dev)
    seconds = time.perf_counter() - start
    return {"samples_per_s": steps * batch_size / seconds, "warmup_s": warm, "peak_mb": _peak_mb(dev)}


def encode_rates(dev, bf16: bool, texts: list[str], compile_: bool = True) -> dict:
    from sentence_transformers import SentenceTransformer

    from marco_lightning.inference import compile_model, encode
    from marco_lightning.models import BiEncoder

    out = {}
    model = BiEncoder(BACKBONE).to(dev).eval()
    st = SentenceTransformer(backbone_path(), device=str(dev))

    def compiled_row():  # built in its turn, so the rows before it do not hold its memory
        compiled = compile_model(BiEncoder(BACKBONE).to(dev).eval())
        return lambda: encode(compiled, texts, 64)

    rows = {"project": lambda: encode(model, texts, 64),
            "sentence-transformers": lambda: st.encode(texts, batch_size=64)}
    if compile_:
        rows["project + task.compile"] = None
    for name, fn in rows.items():
        _reset(dev)
        fn = fn or compiled_row()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16 and name == "sentence-transformers"):
            start = time.perf_counter()  # ours autocasts itself (task.precision=auto)
            fn()  # warm-up (CUDA kernels, allocator; compiling)
            _sync(dev)
            warm = time.perf_counter() - start
            start = time.perf_counter()
            fn()
            _sync(dev)
        out[name] = {"passages_per_s": len(texts) / (time.perf_counter() - start), "peak_mb": _peak_mb(dev),
                     "warmup_s": warm}
    return out


def run(batch_size: int = 32, steps: int = 20, warmup: int = 3, num_passages: int = 4096, log=print,
        compile_: bool = True) -> dict:
    setup()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = dev.type == "cuda"
    examples = train_examples((warmup + steps) * batch_size)
    rows = {"project (sdpa, padded)": lambda: project_step(dev, bf16),
            "sentence-transformers MarginMSELoss": lambda: st_step(dev, bf16)}
    if compile_:  # minutes of compiling on CPU: --quick leaves it out there
        rows["project + torch.compile"] = lambda: project_step(dev, bf16, compile_=True)
    if dev.type == "cuda" and importlib.util.find_spec("flash_attn"):
        rows["project + flash_attention_2 (unpadded varlen)"] = lambda: project_step(dev, bf16,
                                                                                     attn="flash_attention_2")
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "precision":
           "bf16 autocast" if bf16 else "fp32", "batch_size": batch_size, "steps": steps, "train": {}}
    for name, make in rows.items():
        res["train"][name] = timed_steps(make, dev, examples, batch_size, steps, warmup)
        log(f"gpu bench: {name}: {res['train'][name]['samples_per_s']:.1f} samples/s")
    res["encode"] = encode_rates(dev, bf16, list(passages(limit=num_passages).values()), compile_)
    return res


def markdown(res: dict) -> str:
    base = res["train"]["sentence-transformers MarginMSELoss"]["samples_per_s"]

    def mb(x):
        return "-" if x is None else f"{x:,.0f}"
    lines = [f"## GPU: {res['device']}", "",
             (f"all-MiniLM-L6-v2, MarginMSE (query, positive, negative), batch {res['batch_size']}, "
              f"{res['steps']} timed steps after warm-up, {res['precision']}."), "",
             "| training | samples/s | / sentence-transformers | warm-up s | peak MB |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / base:.2f} | {r['warmup_s']:.1f} | "
              f"{mb(r['peak_mb'])} |" for name, r in res["train"].items()]
    e = res["encode"]
    st = e["sentence-transformers"]["passages_per_s"]
    lines += ["", "| encoding | passages/s | / sentence-transformers | first pass s | peak MB |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['passages_per_s']:.1f} | {r['passages_per_s'] / st:.2f} | {r['warmup_s']:.1f} | "
              f"{mb(r['peak_mb'])} |" for name, r in e.items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--passages", type=int, default=4096)
    p.add_argument("--quick", action="store_true", help="2 steps of batch 2, 8 passages: checks that it runs")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    quick_compile = torch.cuda.is_available()
    res = run(2, 1, 1, 8, compile_=quick_compile) if args.quick else run(args.batch_size, args.steps, 3, args.passages)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
