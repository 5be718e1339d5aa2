"""Rejection sampling keeps the target's distribution exactly: with drafts drawn from a q that
differs from p on purpose (one-hot q of a deterministic proposer, and a draft model's own q), the emitted tokens (first token, and a two-token joint with the
next step after a rejection) match the float64 reference within a TV bound (tv_tolerance: a
correct sampler fails with probability < 1e-6; the keys are fixed, so a run is deterministic)."""

from dataclasses import replace
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from _sample_reference import reference_probs, total_variation, tv_tolerance
from jaxserve.runtime.runner_output import ModelRunnerOutput
from jaxserve.runtime.spec_decode import SpecLayout, collect
from jaxserve.sample.metadata import SamplingRow, build_sampling_metadata
from jaxserve.sample.rejection import verify_step

verify_jit = jax.jit(verify_step, static_argnames=("num_logprobs",))

PROBS = np.array([0.30, 0.22, 0.16, 0.11, 0.08, 0.05, 0.03, 0.02, 0.015, 0.005])
LOGITS = (np.log(PROBS / PROBS.sum()) + 2.0).astype(np.float32)  # [V]
V = len(PROBS)
# the proposer's q: over-drafts the likeliest token and the target's unlikely tokens
Q = np.concatenate([[0.6], 0.4 * np.linspace(1.0, 3.0, V - 1) / np.linspace(1.0, 3.0, V - 1).sum()])
N = 16384

ROWS = {
    "t1": SamplingRow(temperature=1.0),
    "t0.8_topk4": SamplingRow(temperature=0.8, top_k=4),
    "topp0.6": SamplingRow(temperature=1.0, top_p=0.6),
    "t1.5_minp": SamplingRow(temperature=1.5, min_p=0.1),
}


# a draft model's q: zero on the target's likeliest token (only the residual can emit it),
# mass on tokens that top-k / top-p filter out of p
Q_DRAFT = np.array([0.0, 0.05, 0.25, 0.05, 0.05, 0.1, 0.1, 0.2, 0.1, 0.1])


def _verify(logits, rows, drafts, step_seed, q=None):
    """logits [R, V], one SamplingRow per row, drafts [R] (-1 = none), q [R, V] or None (a
    deterministic proposer) -> host VerifyOutput."""
    md = build_sampling_metadata(rows, len(rows), step_seed)
    logits = np.asarray(logits, np.float32)
    extra = () if q is None else (np.asarray(q, np.float32),)
    return jax.device_get(verify_jit(logits, logits, md, np.asarray(drafts, np.int32), *extra,
                                     num_logprobs=2))


@pytest.mark.parametrize("name", sorted(ROWS))
def test_first_token_is_the_target_distribution(name):
    row = replace(ROWS[name], num_logprobs=2)
    p = reference_probs(LOGITS, row)
    rng = np.random.default_rng(1)
    drafts = rng.choice(V, size=N, p=Q)  # a proposer that disagrees with p on purpose
    out = _verify(np.broadcast_to(LOGITS, (N, V)), [row] * N, drafts, step_seed=5)
    emitted = np.where(out.accepted, drafts, out.token_ids)
    tol = tv_tolerance(N, int((p > 0).sum()))
    assert total_variation(Q, p) > 2 * tol  # always accepting would fail: the test has power
    counts = np.bincount(emitted, minlength=V)
    assert counts[p == 0].sum() == 0
    tv = total_variation(counts / N, p)
    assert tv < tol, f"TV {tv:.4f} >= {tol:.4f}: {counts / N} vs {p}"
    # acceptance probability of a one-hot q is p(draft); the recovered token is never the draft
    assert abs(out.accepted.mean() - float(Q @ p)) < tol
    assert not np.any(~out.accepted & (out.token_ids == drafts) & (p[drafts] < 1))
    # logprobs are the target's raw log-softmax at the emitted token
    raw = LOGITS - np.log(np.exp(LOGITS).sum())
    np.testing.assert_allclose(out.logprobs[:, 0], raw[emitted], rtol=1e-5, atol=1e-5)


