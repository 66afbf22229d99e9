"""Peer vectors where float32 softmax and sigmoid saturate: run the peers on large logits.

Run in the peers' virtualenv (torch, Megatron-Core, DeepSpeed, transformers; see
``../shared/peers/setup.sh``), from the repository root::

    /work/peers-venv/bin/python tests/data/saturation/make_vectors.py

torch's float32 ``exp`` and ``sigmoid`` round differently at each of its CPU
capabilities (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, DEFAULT),
so the arrays are torch's at the capability they were made at, recorded in
``MANIFEST.json`` (``peer_outputs.stored_at``). For the others the manifest keeps a
digest of what the peers compute there (``peer_outputs.sha256``), so that
``tests/test_saturation_vectors.py`` checks the peers exactly on every machine.
Record the digests without rewriting the arrays, once per capability the machine has::

    ATEN_CPU_CAPABILITY=avx2 /work/peers-venv/bin/python tests/data/saturation/make_vectors.py --digests
    ATEN_CPU_CAPABILITY=default /work/peers-venv/bin/python tests/data/saturation/make_vectors.py --digests

It writes one ``.npz`` per case beside this file, in the format of
``../shared/peers/vectors`` (``../shared/peers/README.md``): ``logits``, a JSON
``config`` with the variants, and ``<variant id>/<field>`` arrays. The variant
grid (peers, functions, parameters) is the one of the handed ``random_normal``
vectors; only Switch's fixed ``expert_capacity`` is rescaled to T. Every number
comes from the peers' own functions in ``../shared/peers/reference.py``.

The cases have magnitudes of 20 to 200 with exactly repeated row maxima: float32
softmax underflows to exactly 0 for the losing experts (from a gap of about 104),
torch's float32 sigmoid saturates to exactly 1.0 (above about 16.6) and to 0 (below
about -88.7, where its ``exp(-z)`` overflows), and float32 ``exp`` alone would overflow
above 88.7.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2].parent / "shared" / "peers"
MANIFEST = HERE / "MANIFEST.json"

# By its path, under its own name (the tests have a module "reference" of their own).
_spec = importlib.util.spec_from_file_location("peers_reference", SHARED / "reference.py")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

T, E = 128, 8


def repeat_max(x: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Copy each selected row's maximum onto another random expert (exactly repeated maxima)."""
    for t in np.nonzero(rng.random(len(x)) < fraction)[0]:
        top = int(np.argmax(x[t]))
        other = (top + 1 + rng.integers(E - 1)) % E
        x[t, other] = x[t, top]
    return x


def softmax_underflow(rng: np.random.Generator) -> np.ndarray:
    """Magnitudes 20..80: a winner (often repeated) far above the rest, whose float32 probabilities are 0."""
    scale = rng.choice([20.0, 40.0, 60.0, 80.0], size=(T, 1))
    x = np.round(scale * rng.uniform(-1.0, 1.0, size=(T, E)), 1)
    far = rng.random(T) < 0.5  # the winner at +M, the others spread below -24
    x[far] = np.round(rng.uniform(-80.0, -25.0, size=(int(far.sum()), E)), 2)
    x[far, rng.integers(E, size=int(far.sum()))] = 80.0
    return repeat_max(x, rng, 0.4)


def beyond_exp_overflow(rng: np.random.Generator) -> np.ndarray:
    """Magnitudes 88..200: around float32 exp's overflow (88.72) and far past it."""
    level = rng.choice([88.5, 88.7, 88.75, 89.0, 100.0, 200.0], size=(T, 1))
    x = level * rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=(T, E)) + rng.choice([0.0, -0.25, 0.25], size=(T, E))
    x[np.arange(T), rng.integers(E, size=T)] = level[:, 0]
    return repeat_max(x, rng, 0.4)


def sigmoid_saturation(rng: np.random.Generator) -> np.ndarray:
    """Several experts above 17 (float32 sigmoid = 1.0), the rest spread, some below -104 (sigmoid = 0)."""
    x = np.round(rng.uniform(-30.0, 10.0, size=(T, E)), 2)
    for t in range(T):
        hot = rng.choice(E, size=int(rng.integers(2, 6)), replace=False)
        x[t, hot] = np.round(rng.uniform(17.0, 80.0, size=len(hot)), 2)
    cold = rng.random(T) < 0.25  # rows with nothing saturated high, several experts at float32 sigmoid 0
    x[cold] = np.round(rng.uniform(-200.0, -40.0, size=(int(cold.sum()), E)), 2)
    return repeat_max(x, rng, 0.3)


def zero_prob_capacity(rng: np.random.Generator) -> np.ndarray:
    """Capacity-bound: half the tokens want {0, 1}, half {2, 3}, the second choice's float32 probability is 0.

    Megatron's and DeepSpeed's ``probs`` drop policy ranks the routed 0-probability
    second choices against unrouted tokens of the same expert (also 0).
    """
    x = np.round(rng.uniform(-80.0, -60.0, size=(T, E)), 2)
    first = np.where(np.arange(T) % 2 == 0, 0, 2)
    x[np.arange(T), first] = 80.0
    x[np.arange(T), first + 1] = np.round(rng.uniform(-40.0, -25.0, size=T), 2)
    some = rng.random(T) < 0.25  # some second choices keep a tiny but non-zero probability
    x[some, first[some] + 1] = np.round(rng.uniform(-5.0, 5.0, size=int(some.sum())), 2)
    return x


