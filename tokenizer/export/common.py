"""Shared by the export scripts: write the card imglish's loader checks, and compare ONNX Runtime with PyTorch."""
import hashlib
import json
import os


def write_card(onnx_path, card):
    """Writes NAME.card.json beside NAME.onnx with the file's sha256 (what VisualTokenizer::load checks)."""
    with open(onnx_path, "rb") as f:
        card["onnx_sha256"] = hashlib.sha256(f.read()).hexdigest()
    card["card_version"] = 1
    card["layout"] = "NCHW"
    base, _ = os.path.splitext(onnx_path)
    path = base + ".card.json"
    with open(path, "w") as f:
        json.dump(card, f, indent=2)
    return path


def check_against_torch(onnx_path, torch_tokens_fn, input_size, normalize, batch=2, seed=0):
    """Runs the exported model in ONNX Runtime and the PyTorch model on the same random images; returns the
    fraction of tokens that agree (expect 1.0 up to float ties), or None when the onnxruntime module is missing."""
    import numpy as np
    import torch

    try:
        import onnxruntime as ort
    except ImportError:
        return None

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(batch, 3, input_size, input_size)).astype(np.float32) / 255.0
    x = normalize(pixels).astype(np.float32)
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    ours = out.argmax(axis=1) if out.ndim == 4 else out
    with torch.no_grad():
        ref = torch_tokens_fn(torch.from_numpy(x)).numpy()
    return float((ours.reshape(ref.shape) == ref).mean())