def _conditional_logits() -> np.ndarray:
    """logits of the second position given the first token: [V (first token), V]."""
    rng = np.random.default_rng(7)
    return (LOGITS[None, :] + rng.normal(0, 1.0, (V, V))).astype(np.float32)


@pytest.mark.parametrize("name", ["t1", "t0.8_topk4"])
def test_two_token_joint_is_the_target_distribution(name):
    """Two drafts per trial; verified rows -> the host walk (runtime.spec_decode.collect) ->
    (t0, t1). After a rejection at position 0 the second token comes from the next step."""
    row = ROWS[name]
    cond = _conditional_logits()  # [V, V]
    rng = np.random.default_rng(2)
    x = rng.choice(V, size=(N, 2), p=Q)  # drafts [N, 2]
    logits = np.stack([np.broadcast_to(LOGITS, (N, V)), cond[x[:, 0]],
                       cond[x[:, 0]]], axis=1).reshape(3 * N, V)  # rows: pos 0, 1, bonus
    drafts = np.stack([x[:, 0], x[:, 1], np.full(N, -1)], axis=1).reshape(-1)
    rows = [replace(row, output_index=j) for _ in range(N) for j in range(3)]
    host = _verify(logits, rows, drafts, step_seed=11)
    chunks = [SimpleNamespace(request_id=str(i), sample=True, spec_token_ids=list(x[i]),
                              sampling_params=SimpleNamespace(logprobs=None))
              for i in range(N)]
    out = ModelRunnerOutput()
    collect(host, chunks, SpecLayout(np.zeros(0), drafts, list(range(0, 3 * N, 3)), 3 * N),
            out)
    firsts = np.array([out.spec_tokens[str(i)][0] for i in range(N)])
    seconds = np.array([(out.spec_tokens[str(i)] + [-1])[1] for i in range(N)])
    todo = np.flatnonzero(seconds < 0)  # rejected at position 0: one more (plain) step
    nxt = _verify(cond[firsts[todo]], [row] * len(todo), np.full(len(todo), -1), step_seed=12)
    seconds[todo] = nxt.token_ids
    p0 = reference_probs(LOGITS, row)
    joint = np.stack([p0[a] * reference_probs(cond[a], row) for a in range(V)])  # [V, V]
    counts = np.zeros((V, V))
    np.add.at(counts, (firsts, seconds), 1)
    tol = tv_tolerance(N, int((joint > 0).sum()))
    assert counts[joint == 0].sum() == 0
    tv = total_variation(counts / N, joint)
    assert tv < tol, f"TV {tv:.4f} >= {tol:.4f}"
    # power: drafting from q and always accepting would be far off
    assert total_variation(np.outer(Q, Q), joint) > 2 * tol
    assert 0 < len(todo) < N


def test_greedy_accepts_exactly_the_argmax():
    row = SamplingRow(temperature=0.0)
    drafts = np.arange(-1, V)  # every token once, and a row without a draft
    out = _verify(np.broadcast_to(LOGITS, (len(drafts), V)), [row] * len(drafts), drafts, 3)
    best = int(np.argmax(LOGITS))
    assert out.accepted.tolist() == [d == best for d in drafts]
    assert set(out.token_ids.tolist()) == {best}


def test_rows_without_drafts_sample_like_the_plain_sampler():
    """Same key, same draw: a spec engine that drafts nothing samples what the plain one does."""
    from jaxserve.sample.sampler import sample_jit

    rows = [replace(ROWS["t0.8_topk4"], seed=s) for s in range(64)]
    logits = np.broadcast_to(LOGITS, (64, V))
    md = build_sampling_metadata(rows, 64, 0)
    plain = np.asarray(sample_jit(np.asarray(logits), md, num_logprobs=0).token_ids)
    out = _verify(logits, rows, np.full(64, -1), 0)
    assert out.token_ids.tolist() == plain.tolist() and not out.accepted.any()


