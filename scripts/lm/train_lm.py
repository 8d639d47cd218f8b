"""Train the study's two small decoder-only language models on the CPython standard library's sources (CPU).

    /path/to/torch-venv/bin/python scripts/lm/train_lm.py [--out out/lm] [--model gpt2|llama|both] [--steps N]

Writes, under --out: data/{train,heldout}_stream.npy (the tokenized splits), data/calib.npz (128 x 128
training windows) and data/heldout.npz (256 x 128 held-out windows), and per model <model>/hf/ (the
transformers checkpoint, safetensors) and <model>/train.json (settings, loss curve, held-out perplexity in
torch). The tokenizer is scripts/lm/tokenizer.json (committed; --retrain-tokenizer rebuilds it from the
training split, deterministically). See lmcommon.py for the data recipe and the model configurations.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import platform
import time

import lmcommon as L
import numpy as np


def prepare_data(out: pathlib.Path, tokenizer: pathlib.Path, retrain: bool = False) -> dict:
    """Tokenized splits and the calibration / held-out .npz files (written once; reused when present)."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    meta_path = data / "data.json"
    if not retrain and meta_path.exists() and (data / "train_stream.npy").exists():
        return L.load_json(meta_path)
    c = L.corpus()
    if retrain or not tokenizer.exists():
        L.train_tokenizer(c["texts"]["train"]).save(str(tokenizer))
    tok = L.load_tokenizer(tokenizer)
    train = L.token_stream(tok, c["texts"]["train"])
    held = L.token_stream(tok, c["texts"]["heldout"])
    np.save(data / "train_stream.npy", train)
    np.save(data / "heldout_stream.npy", held)
    calib = L.calib_windows(train)
    heldout = L.heldout_windows(held)
    np.savez(data / "calib.npz", input_ids=calib)
    np.savez(data / "heldout.npz", input_ids=heldout)
    meta = {"corpus": c["description"], "tokenizer": L.rel(tokenizer), "vocab": tok.get_vocab_size(),
            "eot_id": tok.token_to_id(L.EOT),
            "tokens": {"train": int(len(train)), "heldout": int(len(held))},
            "calib": {"file": "data/calib.npz", "shape": list(calib.shape),
                      "recipe": f"{L.N_CALIB} windows of {L.CONTEXT} tokens at sorted uniform random offsets of the "
                                f"training stream (numpy default_rng({L.CALIB_SEED}))"},
            "heldout": {"file": "data/heldout.npz", "shape": list(heldout.shape),
                        "recipe": f"{L.N_HELDOUT} non-overlapping windows of {L.CONTEXT} tokens spread evenly "
                                  f"(np.linspace over the {len(held) // L.CONTEXT} chunks) over the held-out stream"}}
    L.write_json(meta_path, meta)
    return meta


def torch_perplexity(model, windows: np.ndarray, batch: int = 32) -> float:
    import torch
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(windows), batch):
            x = torch.from_numpy(windows[s:s + batch])
            logits = model(input_ids=x).logits
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                                    x[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += x[:, 1:].numel()
    model.train()
    return math.exp(total / count)


def train(kind: str, args, meta: dict) -> dict:
    import torch
    import transformers
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    data = args.out / "data"
    train_stream = np.load(data / "train_stream.npy")
    held_stream = np.load(data / "heldout_stream.npy")
    heldout = np.load(data / "heldout.npz")["input_ids"]
    held_all = held_stream[:len(held_stream) // L.CONTEXT * L.CONTEXT].reshape(-1, L.CONTEXT).astype(np.int64)
    cfg = L.model_config(kind, vocab=meta["vocab"], eot_id=meta["eot_id"])
    cfg._attn_implementation = "sdpa"
    cls = transformers.GPT2LMHeadModel if kind == "gpt2" else transformers.LlamaForCausalLM
    model = cls(cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    warm = min(50, args.steps // 10)

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        frac = (step - warm) / max(1, args.steps - warm)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    rng = np.random.default_rng(args.seed)
    curve = []
    t0 = time.time()
    running = []
    for step in range(args.steps):
        starts = rng.integers(0, len(train_stream) - L.CONTEXT, size=args.batch)
        x = torch.from_numpy(np.stack([train_stream[s:s + L.CONTEXT] for s in starts]).astype(np.int64))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            ppl = torch_perplexity(model, heldout[:64])
            row = {"step": step + 1, "train_loss": float(np.mean(running)), "heldout64_ppl": ppl,
                   "seconds": round(time.time() - t0, 1)}
            running = []
            curve.append(row)
            print(kind, row, flush=True)
    seconds = time.time() - t0
    dest = args.out / kind
    model.save_pretrained(dest / "hf")
    result = {"model": kind, "architecture": L.describe_model(kind),
              "parameters": int(sum(p.numel() for p in model.parameters())),
              "training": {"steps": args.steps, "batch": args.batch, "context": L.CONTEXT,
                           "tokens_seen": args.steps * args.batch * L.CONTEXT,
                           "optimizer": f"AdamW lr {args.lr} (warm-up {warm} steps, cosine to 10%), betas 0.9/0.95, "
                                        f"weight decay {args.weight_decay} on matrices, grad clip 1.0",
                           "sampling": "uniform random windows of the training stream (numpy default_rng(seed))",
                           "seed": args.seed, "threads": args.threads, "seconds": round(seconds, 1),
                           "attention": "sdpa (torch.nn.functional.scaled_dot_product_attention)"},
            "torch": {"version": torch.__version__, "transformers": transformers.__version__,
                      "python": platform.python_version()},
            "heldout_ppl_torch": {"heldout256": torch_perplexity(model, heldout),
                                  "heldout_all": torch_perplexity(model, held_all),
                                  "heldout_all_windows": int(len(held_all))},
            "curve": curve}
    L.write_json(dest / "train.json", result)
    print(kind, "done", result["heldout_ppl_torch"], f"{seconds:.0f} s", flush=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=L.DEFAULT_OUT)
    ap.add_argument("--tokenizer", type=pathlib.Path, default=L.DEFAULT_TOKENIZER)
    ap.add_argument("--retrain-tokenizer", action="store_true")
    ap.add_argument("--model", choices=["gpt2", "llama", "both"], default="both")
    ap.add_argument("--steps", type=int, default=None, help="default: 600 (gpt2), 500 (llama)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--data-only", action="store_true", help="write the token files and stop")
    args = ap.parse_args()
    meta = prepare_data(args.out, args.tokenizer, args.retrain_tokenizer)
    print("data:", meta["tokens"], meta["corpus"]["files"], flush=True)
    if args.data_only:
        return
    steps = args.steps
    for kind in (["gpt2", "llama"] if args.model == "both" else [args.model]):
        args.steps = steps or {"gpt2": 600, "llama": 500}[kind]
        train(kind, args, meta)


if __name__ == "__main__":
    main()
