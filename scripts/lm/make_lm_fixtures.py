"""Tiny language-model fixtures for tests/fixtures/lm (small enough to commit), briefly trained on bytes.

    /path/to/torch-venv/bin/python scripts/lm/make_lm_fixtures.py [--dest tests/fixtures/lm] [--steps 300]

Byte-level models (vocabulary 256: a token is one byte of UTF-8 text; no tokenizer file needed), context 32,
trained for --steps steps of 16 windows on the training split of the study's corpus (lmcommon.corpus, the
standard library's sources), seed 0:
- gpt2_tiny_legacy.onnx: transformers GPT2LMHeadModel, 2 layers, d=32, 2 heads, MLP 128, tied LM head,
  torch.onnx.export(dynamo=False, opset 17), eager attention.
- llama_tiny_dynamo.onnx: transformers LlamaForCausalLM, 2 layers, d=32, 2 heads, SwiGLU 96, RMSNorm, rotary,
  no biases, untied head, torch.onnx.export(dynamo=True, opset 18), eager attention.
- calib.npz: input_ids (16, 32) int64, windows of the training split; heldout.npz: input_ids (16, 32) from the
  held-out split.
Both exports take input_ids (batch, sequence) and return logits (batch, sequence, 256); the wrapper passes
attention_mask=ones (export_lm.py says why). README.md there is written by this script, with the graphs' op
counts, the linear layers it finds and each model's held-out perplexity in onnxruntime.
"""

from __future__ import annotations

import argparse
import collections
import pathlib

import lmcommon as L
import numpy as np

T = 32


