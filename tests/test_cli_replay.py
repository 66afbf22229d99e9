"""``moe-router route --record/--replay`` and ``moe-router replay-diff``: the reports against the recordings
and a count written here (NumPy set comparison per token)."""

from __future__ import annotations

import numpy as np

import moe_router as mr
from helpers import cli_json, route_json, run_error, text_report
from moe_router.data import default_logits


def expected_differences(a, b):
    """Per token: routed in exactly one, or routed in both with different sorted expert rows."""
    sa, sb = np.sort(a.expert_indices, 1), np.sort(b.expert_indices, 1)
    both = a.token_mask & b.token_mask
    return (a.token_mask != b.token_mask) | (both & (sa != sb).any(1))


def test_route_records_and_replay_diff_counts_engine_rounding(capsys, tmp_path):
    logits, _ = default_logits()
    # "Another engine": the same logits rounded to float16 flip near-ties.
    np.save(tmp_path / "half.npy", logits.astype(np.float16).astype(np.float32))
    route_json(capsys, "--record", str(tmp_path / "a.npz"))
    report = route_json(capsys, str(tmp_path / "half.npy"), "--record", str(tmp_path / "b"))
    assert report["replay"] == {"replayed": None, "recorded": str(tmp_path / "b")}
    a, b = mr.RecordedRoute.load(tmp_path / "a.npz"), mr.RecordedRoute.load(tmp_path / "b.npz")
    dec = mr.route_logits(logits, mr.RouterConfig(num_experts=64, top_k=2, capacity_factor=1.25))
    np.testing.assert_array_equal(a.expert_indices, dec.expert_indices)
    diff = cli_json(capsys, "replay-diff", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--json")
    n = int(expected_differences(a, b).sum())
    assert 0 < n < 4096
    assert diff["layers"] == [{"layer": 0, "mismatch": None, "tokens": 4096, "routed_tokens": 4096,
                               "differing_tokens": n, "differing_share": n / 4096}]
    assert diff["comparable"] and diff["layers_compared"] == 1 and diff["layers_differing"] == 1
    assert diff["any_layer"] == {"differing_tokens": n, "routed_tokens": 4096, "differing_share": n / 4096}
    _, _, row = text_report(capsys, "replay-diff", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
    assert row("layers differing").split()[2:5] == ["1", "of", "1"]
    assert f"{n} of 4096 ({100 * n / 4096:.1f} %)" in row("tokens differing in any layer")
    assert row("    0").split() == ["0", "4096", "4096", str(n), f"{100 * n / 4096:.1f}", "%"]


def test_route_replay_uses_the_recorded_experts(capsys, tmp_path):
    logits, _ = default_logits()
    rng = np.random.default_rng(3)
    shifted = (logits + rng.normal(size=logits.shape).astype(np.float32)).astype(np.float32)
    np.save(tmp_path / "shifted.npy", shifted)
    route_json(capsys, "--record", str(tmp_path / "a.npz"))
    report = route_json(capsys, str(tmp_path / "shifted.npy"), "--replay", str(tmp_path / "a.npz"),
                        "--normalize-weights")
    cfg = mr.RouterConfig(num_experts=64, top_k=2, capacity_factor=1.25, normalize_weights=True)
    want = mr.route_logits(shifted, cfg, replay=mr.RecordedRoute.load(tmp_path / "a.npz"))
    assert report["replay"]["replayed"] == str(tmp_path / "a.npz")
    assert report["pre_drop_tokens_per_expert"] == want.pre_drop_tokens_per_expert.tolist()
    assert report["load_balance_loss"] == want.load_balance_loss
    assert report["pre_drop_tokens_per_expert"] != mr.route_logits(shifted, cfg).pre_drop_tokens_per_expert.tolist()
    _, _, row = text_report(capsys, "route", "--replay", str(tmp_path / "a.npz"), "-n", "1")
    assert row("replay").split()[:3] == ["replay", "experts", "from"]
    err = run_error(capsys, "route", "--replay", str(tmp_path / "a.npz"), "-k", "3")
    assert "replay has shape [4096, 2] choices among 64 experts, expected [4096, 3]" in err


def test_replay_diff_of_several_layers_with_padding(capsys, tmp_path):
    rng = np.random.default_rng(0)
    T, E, k = 20, 8, 2

    def layer(seed_shift):
        ids = np.array([rng.permutation(E)[:k] for _ in range(T)])
        return mr.RecordedRoute(ids, E, token_mask=np.arange(T) >= seed_shift)

    a = [layer(0), layer(2), layer(0)]
    b = [mr.RecordedRoute(a[0].expert_indices[:, ::-1], E), layer(0), a[2]]
    mr.RecordedRoutes(a).save(tmp_path / "a.npz")
    mr.RecordedRoutes(b).save(tmp_path / "b.npz")
    report = cli_json(capsys, "replay-diff", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--json")
    flags = [expected_differences(x, y) for x, y in zip(a, b)]
    assert [r["differing_tokens"] for r in report["layers"]] == [int(f.sum()) for f in flags]
    assert report["layers"][0]["differing_tokens"] == 0  # rank order ignored
    assert [r["routed_tokens"] for r in report["layers"]] == [20, 20, 20]
    assert report["layers_differing"] == 1 and report["layers_differing_share"] == 1 / 3
    assert report["any_layer"]["differing_tokens"] == int(np.logical_or.reduce(flags).sum())


def test_replay_diff_reports_mismatches(capsys, tmp_path):
    ids = np.array([[0, 1], [2, 3]])
    mr.RecordedRoutes([mr.RecordedRoute(ids, 4), mr.RecordedRoute(ids, 4)]).save(tmp_path / "two.npz")
    mr.RecordedRoute(np.array([[0, 1, 2]] * 3), 5).save(tmp_path / "other.npz")
    report = cli_json(capsys, "replay-diff", str(tmp_path / "two.npz"), str(tmp_path / "other.npz"), "--json")
    assert report["layers"] == [{"layer": 0, "mismatch": "T 2 vs 3; k 2 vs 3; E 4 vs 5"},
                                {"layer": 1, "mismatch": "only in A"}]
    assert not report["comparable"] and report["layers_compared"] == 0 and report["any_layer"] is None
    out, _, row = text_report(capsys, "replay-diff", str(tmp_path / "two.npz"), str(tmp_path / "other.npz"))
    assert "do not match" in row("mismatch") and "mismatch: only in A" in out
    (tmp_path / "junk.npz").write_bytes(b"junk")
    assert "junk.npz is not a replay .npz file" in run_error(capsys, "replay-diff", str(tmp_path / "junk.npz"),
                                                             str(tmp_path / "two.npz"))
    assert "num_layers is 2" in run_error(capsys, "route", "--replay", str(tmp_path / "two.npz"))


def test_route_hidden_records_and_replays(capsys, tmp_path):
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "h.npz", hidden=rng.normal(size=(64, 10)).astype(np.float32),
             w=rng.normal(size=(10, 8)).astype(np.float32), w2=rng.normal(size=(10, 8)).astype(np.float32))
    first = route_json(capsys, "--hidden", str(tmp_path / "h.npz"), "--weight-key", "w",
                       "--record", str(tmp_path / "r.npz"))
    other = route_json(capsys, "--hidden", str(tmp_path / "h.npz"), "--weight-key", "w2")
    replayed = route_json(capsys, "--hidden", str(tmp_path / "h.npz"), "--weight-key", "w2",
                          "--replay", str(tmp_path / "r.npz"))
    assert replayed["pre_drop_tokens_per_expert"] == first["pre_drop_tokens_per_expert"]
    assert other["pre_drop_tokens_per_expert"] != first["pre_drop_tokens_per_expert"]
    assert replayed["router_z_loss"] == other["router_z_loss"]  # the scores are w2's
