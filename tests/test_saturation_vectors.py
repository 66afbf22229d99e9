"""The saturation peer vectors (``tests/data/saturation``) are what the peers compute: the files
match their manifest, and, where torch and the peers are installed (the peers venv), running the
peers' own functions (``../shared/peers/reference.py``) on the stored logits gives the stored
arrays bit for bit."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pytest

from conftest import SATURATION_DIR, SHARED_DIR

MANIFEST = json.loads((SATURATION_DIR / "MANIFEST.json").read_text())["files"]


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
    torch = pytest.importorskip("torch")
    pytest.importorskip("megatron.core")
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    # By its path, under its own name: tests/reference.py is the module "reference".
    spec = importlib.util.spec_from_file_location("peers_reference", SHARED_DIR / "peers" / "reference.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    torch.set_num_threads(1)
    with np.load(SATURATION_DIR / name) as z:
        arrays = {key: z[key] for key in z.files}
    config = json.loads(str(arrays.pop("config")))
    logits = arrays.pop("logits")
    for vid, v in config["variants"].items():
        if v["status"] != "ok":
            continue
        out, meta = getattr(reference, v["function"].split(".", 1)[1])(logits, **v["params"])
        assert meta == v["meta"], vid
        for field, value in out.items():
            np.testing.assert_array_equal(value, arrays[f"{vid}/{field}"], f"{vid}/{field}")
