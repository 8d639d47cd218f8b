"""Shared pieces of the language-model study (scripts/lm): the data recipe, the tokenizer, the two model
configurations and the held-out perplexity of an ONNX model with onnxruntime.

Data recipe: the ``.py`` sources of the running interpreter's standard library (``sysconfig``'s ``stdlib``
path), without ``site-packages`` and without test folders (``test``, ``tests``, ``idle_test``), in sorted
order of their relative POSIX paths. A file is held out when the first byte of the SHA-1 of its relative
path is below 26 (about 10% of the files), so the split does not depend on which other files exist. Files
are read as UTF-8 (errors replaced) and joined, each followed by the end-of-text token.

Only numpy, tokenizers and (for the models) torch/transformers are imported here, lazily, so the
onnxruntime-only parts also run in a venv without torch.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys
import sysconfig

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_OUT = REPO / "out" / "lm"
DEFAULT_TOKENIZER = HERE / "tokenizer.json"
EOT = "<|endoftext|>"
SKIP_PARTS = {"site-packages", "test", "tests", "idle_test"}
HELD_OUT_BELOW = 26      # first byte of sha1(relative path) < 26: held out (26/256 = 10.2%)
CONTEXT = 128
VOCAB = 4096
N_CALIB = 128
N_HELDOUT = 256
CALIB_SEED = 1234


def rel(path: pathlib.Path) -> str:
    """A path as written into committed files and reports: relative to the repository when inside it."""
    path = pathlib.Path(path).resolve()
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return path.as_posix()


def stdlib_files() -> tuple[pathlib.Path, list[str]]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if not (SKIP_PARTS & set(p.relative_to(root).parts)))
    return root, names


def is_held_out(name: str) -> bool:
    return hashlib.sha1(name.encode()).digest()[0] < HELD_OUT_BELOW


def corpus() -> dict:
    """The recipe's texts: {'train': [...], 'heldout': [...]} plus a description (counts, bytes, a digest of
    the file list) that says which corpus a run saw."""
    root, names = stdlib_files()
    split = {"train": [], "heldout": []}
    counts = {"train": [0, 0], "heldout": [0, 0]}
    for name in names:
        text = (root / name).read_bytes().decode("utf-8", errors="replace")
        part = "heldout" if is_held_out(name) else "train"
        split[part].append(text)
        counts[part][0] += 1
        counts[part][1] += len(text.encode("utf-8"))
    desc = {"source": "CPython standard library .py files (sysconfig stdlib path of the running interpreter)",
            "python": sys.version.split()[0], "excluded_parts": sorted(SKIP_PARTS),
            "split": f"held out when sha1(relative path)[0] < {HELD_OUT_BELOW}",
            "files": {k: v[0] for k, v in counts.items()}, "bytes": {k: v[1] for k, v in counts.items()},
            "file_list_sha1": hashlib.sha1("\n".join(names).encode()).hexdigest()}
    return {"texts": split, "description": desc}


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path=DEFAULT_TOKENIZER):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(path))


def token_stream(tok, texts: list[str]) -> np.ndarray:
    eot = tok.token_to_id(EOT)
    out = []
    for enc in tok.encode_batch(texts):
        out.append(np.asarray(enc.ids, dtype=np.int32))
        out.append(np.asarray([eot], dtype=np.int32))
    return np.concatenate(out)


def heldout_windows(stream: np.ndarray, n: int = N_HELDOUT, t: int = CONTEXT) -> np.ndarray:
    """n non-overlapping windows of t tokens spread evenly over the held-out stream."""
    chunks = len(stream) // t
    idx = np.linspace(0, chunks - 1, n).round().astype(np.int64)
    return np.stack([stream[i * t:(i + 1) * t] for i in idx]).astype(np.int64)


def calib_windows(stream: np.ndarray, n: int = N_CALIB, t: int = CONTEXT, seed: int = CALIB_SEED) -> np.ndarray:
    """n windows of t tokens at seeded random offsets of the training stream."""
    starts = np.random.default_rng(seed).integers(0, len(stream) - t, size=n)
    return np.stack([stream[s:s + t] for s in np.sort(starts)]).astype(np.int64)


# ------------------------------------------------------------------------------------------------ models
MODELS = ("gpt2", "llama")


def model_config(kind: str, vocab: int = VOCAB, d: int = 128, layers: int = 4, heads: int = 4, context: int = CONTEXT,
                 eot_id: int = 0):
    import transformers
    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_positions=context, n_embd=d, n_layer=layers, n_head=heads,
                                       n_inner=4 * d, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, tie_word_embeddings=True, use_cache=False,
                                       bos_token_id=eot_id, eos_token_id=eot_id)
    if kind == "llama":
        return transformers.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=3 * d, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=heads,
                                        max_position_embeddings=context, rms_norm_eps=1e-5, rope_theta=10000.0,
                                        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, use_cache=False,
                                        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
    raise ValueError(kind)


def describe_model(kind: str) -> str:
    if kind == "gpt2":
        return ("transformers GPT2LMHeadModel: 4 layers, d=128, 4 heads, MLP 512 (gelu_new, tanh GELU), learned positions "
                "(128), LayerNorm, biases, LM head tied to the token embedding, no dropout")
    return ("transformers LlamaForCausalLM: 4 layers, d=128, 4 heads (no GQA), SwiGLU MLP 384, RMSNorm, rotary "
            "(theta 10000), no biases, untied LM head")


# ------------------------------------------------------------------------------------------------ perplexity
def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per-position cross-entropy (nats) of logits[:, :-1] predicting ids[:, 1:], float64."""
    z = logits[:, :-1].astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=-1))
    tgt = np.take_along_axis(z, ids[:, 1:, None], axis=-1)[..., 0]
    return lse - tgt


