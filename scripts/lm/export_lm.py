"""Export the trained study models (scripts/lm/train_lm.py) to ONNX three ways and check every export.

    /path/to/torch-venv/bin/python scripts/lm/export_lm.py [--out out/lm] [--model gpt2|llama|both]
        [--exporters legacy,dynamo,optimum] [--cache /shared/cache/lm] [--setup-optimum] [--cache-only]

- legacy: torch.onnx.export(dynamo=False, opset 17) of a wrapper ``input_ids -> logits`` around the
  transformers model in eager attention; the wrapper passes ``attention_mask=ones_like(input_ids)``
  (without a mask transformers derives packed-sequence indices with torch.diff, which the legacy exporter
  cannot export), so the ONNX model's only input is input_ids.
- dynamo: torch.onnx.export(dynamo=True, opset 18) of the same wrapper, dynamic batch and sequence (<= 128).
- optimum: ``optimum.exporters.onnx.main_export(task="text-generation")`` (optimum-onnx 0.1.0), which needs
  transformers < 4.58; it runs in its own venv under --out (``--setup-optimum`` creates it: transformers
  4.57.6, optimum 2.1.0, optimum-onnx 0.1.0, accelerate, with the torch venv's site-packages appended through a
  .pth file so that torch itself is shared). Its exports take input_ids, attention_mask and position_ids.

Every export is checked against the transformers model in this venv (max |logit difference| on 4 held-out
sequences) and its held-out perplexity is measured with onnxruntime (lmcommon.onnx_perplexity). Files go to
--out/<model>/<model>_<exporter>.onnx, with --out/MANIFEST.json describing them; --cache (if given) receives
copies of the models, the token files, the tokenizer and the manifest.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import lmcommon as L
import numpy as np

OPTIMUM_PACKAGES = ["transformers==4.57.6", "optimum==2.1.0", "optimum-onnx==0.1.0", "accelerate==1.16.0"]
OPTIMUM_DEPS = ["huggingface-hub>=0.34,<1.0", "pyyaml", "regex", "requests", "safetensors", "tokenizers>=0.22,<=0.23", "tqdm",
                "filelock", "numpy", "packaging", "psutil", "onnx", "onnxruntime"]


def load_hf(out: pathlib.Path, kind: str):
    import transformers
    cls = transformers.GPT2LMHeadModel if kind == "gpt2" else transformers.LlamaForCausalLM
    model = cls.from_pretrained(str(out / kind / "hf"))
    model.eval()
    model.set_attn_implementation("eager")
    return model


def wrapper(model):
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    return LogitsOnly().eval()


def export_torch(model, path: pathlib.Path, dynamo: bool) -> None:
    import torch
    net = wrapper(model)
    example = (torch.randint(0, model.config.vocab_size, (2, 16)),)
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=1024)
        seq = torch.export.Dim("sequence", min=2, max=L.CONTEXT)
        torch.onnx.export(net, example, str(path), dynamo=True, input_names=["input_ids"], output_names=["logits"],
                          dynamic_shapes=({0: batch, 1: seq},), opset_version=18, external_data=False)
    else:
        torch.onnx.export(net, example, str(path), dynamo=False, input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}},
                          opset_version=17)


def optimum_python(out: pathlib.Path) -> pathlib.Path:
    return out / "venv-optimum" / "bin" / "python"


def setup_optimum(out: pathlib.Path) -> None:
    venv = out / "venv-optimum"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--no-deps"] + OPTIMUM_PACKAGES, check=True)
    subprocess.run(pip + OPTIMUM_DEPS, check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    torch_site = pathlib.Path(__import__("torch").__file__).resolve().parents[1]
    (site / "zz_torch_venv.pth").write_text(str(torch_site) + "\n")


def export_optimum(out: pathlib.Path, kind: str, path: pathlib.Path) -> dict:
    py = optimum_python(out)
    if not py.exists():
        raise RuntimeError(f"no optimum venv at {L.rel(py)} (run with --setup-optimum)")
    tmp = out / kind / "optimum_export"
    shutil.rmtree(tmp, ignore_errors=True)
    code = ("import torch, json, transformers, optimum.version\n"
            "from importlib.metadata import version\n"
            "torch.set_num_threads(2)\n"
            "from optimum.exporters.onnx import main_export\n"
            f"main_export({str(out / kind / 'hf')!r}, output={str(tmp)!r}, task='text-generation', device='cpu')\n"
            "print('VERSIONS', json.dumps({'transformers': transformers.__version__, 'optimum': version('optimum'),"
            " 'optimum-onnx': version('optimum-onnx'), 'torch': torch.__version__}))\n")
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode
        raise RuntimeError(f"optimum export failed: {last}")
    versions = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("VERSIONS"))[9:])
    shutil.move(str(tmp / "model.onnx"), str(path))
    if (tmp / "model.onnx_data").exists():
        raise RuntimeError("optimum wrote external data; not handled")
    shutil.rmtree(tmp, ignore_errors=True)
    return versions


def graph_summary(path: pathlib.Path) -> dict:
    import onnx
    m = onnx.load(str(path))
    g = m.graph

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    elem = {1: "float32", 7: "int64", 10: "float16"}
    ops = collections.Counter(n.op_type for n in g.node)
    return {"inputs": [{"name": i.name, "dtype": elem.get(i.type.tensor_type.elem_type, str(i.type.tensor_type.elem_type)),
                        "shape": dims(i)} for i in g.input],
            "outputs": [{"name": o.name, "shape": dims(o)} for o in g.output],
            "opset": {(o.domain or "ai.onnx"): o.version for o in m.opset_import},
            "nodes": len(g.node), "ops": dict(ops.most_common()), "initializers": len(g.initializer),
            "bytes": path.stat().st_size}


def max_logit_diff(model, path: pathlib.Path, ids: np.ndarray) -> float:
    import onnxruntime as ort
    import torch
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {}
    for i in sess.get_inputs():
        feed[i.name] = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                        "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).astype(np.int64)}[i.name]
    got = sess.run(["logits"], feed)[0]
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    return float(np.abs(got - ref).max())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=L.DEFAULT_OUT)
    ap.add_argument("--model", choices=["gpt2", "llama", "both"], default="both")
    ap.add_argument("--exporters", default="legacy,dynamo,optimum")
    ap.add_argument("--cache", type=pathlib.Path, default=None, help="also copy the models and data here (with MANIFEST.json)")
    ap.add_argument("--setup-optimum", action="store_true")
    ap.add_argument("--cache-only", action="store_true", help="export nothing: copy what --out has to --cache")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import onnx
    import onnxruntime
    import torch
    import transformers
    torch.set_num_threads(args.threads)
    out = args.out
    if args.setup_optimum:
        setup_optimum(out)
    data = L.load_json(out / "data" / "data.json")
    heldout = np.load(out / "data" / "heldout.npz")["input_ids"]
    calib = np.load(out / "data" / "calib.npz")["input_ids"]
    # the optimum exports' extra inputs, for tools that need every input in the calibration file
    full = {"attention_mask": np.ones_like(calib), "position_ids": np.broadcast_to(np.arange(calib.shape[1]), calib.shape).copy()}
    np.savez(out / "data" / "calib_full.npz", input_ids=calib, **full)
    manifest_path = out / "MANIFEST.json"
    manifest = L.load_json(manifest_path) if manifest_path.exists() else {"models": {}}
    manifest.update({"about": "Study models of scripts/lm (onnxprune repository): trained on the CPython standard library's "
                              "sources; see scripts/lm/lmcommon.py for the recipe",
                     "tokenizer": "tokenizer.json (byte-level BPE, tokenizers; also scripts/lm/tokenizer.json)",
                     "data": {"calib.npz": data["calib"], "heldout.npz": data["heldout"],
                              "calib_full.npz": {"shape": list(calib.shape), "recipe": "calib.npz plus attention_mask (ones) "
                                                 "and position_ids (0..T-1), the inputs of the optimum exports"},
                              "corpus": data["corpus"], "vocab": data["vocab"], "eot_id": data["eot_id"]},
                     "perplexity": "exp(mean next-token cross-entropy) over the 256 x 127 predictions of heldout.npz, "
                                   "onnxruntime "
                                   "CPU (scripts/lm/lmcommon.py onnx_perplexity)"})
    kinds = [] if args.cache_only else ["gpt2", "llama"] if args.model == "both" else [args.model]
    for kind in kinds:
        model = load_hf(out, kind)
        train = L.load_json(out / kind / "train.json")
        for exporter in args.exporters.split(","):
            path = out / kind / f"{kind}_{exporter}.onnx"
            t0 = time.time()
            info = {"model": kind, "architecture": train["architecture"], "exporter": exporter}
            try:
                if exporter == "optimum":
                    info["versions"] = export_optimum(out, kind, path)
                    info["how"] = "optimum.exporters.onnx.main_export(task='text-generation') in the optimum venv"
                else:
                    export_torch(model, path, dynamo=exporter == "dynamo")
                    info["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
                    opset = 18 if exporter == "dynamo" else 17
                    info["how"] = (f"torch.onnx.export(dynamo={exporter == 'dynamo'}, opset {opset}) of input_ids -> "
                                   "model(input_ids, attention_mask=ones_like(input_ids)).logits, eager attention")
                    if exporter == "dynamo":
                        info["versions"]["onnxscript"] = __import__("onnxscript").__version__
            except Exception as exc:   # recorded, the other exports go on
                info["error"] = f"{type(exc).__name__}: {exc}"
                print(kind, exporter, "FAILED", info["error"], flush=True)
                manifest["models"][f"{kind}_{exporter}.onnx"] = info
                continue
            info["export_seconds"] = round(time.time() - t0, 1)
            onnx.checker.check_model(str(path))
            info.update(graph_summary(path))
            info["max_abs_logit_diff_vs_torch"] = max_logit_diff(model, path, heldout[:4])
            info["dense_perplexity"] = L.onnx_perplexity(path, heldout, threads=args.threads)["perplexity"]
            info["torch_perplexity"] = train["heldout_ppl_torch"]["heldout256"]
            info["onnxruntime"] = onnxruntime.__version__
            info["calibration_file"] = "calib_full.npz" if len(info["inputs"]) > 1 else "calib.npz"
            manifest["models"][f"{kind}_{exporter}.onnx"] = info
            print(kind, exporter, {k: info[k] for k in ("nodes", "bytes", "max_abs_logit_diff_vs_torch", "dense_perplexity")},
                  flush=True)
    for info in manifest["models"].values():   # how each model was trained (train_lm.py's train.json)
        train_json = out / info["model"] / "train.json"
        if train_json.exists():
            t = L.load_json(train_json)
            info["training"] = {**{k: t["training"][k] for k in ("steps", "batch", "context", "tokens_seen", "seconds", "seed")},
                                "parameters": t["parameters"], "heldout_ppl_torch": t["heldout_ppl_torch"]}
    L.write_json(manifest_path, manifest)
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
        for name, info in manifest["models"].items():
            src = out / info["model"] / name
            if "error" not in info and src.exists():
                shutil.copy2(src, args.cache / name)
        for name in ("calib.npz", "heldout.npz", "calib_full.npz"):
            shutil.copy2(out / "data" / name, args.cache / name)
        shutil.copy2(L.DEFAULT_TOKENIZER, args.cache / "tokenizer.json")
        L.write_json(args.cache / "MANIFEST.json", manifest)
        print("copied to", args.cache, "(", len(os.listdir(args.cache)), "files )")


if __name__ == "__main__":
    main()
