"""Pattern.reachable(kv_idx, next_q) against brute force: some query at a position in
[next_q, horizon) allows the key. Exact for bands, columns, rows and unions; a superset for the rest."""

import pytest
import torch

from sparse_attn import patterns as P

HORIZON = 400  # far enough that every pattern here has shown all its future queries


def brute_force(pattern, next_q, n_keys):
    q = torch.arange(next_q, HORIZON)[:, None]
    k = torch.arange(n_keys)[None, :]
    heads = pattern.num_heads or 1
    allowed = torch.stack([pattern.allowed(q, k, torch.tensor(h)) for h in range(heads)])
    return allowed.any(0).any(0)


@pytest.mark.parametrize("pattern, exact", [
    (P.sliding_window(8), True),
    (P.causal(), True),
    (P.dilated(4, 3), True),
    (P.streaming(3, 8), True),
    (P.longformer(8, 2, causal=True), True),
    (P.longformer(8, [5, 40], causal=True), False),  # a global query row at 40 sees every earlier key
    (P.sliding_window(6) | P.dilated(5, 4), True),
    (P.per_head([P.sliding_window(4), P.dilated(3, 5)]), True),
    (P.strided(8), False),
    (P.fixed(16, 2), False),
])
def test_reachable_matches_brute_force(pattern, exact):
    for next_q in (0, 1, 7, 50, 120):
        n_keys = next_q + 1
        k = torch.arange(n_keys)
        got = pattern.reachable(k, next_q)
        truth = brute_force(pattern, next_q, n_keys)
        assert bool((got | ~truth).all()), f"{pattern!r} at {next_q}: drops keys a future query needs"
        if exact:
            assert torch.equal(got, truth), f"{pattern!r} at {next_q}"


def test_windows_keep_only_their_reach():
    k = torch.arange(100)
    assert int(P.sliding_window(8).reachable(k, 100).sum()) == 7  # keys 93..99 (query 100 sees 93..100)
    assert int(P.streaming(4, 8).reachable(k, 100).sum()) == 4 + 7