CASES: Dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "saturation_softmax_underflow": softmax_underflow,
    "saturation_beyond_exp_overflow": beyond_exp_overflow,
    "saturation_sigmoid": sigmoid_saturation,
    "saturation_zero_prob_capacity": zero_prob_capacity,
}


def grid() -> Dict[str, Dict]:
    """The handed random_normal grid: variant id -> {peer, function, params}, Switch capacity rescaled to T."""
    with np.load(SHARED / "vectors" / "random_normal.npz") as z:
        handed = json.loads(str(z["config"]))
    out = {}
    for vid, v in handed["variants"].items():
        params = dict(v["params"])
        if v["peer"] == "hf-switch":
            cf = float(vid.split("-cf")[1].split("-")[0].replace("p", "."))
            params["expert_capacity"] = math.ceil(T / E * cf)
            vid = f"hf-switch/top1-cf{vid.split('-cf')[1].split('-')[0]}-cap{params['expert_capacity']}"
        out[vid] = {"peer": v["peer"], "function": v["function"], "params": params}
    return out


def run_case(name: str, seed: int, variants: Dict[str, Dict]) -> Dict:
    logits = CASES[name](np.random.default_rng(seed)).astype(np.float32)
    arrays = {"logits": logits}
    config = {"case": name, "T": T, "E": E, "seed": seed, "generator": "tests/data/saturation/make_vectors.py",
              "description": CASES[name].__doc__.split("\n")[0], "versions": reference.peer_versions(),
              "torch_num_threads": 1, "variants": {}}
    for vid, v in sorted(variants.items()):
        fn = getattr(reference, v["function"].split(".", 1)[1])
        entry = dict(v)
        try:
            result, meta = fn(logits, **v["params"])
        except Exception as exc:  # a refusal is itself a result
            entry.update(status=f"error: {type(exc).__name__}: {exc}", meta={})
        else:
            entry.update(status="ok", meta=meta)
            for field, value in result.items():
                arrays[f"{vid}/{field}"] = value
        config["variants"][vid] = entry
    arrays["config"] = np.asarray(json.dumps(config, sort_keys=True))
    path = HERE / f"{name}.npz"
    np.savez_compressed(path, **arrays)
    ok = sum(v["status"] == "ok" for v in config["variants"].values())
    return {"E": E, "T": T, "bytes": path.stat().st_size, "description": config["description"],
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "variants": len(config["variants"]),
            "variants_ok": ok}


def peer_results(logits: np.ndarray, config: Dict) -> Dict[str, Tuple[Dict[str, np.ndarray], Dict]]:
    """Each ``ok`` variant of a stored file's ``config``, run again: variant id -> (arrays, meta)."""
    results = {}
    for vid, v in sorted(config["variants"].items()):
        if v["status"] == "ok":
            results[vid] = getattr(reference, v["function"].split(".", 1)[1])(logits, **v["params"])
    return results


def results_digest(results: Dict[str, Tuple[Dict[str, np.ndarray], Any]]) -> str:
    """sha256 over every variant's meta and arrays (name, dtype, shape, bytes), in sorted order."""
    h = hashlib.sha256()
    for vid in sorted(results):
        arrays, meta = results[vid]
        h.update(f"{vid}\0{json.dumps(meta, sort_keys=True)}\0".encode())
        for field in sorted(arrays):
            a = np.ascontiguousarray(arrays[field])
            h.update(f"{field}\0{a.dtype.str}\0{a.shape}\0".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def stored(name: str) -> Tuple[np.ndarray, Dict, Dict[str, np.ndarray]]:
    """A stored file's logits, config and arrays (``<variant id>/<field>``)."""
    with np.load(HERE / name) as z:
        arrays = {key: z[key] for key in z.files}
    config = json.loads(str(arrays.pop("config")))
    return arrays.pop("logits"), config, arrays


def capability() -> str:
    """torch's CPU capability (``ATEN_CPU_CAPABILITY`` lowers it)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def record_digests() -> None:
    """Add this capability's digests to the manifest, leaving the arrays alone."""
    manifest = json.loads(MANIFEST.read_text())
    cap = capability()
    outputs = manifest.setdefault("peer_outputs", {"stored_at": None, "sha256": {}})
    digests = outputs["sha256"].setdefault(cap, {})
    for name in sorted(manifest["files"]):
        logits, config, _ = stored(name)
        digests[name] = results_digest(peer_results(logits, config))
    MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(json.dumps({cap: digests}, indent=1))


def main() -> int:
    import torch

    torch.set_num_threads(1)
    if sys.argv[1:] == ["--digests"]:
        record_digests()
        return 0
    variants = grid()
    files = {f"{name}.npz": run_case(name, 100 + i, variants) for i, name in enumerate(CASES)}
    digests = {name: results_digest(peer_results(*stored(name)[:2])) for name in sorted(files)}
    manifest = {"files": files, "peer_outputs": {"stored_at": capability(), "sha256": {capability(): digests}}}
    MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(json.dumps(manifest, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