@pytest.mark.parametrize("name", sorted(ROWS))
def test_first_token_with_a_draft_models_q(name):
    """Drafts drawn from the draft model's own q (verified against that q): accept x with
    probability min(1, p(x)/q(x)), else draw from norm(max(0, p - q))."""
    row = ROWS[name]
    p = reference_probs(LOGITS, row)
    rng = np.random.default_rng(3)
    drafts = rng.choice(V, size=N, p=Q_DRAFT)
    out = _verify(np.broadcast_to(LOGITS, (N, V)), [row] * N, drafts, 21,
                  q=np.broadcast_to(Q_DRAFT, (N, V)))
    emitted = np.where(out.accepted, drafts, out.token_ids)
    tol = tv_tolerance(N, int((p > 0).sum()))
    assert total_variation(Q_DRAFT, p) > 2 * tol  # accepting every draft would fail
    counts = np.bincount(emitted, minlength=V)
    assert counts[p == 0].sum() == 0
    tv = total_variation(counts / N, p)
    assert tv < tol, f"TV {tv:.4f} >= {tol:.4f}: {counts / N} vs {p}"
    # acceptance rate sum_x min(p(x), q(x)); a recovered token is never where q >= p
    assert abs(out.accepted.mean() - float(np.minimum(p, Q_DRAFT).sum())) < tol
    recovered = out.token_ids[~out.accepted]
    assert np.all(p[recovered] > Q_DRAFT[recovered])


def test_two_token_joint_with_a_draft_models_q():
    """Two drafts from a draft whose second-position q depends on the first draft, as a draft
    model's does; joint of the emitted (t0, t1) against the target's."""
    row = ROWS["t0.8_topk4"]
    cond = _conditional_logits()  # [V, V]
    rng = np.random.default_rng(4)
    q_cond = rng.dirichlet(np.full(V, 0.7), size=V)  # [V (first token), V]
    x0 = rng.choice(V, size=N, p=Q_DRAFT)
    x1 = np.array([rng.choice(V, p=q_cond[a]) for a in x0])
    logits = np.stack([np.broadcast_to(LOGITS, (N, V)), cond[x0], cond[x0]],
                      axis=1).reshape(3 * N, V)
    q = np.stack([np.broadcast_to(Q_DRAFT, (N, V)), q_cond[x0], np.zeros((N, V))],
                 axis=1).reshape(3 * N, V)
    drafts = np.stack([x0, x1, np.full(N, -1)], axis=1).reshape(-1)
    rows = [replace(row, output_index=j) for _ in range(N) for j in range(3)]
    host = _verify(logits, rows, drafts, 31, q=q)
    chunks = [SimpleNamespace(request_id=str(i), sample=True, spec_token_ids=[x0[i], x1[i]],
                              sampling_params=SimpleNamespace(logprobs=None))
              for i in range(N)]
    out = ModelRunnerOutput()
    collect(host, chunks, SpecLayout(np.zeros(0), drafts, list(range(0, 3 * N, 3)), 3 * N),
            out)
    firsts = np.array([out.spec_tokens[str(i)][0] for i in range(N)])
    seconds = np.array([(out.spec_tokens[str(i)] + [-1])[1] for i in range(N)])
    todo = np.flatnonzero(seconds < 0)
    nxt = _verify(cond[firsts[todo]], [row] * len(todo), np.full(len(todo), -1), 32)
    seconds[todo] = nxt.token_ids
    p0 = reference_probs(LOGITS, row)
    joint = np.stack([p0[a] * reference_probs(cond[a], row) for a in range(V)])  # [V, V]
    counts = np.zeros((V, V))
    np.add.at(counts, (firsts, seconds), 1)
    tol = tv_tolerance(N, int((joint > 0).sum()))
    assert counts[joint == 0].sum() == 0
    tv = total_variation(counts / N, joint)
    assert tv < tol, f"TV {tv:.4f} >= {tol:.4f}"
    assert total_variation(Q_DRAFT[:, None] * q_cond, joint) > 2 * tol
    assert 0 < len(todo) < N