def onnx_perplexity(model_path, ids: np.ndarray, batch: int = 32, threads: int = 2) -> dict:
    """Held-out perplexity of an ONNX LM with onnxruntime: exp of the mean next-token cross-entropy over every
    position of every sequence (ids (N, T) int64; T-1 predictions per sequence). Inputs other than input_ids
    that the export declares get the values a full, unpadded sequence has (attention_mask ones, position_ids
    0..T-1)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    out_name = next((o.name for o in sess.get_outputs() if o.name == "logits"), sess.get_outputs()[0].name)
    total, count = 0.0, 0
    finite = True
    for s in range(0, len(ids), batch):
        x = ids[s:s + batch]
        feed = {}
        for name in names:
            if name == "input_ids":
                feed[name] = x
            elif name == "attention_mask":
                feed[name] = np.ones_like(x)
            elif name == "position_ids":
                feed[name] = np.broadcast_to(np.arange(x.shape[1], dtype=np.int64), x.shape).copy()
            else:
                raise ValueError(f"unexpected model input {name!r}")
        logits = sess.run([out_name], feed)[0]
        finite = finite and bool(np.isfinite(logits).all())
        nll = next_token_nll(logits, x)
        total += float(nll.sum())
        count += nll.size
    mean = total / count
    return {"perplexity": float(np.exp(mean)), "nll": mean, "tokens": count, "finite": finite, "inputs": names}


def write_json(path, obj) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def load_json(path):
    return json.loads(pathlib.Path(path).read_text())


# ------------------------------------------------------------------------------------------------ graph
def linear_layers(model, vocab: int) -> list[dict]:
    """Every MatMul/Gemm whose second input is a constant 2-D float initializer, reached directly or through
    Transpose/Identity/Cast nodes: {node, op, weight (initializer name), shape, transposed, bias, head}. The LM
    head is the one whose weight has a dimension of the vocabulary's size; bias is Gemm's C or the initializer
    of an Add that alone reads the MatMul's output (None when there is none)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = []
    for n in g.node:
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
            continue
        name, via = n.input[1], []
        while name not in inits and name in producer and producer[name].op_type in ("Transpose", "Identity", "Cast"):
            via.append(producer[name].op_type)
            name = producer[name].input[0]
        if name not in inits or len(inits[name].dims) != 2 or inits[name].data_type not in (1, 10, 16):
            continue
        trans = via.count("Transpose") % 2 == 1
        if n.op_type == "Gemm":
            trans ^= any(a.name == "transB" and a.i == 1 for a in n.attribute)
        def const(name):   # an initializer, directly or through Identity nodes (exporters' deduplication)
            while name not in inits and name in producer and producer[name].op_type == "Identity":
                name = producer[name].input[0]
            return name if name in inits else None
        bias = None
        if n.op_type == "Gemm" and len(n.input) > 2:
            bias = const(n.input[2])
        else:
            readers = consumers.get(n.output[0], [])
            if len(readers) == 1 and readers[0].op_type == "Add":
                other = [i for i in readers[0].input if i != n.output[0]]
                bias = const(other[0]) if other else None
        shape = list(inits[name].dims)
        out.append({"node": n.name, "op": n.op_type, "weight": name, "shape": shape, "via": via, "transposed": trans,
                    "bias": bias, "head": vocab in shape})
    return out
