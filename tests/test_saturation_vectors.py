"""The saturation peer vectors (``tests/data/saturation``) are what the peers compute: the files
match their manifest, and, where torch and the peers are installed (the peers venv), running the
peers' own functions (``../shared/peers/reference.py``) on the stored logits gives the stored
arrays bit for bit (or, at another torch CPU capability, the digest recorded for it)."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pytest

from conftest import SATURATION_DIR

_MANIFEST = json.loads((SATURATION_DIR / "MANIFEST.json").read_text())
MANIFEST = _MANIFEST["files"]
#: Which torch CPU capability made the arrays, and the digests of the peers' outputs at each one.
PEER_OUTPUTS = _MANIFEST["peer_outputs"]


def test_files_match_the_manifest():
    assert sorted(MANIFEST) == sorted(p.name for p in SATURATION_DIR.glob("*.npz"))
    for name, entry in MANIFEST.items():
        path = SATURATION_DIR / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], name
        with np.load(path) as z:
            config = json.loads(str(z["config"]))
            assert z["logits"].dtype == np.float32 and z["logits"].shape == (entry["T"], entry["E"])
        assert len(config["variants"]) == entry["variants"]
        assert sum(v["status"] == "ok" for v in config["variants"].values()) == entry["variants_ok"]


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_peers_reproduce_the_stored_arrays(name):
    """At the capability the arrays were made at, the peers give them bit for bit; at another
    (torch's float32 ``exp`` rounds per instruction set), what they give has the digest recorded
    for that capability."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("megatron.core")
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("saturation_vectors", SATURATION_DIR / "make_vectors.py")
    make_vectors = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_vectors)
    torch.set_num_threads(1)
    logits, config, arrays = make_vectors.stored(name)
    results = make_vectors.peer_results(logits, config)
    assert sorted(results) == sorted(vid for vid, v in config["variants"].items() if v["status"] == "ok")
    differing = sorted(
        vid for vid, (out, meta) in results.items()
        if meta != config["variants"][vid]["meta"]
        or any(not np.array_equal(value, arrays[f"{vid}/{field}"]) for field, value in out.items())
    )
    cap = torch.backends.cpu.get_cpu_capability()
    if cap == PEER_OUTPUTS["stored_at"]:
        assert differing == [], f"the peers no longer give the stored arrays at {cap}: {differing}"
    want = PEER_OUTPUTS["sha256"].get(cap, {}).get(name)
    if want is None:
        pytest.skip(f"the arrays are torch's at {PEER_OUTPUTS['stored_at']} and no digest is recorded for {cap} "
                    f"(variants differing from the arrays here: {differing}); see make_vectors.py --digests")
    assert make_vectors.results_digest(results) == want, (
        f"the peers at {cap} do not give the recorded digest; variants differing from the {PEER_OUTPUTS['stored_at']} "
        f"arrays: {differing}")