def byte_stream(texts):
    return np.frombuffer(b"".join(t.encode("utf-8") + b"\x00" for t in texts), dtype=np.uint8).astype(np.int64)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=pathlib.Path, default=L.REPO / "tests" / "fixtures" / "lm")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import onnx
    import torch
    import transformers
    from export_lm import export_torch
    torch.set_num_threads(args.threads)
    c = L.corpus()
    train = byte_stream(c["texts"]["train"])
    held = byte_stream(c["texts"]["heldout"])
    rng = np.random.default_rng(0)
    calib = np.stack([train[s:s + T] for s in np.sort(rng.integers(0, len(train) - T, 16))])
    heldout = np.stack([held[s:s + T] for s in np.linspace(0, len(held) - T - 1, 16).round().astype(np.int64)])
    args.dest.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.dest / "calib.npz", input_ids=calib)
    np.savez_compressed(args.dest / "heldout.npz", input_ids=heldout)
    configs = {
        "gpt2": transformers.GPT2Config(vocab_size=256, n_positions=T, n_embd=32, n_layer=2, n_head=2, n_inner=128,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                        bos_token_id=0, eos_token_id=0),
        "llama": transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=T,
                                          attention_bias=False, mlp_bias=False, tie_word_embeddings=False, use_cache=False,
                                          bos_token_id=0, eos_token_id=0, pad_token_id=0)}
    lines = ["# Tiny language-model fixtures", "",
             "Made by `python scripts/lm/make_lm_fixtures.py` (torch venv; its docstring has the recipe): byte-level "
             "(vocabulary 256) models, context 32, briefly trained on the CPython standard library's sources "
             f"({args.steps} steps of 16 windows, seed 0); `calib.npz` and `heldout.npz` are `input_ids` (16, 32) int64.", ""]
    for kind, exporter in (("gpt2", "legacy"), ("llama", "dynamo")):
        torch.manual_seed(0)
        cls = transformers.GPT2LMHeadModel if kind == "gpt2" else transformers.LlamaForCausalLM
        model = cls(configs[kind])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
        for _ in range(args.steps):
            x = torch.from_numpy(np.stack([train[s:s + T] for s in rng.integers(0, len(train) - T, 16)]))
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        model.set_attn_implementation("eager")
        path = args.dest / f"{kind}_tiny_{exporter}.onnx"
        export_torch(model, path, dynamo=exporter == "dynamo")
        m = onnx.load(str(path))
        for n in m.graph.node:   # the dynamo exporter's per-node stack traces and names triple the file; not needed here
            del n.metadata_props[:]
            n.doc_string = ""
        del m.metadata_props[:]
        onnx.save(m, str(path))
        onnx.checker.check_model(m, full_check=True)
        ppl = L.onnx_perplexity(path, heldout, threads=args.threads)["perplexity"]
        with torch.no_grad():
            tppl = float(torch.exp(model(input_ids=torch.from_numpy(heldout), labels=torch.from_numpy(heldout)).loss))
        ops = collections.Counter(n.op_type for n in m.graph.node)
        lin = L.linear_layers(m, 256)
        desc = {"gpt2": "GPT2LMHeadModel (2 layers, d=32, 2 heads, MLP 128, learned positions, LayerNorm, tied LM head)",
                "llama": "LlamaForCausalLM (2 layers, d=32, 2 heads, SwiGLU 96, RMSNorm, rotary, no biases, untied LM head)"}
        how = "torch.onnx.export(dynamo=True, opset 18)" if exporter == "dynamo" else "torch.onnx.export(dynamo=False, opset 17)"
        lines += [f"## {path.name}", "",
                  f"{desc[kind]}, {how}; {path.stat().st_size:,} bytes, {len(m.graph.node)} nodes; held-out perplexity "
                  f"(16 x 31 next-byte predictions) {ppl:.3f} in onnxruntime, {tppl:.3f} in torch.", "",
                  "Ops: " + ", ".join(f"{k} {v}" for k, v in ops.most_common()) + ".", "",
                  "Linear layers (MatMul/Gemm with a constant 2-D weight, as scripts/lm/lmcommon.py linear_layers finds "
                  "them; shape as stored, (in, out) for all of these):", "",
                  "| node | op | weight | shape | reached through | bias | LM head |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in lin:
            lines.append(f"| {r['node']} | {r['op']} | {r['weight']} | {' x '.join(map(str, r['shape']))} | "
                         f"{' -> '.join(r['via']) or '-'} | {r['bias'] or '-'} | {'yes' if r['head'] else ''} |")
        lines.append("")
        lines += describe_graph(m, lin)
    (args.dest / "README.md").write_text("\n".join(lines) + "\n")
    print((args.dest / "README.md").read_text())


def describe_graph(m, lin) -> list[str]:
    """What feeds the first block linear and what reads it: (batch x tokens) rows or (batch, tokens, features)."""
    producer = {o: n for n in m.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    nodes = {n.name: n for n in m.graph.node}
    rows = []
    for r in lin[:1] + [x for x in lin if x["head"]][:1]:
        n = nodes[r["node"]]
        src = producer.get(n.input[0])
        dst = consumers.get(n.output[0], [])
        readers = ", ".join(f"{d.op_type} '{d.name}'" for d in dst) or "nothing (it is the graph output)"
        rows.append(f"- {r['node']} ({r['op']}): input from {src.op_type if src else 'a graph input'} "
                    f"'{src.name if src else n.input[0]}', output read by {readers}.")
    gemm = [x for x in lin if x["op"] == "Gemm"]
    if gemm:
        rows.append(f"- {len(gemm)} Gemm layers: each reads a 2-D (batch x tokens, features) matrix made by a Reshape of the "
                    "(batch, tokens, features) activation, and a Reshape restores the 3-D shape after it (transformers' "
                    "Conv1D is addmm on x.view(-1, features)); the weight is stored (in, out), so onnxprune sees "
                    "(batch x tokens) rows.")
    mm = [x for x in lin if x["op"] == "MatMul" and not x["head"]]
    if mm:
        rows.append(f"- {len(mm)} MatMul layers read the 3-D (batch, tokens, features) activation directly.")
    return rows + [""]


if __name__ == "__main__":
    main()
