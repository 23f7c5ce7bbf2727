"""What a LoRA adapter's rows cost a step (engine/lora.py), against the same rows without one.

    .venv/bin/python bench/lora_cost.py --batch 16 --rank 16 --reps 7

On the embedded model, one ModelRunner with two random adapters (every q/k/v/o/gate/up/down
projection, rank --rank) loaded: B sequences of ~--prompt tokens prefilled, then decode steps
timed in alternation (a busy machine slows every variant alike), medians printed:

  base         no row names an adapter (the fast paths: the native step where the kernels run)
  half         half the rows name adapter a, half none
  all          every row names adapter a
  two          half a, half b (two groups)

and one prefill chunk of --prompt tokens with and without an adapter. Last, the delta of one
fused linear (q/k/v: the widest) computed the two ways lora.StepLora could: rows grouped by
adapter (two small GEMMs a group) against a per-row gather of each row's matrices (bmm).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline_dsl.engine.lora import LoraWeights, read_adapter
from pipeline_dsl.engine.model import LlamaModel, ModelRunner, SeqBatchItem
from pipeline_dsl.engine.models import load_weights, resolve_model

MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_adapter(folder: Path, config, rank: int, seed: int) -> Path:
    import json

    from safetensors.torch import save_file

    from pipeline_dsl.engine.lora import shapes

    want = shapes(config)
    names = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
             "down_proj": "down"}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for peft, part in MODULES.items():
            out, inp = want[names[peft]]
            key = f"base_model.model.model.layers.{layer}.{part}.{peft}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=g) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                            "target_modules": list(MODULES)}))
    return folder


def median_ms(times) -> float:
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="decode steps per variant per round")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config, weights, _ = load_weights(resolve_model(None))
    model = LlamaModel(config, weights, dtype=args.dtype)
    bs = 16
    nblk = (args.prompt + 20 + args.steps * args.reps * 4 + 40) // bs + 1
    runner = ModelRunner(model, num_blocks=(args.batch + 2) * nblk, block_size=bs)
    with tempfile.TemporaryDirectory() as tmp:
        for name, seed in (("a", 1), ("b", 2)):
            adapter = read_adapter(write_adapter(Path(tmp) / name, config, args.rank, seed), name)
            runner.loras[name] = LoraWeights(adapter, config, model.dtype, model.device)
    rng = np.random.default_rng(0)
    tables = [list(range(i * nblk, (i + 1) * nblk)) for i in range(args.batch + 2)]
    lens = []
    with torch.inference_mode():
        for table in tables[:args.batch]:
            n = int(rng.integers(args.prompt - 10, args.prompt + 11))
            runner.execute([SeqBatchItem(rng.integers(100, 40000, n).tolist(), 0, table, True)])
            lens.append(n)
    B = args.batch
    variants = {"base": [None] * B, "half": ["a" if i % 2 else None for i in range(B)], "all": ["a"] * B,
                "two": ["a" if i % 2 else "b" for i in range(B)]}
    times: dict = {k: [] for k in variants}
    prefill: dict = {"base": [], "adapter": []}
    pos = list(lens)

    def decode(names):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            runner.execute([SeqBatchItem([int(rng.integers(100, 40000))], pos[i], tables[i], True, lora=names[i])
                            for i in range(B)])
            for i in range(B):
                pos[i] += 1
        return (time.perf_counter() - t0) / args.steps

    prompt = rng.integers(100, 40000, args.prompt).tolist()
    with torch.inference_mode():
        for name in variants:                       # warm-up
            decode(variants[name])
        for rep in range(args.reps):
            order = list(variants) if rep % 2 == 0 else list(reversed(variants))
            for name in order:
                times[name].append(decode(variants[name]))
            for key, lora in (("base", None), ("adapter", "a")) if rep % 2 == 0 else (("adapter", "a"), ("base", None)):
                t0 = time.perf_counter()
                runner.execute([SeqBatchItem(prompt, 0, tables[B], True, lora=lora)])
                prefill[key].append(time.perf_counter() - t0)
    base = median_ms(times["base"])
    print(f"embedded model, {model.dtype}, {torch.get_num_threads()} threads, native kernels "
          f"{'on' if runner.native is not None else 'off'}; rank {args.rank} on all 7 projections; "
          f"batch {B}, {args.reps} rounds of {args.steps} steps")
    for name in variants:
        ms = median_ms(times[name])
        print(f"  decode {name:5s} {ms:8.2f} ms/step  x{ms / base:.2f}")
    pb = median_ms(prefill["base"])
    print(f"  prefill {args.prompt} tokens: base {pb:.1f} ms, adapter {median_ms(prefill['adapter']):.1f} ms "
          f"x{median_ms(prefill['adapter']) / pb:.2f}")

    # the delta of the fused q/k/v linear: grouped by adapter vs a per-row gather
    (a1, b1), (a2, b2) = runner.loras["a"].layers[0]["qkv"], runner.loras["b"].layers[0]["qkv"]
    x = torch.randn(B, config.hidden_size, dtype=a1.dtype)            # the matrices' (float32: lora.py)
    which = torch.tensor([i % 2 for i in range(B)])
    stack_a, stack_b = torch.stack([a1, a2]), torch.stack([b1, b2])        # [2, R, in], [2, out, R]
    rows = [torch.nonzero(which == k).flatten() for k in (0, 1)]

    def grouped():
        y = torch.zeros(B, b1.shape[0], dtype=a1.dtype)
        for (a, b), r in zip(((a1, b1), (a2, b2)), rows):
            y.index_add_(0, r, (x.index_select(0, r) @ a.t()) @ b.t())
        return y

    def gathered():
        ra, rb = stack_a[which], stack_b[which]                           # [B, R, in], [B, out, R]
        return torch.bmm(rb, torch.bmm(ra, x.unsqueeze(-1))).squeeze(-1)

    assert torch.allclose(grouped(), gathered(), atol=1e-3, rtol=1e-2)
    res = {}
    with torch.inference_mode():
        for fn in (grouped, gathered):
            got = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                for _ in range(20):
                    fn()
                got.append((time.perf_counter() - t0) / 20)
            res[fn.__name__] = median_ms(got)
    print(f"  one q/k/v delta, {B} rows of two adapters: grouped {res['grouped'] * 1e3:.0f} us, "
          f"per-row gather {res['gathered'] * 1e3:.0f} us")


if __name__ == "__main__":
    main()
