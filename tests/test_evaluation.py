"""Evaluation against per-query loops transcribed from the published code (float64)."""

import functools

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import gsra_salad.evaluation.streaming as search_module
from gsra_salad.evaluation import (
    average_precision,
    embed,
    evaluate_retrieval,
    geodesic_distance,
    recall_at_k,
    save_retrieval_grid,
    search,
)
from gsra_salad.evaluation.grid import FALSE_COLOUR, QUERY_COLOUR, TRUE_COLOUR
from tests._helpers import free_port, gloo_group

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# the integer descriptors below tie on purpose; the warning about it is tested on its own
pytestmark = pytest.mark.filterwarnings("ignore:.*exactly as similar as their true match")

# ---------------------------------------------------------------------------------------------
# test oracles
# ---------------------------------------------------------------------------------------------


def sample4geo_cvusa(query, reference, query_labels, reference_labels, ks, ties="optimistic"):
    """Sample4Geo's ``calculate_scores`` (evaluate/cvusa_and_cvact.py): a loop over queries.

    ``ties="optimistic"`` is the published code (references strictly more similar);
    ``"pessimistic"`` counts the other references at least as similar."""
    topk = [*ks, len(reference) // 100]
    similarity = query.double() @ reference.double().T
    ref2index = {int(idx): i for i, idx in enumerate(reference_labels)}
    results = np.zeros(len(topk))
    for i in range(len(query)):
        gt_sim = similarity[i, ref2index[int(query_labels[i])]]
        if ties == "optimistic":
            ranking = (similarity[i, :] > gt_sim).sum()
        else:
            ranking = (similarity[i, :] >= gt_sim).sum() - 1  # not the true one itself
        for j, k in enumerate(topk):
            if ranking < k:
                results[j] += 1.0
    return results / len(query) * 100.0


def compute_map(index, good_index, junk_index):
    """University1652-Baseline's ``compute_mAP`` (as copied by LRFR's utils/trainer.py)."""
    ap = 0
    cmc = torch.IntTensor(len(index)).zero_()
    if good_index.size == 0:
        cmc[0] = -1
        return ap, cmc
    mask = np.isin(index, junk_index, invert=True)
    index = index[mask]
    ngood = len(good_index)
    mask = np.isin(index, good_index)
    rows_good = np.argwhere(mask).flatten()
    cmc[rows_good[0] :] = 1
    for i in range(ngood):
        d_recall = 1.0 / ngood
        precision = (i + 1) * 1.0 / (rows_good[i] + 1)
        old_precision = i * 1.0 / rows_good[i] if rows_good[i] != 0 else 1.0
        ap = ap + d_recall * (old_precision + precision) / 2
    return ap, cmc


def official_university(query, reference, ql, gl, ks, *, ties="pessimistic"):
    """The University-1652 evaluation loop (``evaluate`` + ``eval_query``), float64 scores.

    The published code orders the gallery with ``np.argsort(score)[::-1]``, whose order among
    equal scores is unspecified; ``ties="pessimistic"`` puts true matches last among equals,
    ``ties="optimistic"`` first (the two rules of ``evaluate_retrieval``); ``ties="argsort"``
    is the literal code.
    """
    ql, gl = np.asarray(ql), np.asarray(gl)
    cmc = torch.IntTensor(len(gl)).zero_()
    ap = 0.0
    for i in range(len(ql)):
        score = (reference.double() @ query[i].double()).numpy()
        good_index = np.argwhere(gl == ql[i])
        junk_index = np.argwhere(gl == -1)
        if ties == "argsort":
            index = np.argsort(score)[::-1]
        else:
            is_good = np.isin(np.arange(len(gl)), good_index)
            index = np.lexsort((~is_good if ties == "optimistic" else is_good, -score))
        ap_tmp, cmc_tmp = compute_map(index, good_index, junk_index)
        if cmc_tmp[0] == -1:
            continue
        cmc = cmc + cmc_tmp
        ap += ap_tmp
    cmc = cmc.double() / len(ql)  # the published code divides in float32
    kept = int((gl != -1).sum())
    result = {f"R@{k}": float(cmc[k - 1] * 100) for k in ks}
    result["R@1%"] = float(cmc[max(1, kept // 100) - 1] * 100)
    result["AP"] = ap / len(ql) * 100
    return result


def integer_descriptors(n, d, generator):
    """Small integers: every inner product is exact in float16/32/64, and ties are frequent."""
    return torch.randint(-2, 3, (n, d), generator=generator).float()


def university_case(seed=0, n_buildings=12, per_building=5, distractors=4, junk=6, d=6):
    """Satellite -> drone style: one query per building, many true gallery items per building,
    junk (-1) items and distractor buildings that no query has."""
    g = torch.Generator().manual_seed(seed)
    ql = torch.arange(n_buildings)
    gl = torch.cat([
        torch.arange(n_buildings).repeat_interleave(per_building),
        100 + torch.arange(distractors).repeat_interleave(3),
        torch.full((junk,), -1),
    ])  # fmt: skip
    gl = gl[torch.randperm(len(gl), generator=g)]
    q = integer_descriptors(len(ql), d, g)
    r = integer_descriptors(len(gl), d, g)
    return q, r, ql, gl


def cvusa_case(seed=0, n=250, d=6, extra=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randperm(10 * (n + extra), generator=g)[: n + extra]
    q = integer_descriptors(n, d, g)
    r = q[torch.arange(n + extra) % n] + integer_descriptors(n + extra, d, g)
    return q, r, labels[:n], labels


def assert_same(result, expected, tol=1e-9):
    assert result.keys() == expected.keys()
    for key in expected:
        assert result[key] == pytest.approx(expected[key], abs=tol), key


# ---------------------------------------------------------------------------------------------
# protocols against the loops
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
@pytest.mark.parametrize("extra", [0, 30])
@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_cvusa_equals_sample4geo_loop_with_ties(chunk_size, extra, ties):
    q, r, ql, rl = cvusa_case(extra=extra)  # extra: references that no query has
    ks = (1, 5, 10)
    result = evaluate_retrieval(q, r, ql, rl, ks=ks, chunk_size=chunk_size, ties=ties)
    expected = sample4geo_cvusa(q, r, ql, rl, ks, ties=ties)
    keys = [f"R@{k}" for k in ks] + ["R@1%"]
    assert_same(result, dict(zip(keys, expected.tolist())))
    ties = (q.double() @ r.double().T).unsqueeze(-1) == (q.double() @ r.double().T).unsqueeze(1)
    assert ties.sum() > q.shape[0] * r.shape[0]  # the data do have ties
    # and the rule matters on them
    assert evaluate_retrieval(q, r, ql, rl, ks=ks) != evaluate_retrieval(
        q, r, ql, rl, ks=ks, ties="optimistic"
    )


def test_cvusa_ties_count_against_the_query_unless_optimistic():
    q = torch.tensor([[1.0, 0.0]])
    r = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert evaluate_retrieval(q, r, [5], [3, 4, 5, 6], ks=(1, 2, 3)) == {
        "R@1": 0.0, "R@2": 0.0, "R@3": 100.0, "R@1%": 0.0,
    }  # fmt: skip
    result = evaluate_retrieval(q, r, [5], [3, 4, 5, 6], ks=(1,), ties="optimistic")
    assert result["R@1"] == 100.0


def collapsed(kind, n, d=16):
    """The descriptors of a collapsed model: all rows equal. Every inner product is exact
    (16 * (1/4)**2 = 1 or 0), so the scores tie exactly in any summation order."""
    return torch.full((n, d), 0.25) if kind == "ones" else torch.zeros(n, d)


@pytest.mark.parametrize("kind", ["ones", "zeros"])
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_a_collapsed_model_scores_zero_and_warns(kind, backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    n = 1000
    labels = torch.arange(n)
    q, r = collapsed(kind, n), collapsed(kind, n)
    with pytest.warns(UserWarning, match="nearly. identical.*collapsed"):
        result = evaluate_retrieval(q, r, labels, labels, backend=backend)
    # every other reference ties with the true one: rank n - 1 for every query
    assert result == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "R@1%": 0.0}
    with pytest.warns(UserWarning, match="collapsed"):
        published = evaluate_retrieval(q, r, labels, labels, backend=backend, ties="optimistic")
    assert published == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "R@1%": 100.0}
    # University-1652: the true match is the last of n equal items (position r = n - 1):
    # AP = (0 / r + 1 / (r + 1)) / 2
    with pytest.warns(UserWarning, match="collapsed"):
        u = evaluate_retrieval(q, r, labels, labels, backend=backend, protocol="university1652")
    assert u["R@1"] == u["R@1%"] == 0.0
    assert u["AP"] == pytest.approx(100 / (2 * n), rel=1e-12)


@pytest.mark.parametrize("protocol", ["cvusa", "university1652"])
@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_backends_agree_on_duplicated_references(protocol, ties, chunk_size):
    """Wrong references that duplicate the true one (or each other), and a top-k cut that
    falls inside a group of equal scores: both backends rank ties by the same rule."""
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    n = 300  # R@1% = R@3: the FAISS top-k cut is at k_max + 1 = 11 (ks up to 10)
    q = integer_descriptors(n, 4, g)
    r = q.clone()
    r[1::2] = r[0:-1:2]  # every odd reference duplicates the even one before it
    r[::7] = 1.0  # and a group of identical references
    ql = torch.arange(n)
    kwargs = dict(ks=(1, 5, 10), ties=ties, chunk_size=chunk_size, protocol=protocol)
    torch_result = evaluate_retrieval(q, r, ql, ql, **kwargs)
    assert evaluate_retrieval(q, r, ql, ql, backend="faiss", **kwargs) == torch_result
    if protocol == "cvusa":
        expected = sample4geo_cvusa(q, r, ql, ql, (1, 5, 10), ties=ties)
        assert_same(torch_result, dict(zip(["R@1", "R@5", "R@10", "R@1%"], expected.tolist())))
    else:
        assert_same(torch_result, official_university(q, r, ql, ql, (1, 5, 10), ties=ties))


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("n_equal", [1, 2, 5, 11, 12, 40])
def test_faiss_top_k_cut_inside_a_tie(ties, n_equal):
    """The true reference ties with ``n_equal`` wrong ones, with one reference above them:
    the FAISS top-k (k_max + 1 = 11 here) may cut through the tie; the count must not."""
    pytest.importorskip("faiss")
    r = torch.zeros(60, 4)
    r[0] = torch.tensor([2.0, 0, 0, 0])  # above the tie
    r[1 : n_equal + 2] = torch.tensor([1.0, 0, 0, 0])  # the true one (label 1) and n_equal
    r[n_equal + 2 :, 1] = 1.0  # below
    q = torch.tensor([[1.0, 0, 0, 0]])
    rl = torch.arange(60)
    kwargs = dict(ks=(1, 2, 10), ties=ties)
    expected = 1 + (n_equal if ties == "pessimistic" else 0)  # the true reference's rank
    result = evaluate_retrieval(q, r, [1], rl, **kwargs)
    assert result == {f"R@{k}": 100.0 * (expected < k) for k in (1, 2, 10)} | {"R@1%": 0.0}
    assert evaluate_retrieval(q, r, [1], rl, backend="faiss", **kwargs) == result


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("protocol", ["cvusa", "university1652"])
def test_frequent_exact_ties_warn(backend, protocol, recwarn):
    if backend == "faiss":
        pytest.importorskip("faiss")
    q, r, ql, rl = cvusa_case(n=200)  # small integers: many true matches tie a wrong one
    s = q @ r.T
    true = s.diagonal().unsqueeze(1)
    tied = int(((s == true) & ~torch.eye(200, dtype=torch.bool)).any(1).sum())
    assert tied > 2  # more than 1% of the queries
    kwargs = dict(backend=backend, protocol=protocol)
    if backend == "faiss" and protocol == "cvusa":  # sees ties within its top k only
        kwargs["ks"] = (200,)
    with pytest.warns(UserWarning, match=f"{tied} of the 200 queries .*exactly as similar"):
        evaluate_retrieval(q, r, ql, rl, **kwargs)
    g = torch.Generator().manual_seed(0)
    qc, rc = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)
    recwarn.clear()
    evaluate_retrieval(qc, rc, ql, ql, backend=backend, protocol=protocol)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_near_constant_descriptors_warn_and_real_ones_do_not(recwarn):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(50)
    varied = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    nearly = torch.nn.functional.normalize(1 + 1e-6 * torch.randn(50, 8, generator=g), dim=1)
    evaluate_retrieval(varied, varied, labels, labels)
    evaluate_retrieval(varied[:1], varied[:1], labels[:1], labels[:1], ks=(1,))  # one row
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    with pytest.warns(UserWarning, match=r"rows of reference_descriptors .*identical"):
        evaluate_retrieval(varied, nearly, labels, labels)
    with pytest.warns(UserWarning, match=r"rows of query_descriptors .*and the 50 rows of ref"):
        evaluate_retrieval(nearly, nearly.half(), labels, labels)


@pytest.mark.parametrize("chunk_size", [None, 1, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_university_equals_official_loop_with_ties_junk_and_distractors(chunk_size, seed, ties):
    q, r, ql, gl = university_case(seed)
    ks = (1, 5, 10)
    result = evaluate_retrieval(
        q, r, ql, gl, ks=ks, protocol="university1652", chunk_size=chunk_size, ties=ties
    )
    assert_same(result, official_university(q, r, ql, gl, ks, ties=ties))


def test_university_equals_literal_argsort_code_without_ties():
    g = torch.Generator().manual_seed(5)
    _, _, ql, gl = university_case(5)
    q, r = torch.randn(len(ql), 16, generator=g), torch.randn(len(gl), 16, generator=g)
    ks = (1, 3)
    result = evaluate_retrieval(q, r, ql, gl, ks=ks, protocol="university1652")
    assert_same(result, official_university(q, r, ql, gl, ks, ties="argsort"), tol=1e-6)


def test_university_one_true_match_per_query_drone_to_satellite():
    g = torch.Generator().manual_seed(3)
    gl = torch.arange(40)  # satellite gallery: one image per building, 10 distractors
    ql = torch.arange(30).repeat_interleave(3)  # three drone views per building
    q, r = integer_descriptors(len(ql), 5, g), integer_descriptors(len(gl), 5, g)
    result = evaluate_retrieval(q, r, ql, gl, ks=(1, 5), protocol="university1652")
    assert_same(result, official_university(q, r, ql, gl, (1, 5)))


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_both_counting_paths_agree(monkeypatch, ties):
    q, r, ql, gl = university_case(4, per_building=9)
    kwargs = dict(ks=(1, 5), protocol="university1652", ties=ties)
    by_comparison = evaluate_retrieval(q, r, ql, gl, **kwargs)
    monkeypatch.setattr(search_module, "_COUNT_BY_COMPARISON", 0)  # sort + searchsorted
    by_sort = evaluate_retrieval(q, r, ql, gl, **kwargs)
    assert by_sort == by_comparison
    monkeypatch.setattr(search_module, "_COUNT_BY_COMPARISON", 16)
    monkeypatch.setattr(search_module, "_COUNT_ELEMENTS", 2 * len(gl) + 1)  # two rows at a time
    assert evaluate_retrieval(q, r, ql, gl, **kwargs) == by_comparison
    assert_same(by_sort, official_university(q, r, ql, gl, (1, 5), ties=ties))


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_positions_by_sort_and_by_comparison_agree_with_a_loop(ties):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (40, 30), generator=g).double()  # many ties
    scores[:, -3:] = float("-inf")  # junk
    true = torch.stack([torch.randperm(27, generator=g)[:5] for _ in range(40)])
    true[::3, 2:] = -1  # fewer true matches in some rows
    true[1, :] = -1  # none in one
    out = [search_module.positions_from_scores(scores, true, sort=s, ties=ties) for s in (0, 1)]
    for a, b in zip(*out):
        assert torch.equal(a, b)
    positions, counts, tied = out[0]
    for c in range(40):  # the ranking spelt out: score descending, then the tie rule
        good = set(true[c][true[c] >= 0].tolist())
        last = ties == "pessimistic"  # true matches after the wrong ones of equal score
        order = sorted(range(27), key=lambda j: (-scores[c, j], (j in good) == last))
        expected = [p for p, j in enumerate(order) if j in good]
        assert positions[c, : len(expected)].tolist() == expected
        assert (positions[c, len(expected) :] == -1).all() and counts[c] == len(expected)
        best = max((scores[c, j] for j in good), default=None)
        wrong_equal = any(scores[c, j] == best for j in range(30) if j not in good)
        assert bool(tied[c]) == (best is not None and wrong_equal)


def test_distractors_are_kept_and_drop_is_the_variant():
    q, r, ql, gl = university_case(7)
    official = evaluate_retrieval(q, r, ql, gl, ks=(1,), protocol="university1652")
    dropped = evaluate_retrieval(
        q, r, ql, gl, ks=(1,), protocol="university1652", distractors="drop"
    )
    # the variant = the official protocol with the distractor buildings turned into junk
    as_junk = torch.where(torch.isin(gl, ql), gl, torch.full_like(gl, -1))
    assert_same(dropped, official_university(q, r, ql, as_junk, (1,)))
    assert dropped["AP"] > official["AP"]


def test_query_without_true_match_is_a_miss_in_the_denominator():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    result = evaluate_retrieval(q, r, [0, 7], [0, 1], ks=(1,), protocol="university1652")
    assert result == {"R@1": 50.0, "R@1%": 50.0, "AP": 50.0}


def test_streaming_never_scores_more_than_a_chunk(monkeypatch):
    q, r, ql, rl = cvusa_case(n=60)
    shapes = []
    original = search_module.similarity_block

    def spy(query_chunk, reference):
        shapes.append((query_chunk.shape[0], reference.shape[0]))
        return original(query_chunk, reference)

    monkeypatch.setattr(search_module, "similarity_block", spy)
    evaluate_retrieval(q, r, ql, rl, chunk_size=8)
    assert max(s[0] for s in shapes) == 8 and sum(s[0] for s in shapes) == 60
    shapes.clear()
    monkeypatch.setattr(search_module, "_BLOCK_ELEMENTS", 60 * 10)  # automatic chunk of 10
    evaluate_retrieval(q, r, ql, rl)
    assert max(s[0] for s in shapes) == 10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("protocol", ["cvusa", "university1652"])
def test_low_precision_storage_is_computed_in_float32(dtype, protocol, monkeypatch):
    if protocol == "cvusa":
        q, r, ql, rl = cvusa_case(n=120)
    else:
        q, r, ql, rl = university_case(2)
    monkeypatch.setattr(search_module, "_CONVERT_ELEMENTS", 3 * q.shape[1])  # many slices
    low = evaluate_retrieval(q.to(dtype), r.to(dtype), ql, rl, protocol=protocol, ks=(1, 5))
    full = evaluate_retrieval(q, r, ql, rl, protocol=protocol, ks=(1, 5))
    assert low == full
    # values that float16 cannot hold: the float32 computation of the stored values
    g = torch.Generator().manual_seed(0)
    qh = torch.randn(50, 32, generator=g).to(dtype)
    rh = (qh.float() + 0.8 * torch.randn(50, 32, generator=g)).to(dtype)
    labels = torch.arange(50)
    assert evaluate_retrieval(qh, rh, labels, labels) == evaluate_retrieval(
        qh.double(), rh.double(), labels, labels
    )


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_the_descriptors_device(device):
    q, r, ql, gl = university_case(1)
    expected = official_university(q, r, ql, gl, (1, 5))
    result = evaluate_retrieval(
        q.to(device), r.to(device), ql.to(device), gl, ks=(1, 5), protocol="university1652"
    )
    assert_same(result, expected)


def test_labels_may_be_lists_or_numpy():
    q, r, ql, rl = cvusa_case(n=30)
    a = evaluate_retrieval(q, r, ql, rl)
    b = evaluate_retrieval(q, r, ql.tolist(), rl.numpy())
    assert a == b


# ---------------------------------------------------------------------------------------------
# localisation error
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "haversine"])
def test_localisation_error_of_the_top1_reference(metric):
    q, r, ql, rl = cvusa_case(n=80, extra=20)
    g = torch.Generator().manual_seed(1)
    if metric == "euclidean":
        r_pos = torch.rand(len(r), 2, generator=g, dtype=torch.float64) * 3000
    else:
        r_pos = torch.stack([
            48 + torch.rand(len(r), generator=g, dtype=torch.float64) * 0.02,
            11 + torch.rand(len(r), generator=g, dtype=torch.float64) * 0.02,
        ], 1)  # fmt: skip
    index = {int(label): i for i, label in enumerate(rl)}
    q_pos = r_pos[[index[int(label)] for label in ql]] + (1e-5 if metric == "haversine" else 3)
    result = evaluate_retrieval(
        q, r, ql, rl, query_positions=q_pos, reference_positions=r_pos, position_metric=metric
    )
    # oracle: first most similar reference per query, distances in a loop
    errors = []
    for i in range(len(q)):
        s = r.double() @ q[i].double()
        top = int(torch.nonzero(s == s.max())[0])  # the first of equal scores
        if metric == "euclidean":
            errors.append(float(np.linalg.norm(q_pos[i].numpy() - r_pos[top].numpy())))
        else:
            from gsra_salad.data.geometry import haversine_m

            errors.append(float(haversine_m(q_pos[i].numpy(), r_pos[top].numpy())))
    errors = np.array(errors)
    assert result["median_error_m"] == pytest.approx(np.median(errors), rel=1e-9)
    assert result["within_25m"] == pytest.approx(100 * np.mean(errors <= 25))
    assert result["within_1km"] == pytest.approx(100 * np.mean(errors <= 1000))
    assert 0 < result["within_25m"] < 100 and result["within_1km"] > result["within_25m"]


def test_geodesic_distance_matches_the_data_module():
    from gsra_salad.data.geometry import haversine_m

    g = torch.Generator().manual_seed(0)
    a = torch.rand(20, 2, generator=g, dtype=torch.float64) * torch.tensor([180.0, 360]) - 90
    b = torch.rand(20, 2, generator=g, dtype=torch.float64) * torch.tensor([180.0, 360]) - 90
    np.testing.assert_allclose(
        geodesic_distance(a, b, "haversine").numpy(), haversine_m(a.numpy(), b.numpy()), rtol=1e-12
    )


# ---------------------------------------------------------------------------------------------
# FAISS backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 6])
def test_faiss_backend_gives_the_same_numbers(chunk_size):
    pytest.importorskip("faiss")
    q, r, ql, rl = cvusa_case(n=150, extra=10)
    pos = torch.rand(len(r), 2, dtype=torch.float64) * 100
    kwargs = dict(ks=(1, 5, 10), chunk_size=chunk_size)
    index = {int(label): i for i, label in enumerate(rl)}
    q_pos = pos[[index[int(label)] for label in ql]]
    # continuous scores (no ties: FAISS orders equal scores its own way at the top-k cut)
    g = torch.Generator().manual_seed(0)
    qc, rc = torch.randn(len(q), 8, generator=g), torch.randn(len(r), 8, generator=g)
    rc[: len(q)] += qc
    geo = dict(query_positions=q_pos, reference_positions=pos, position_metric="euclidean")
    assert evaluate_retrieval(qc, rc, ql, rl, backend="faiss", **geo, **kwargs) == (
        evaluate_retrieval(qc, rc, ql, rl, **geo, **kwargs)
    )
    # integer descriptors: many exact ties, also at the top-k cut; both rules
    for ties in ("pessimistic", "optimistic"):
        assert evaluate_retrieval(q, r, ql, rl, backend="faiss", ties=ties, **kwargs) == (
            evaluate_retrieval(q, r, ql, rl, ties=ties, **kwargs)
        )
    # University-1652: full rankings, exact with ties, junk and distractors
    q, r, ql, gl = university_case(3)
    for distractors in ("keep", "drop"):
        u = dict(ks=(1, 5), protocol="university1652", distractors=distractors)
        assert evaluate_retrieval(q, r, ql, gl, backend="faiss", chunk_size=chunk_size, **u) == (
            evaluate_retrieval(q, r, ql, gl, **u)
        )


# ---------------------------------------------------------------------------------------------
# metrics and search
# ---------------------------------------------------------------------------------------------


def test_average_precision_equals_compute_map():
    g = torch.Generator().manual_seed(0)
    rows, expected = [], []
    for n_good in (1, 2, 5, 9):
        index = torch.randperm(30, generator=g).numpy()
        good = torch.randperm(30, generator=g)[:n_good].numpy()
        ap, _ = compute_map(index, good, np.array([], dtype=int))
        positions = np.sort(np.flatnonzero(np.isin(index, good)))
        rows.append(list(positions) + [-1] * (9 - n_good))
        expected.append(ap)
    torch.testing.assert_close(
        average_precision(torch.tensor(rows)), torch.tensor(expected, dtype=torch.float64)
    )
    assert average_precision(torch.full((1, 3), -1))[0] == 0.0


def test_recall_at_k():
    assert recall_at_k(torch.tensor([0, 1, 2, 3]), 2) == 50.0
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="empty"):
        recall_at_k(torch.tensor([], dtype=torch.long), 1)


def test_search_equals_a_dense_topk():
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(37, 12, generator=g), torch.randn(90, 12, generator=g)
    scores, indices = search(q, r, k=7, chunk_size=5)
    dense_scores, dense_indices = (q @ r.T).topk(7, dim=1)
    torch.testing.assert_close(scores, dense_scores)
    assert torch.equal(indices, dense_indices)
    s16, i16 = search(q.half(), r.half(), k=3)
    assert s16.dtype == torch.float32 and i16.shape == (37, 3)
    with pytest.raises(ValueError, match="k must be"):
        search(q, r, k=91)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

Q4, R5 = torch.randn(4, 3), torch.randn(5, 3)
L4, L5 = torch.arange(4), torch.arange(5)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((Q4, torch.randn(5, 2), L4, L5), {}, "same dimension"),
        ((Q4, R5, torch.arange(3), L5), {}, r"query_labels must have shape \(4,\)"),
        ((Q4, R5, L4, torch.arange(6)), {}, r"reference_labels must have shape \(5,\)"),
        ((Q4, R5, L4.float(), L5), {}, "query_labels must hold integers"),
        ((torch.full((4, 3), float("nan")), R5, L4, L5), {}, "query_descriptors holds NaN"),
        ((Q4, torch.full((5, 3), float("inf")), L4, L5), {}, "reference_descriptors holds NaN"),
        ((torch.empty(0, 3), R5, L4[:0], L5), {}, "query_descriptors is empty"),
        ((Q4, torch.empty(0, 3), L4, L5[:0]), {}, "reference_descriptors is empty"),
        ((Q4.long(), R5, L4, L5), {}, "floating point"),
        ((Q4[0], R5, L4, L5), {}, r"shape \(N, D\)"),
        ((Q4, R5, L4, L5), {"protocol": "cvact"}, "protocol must be one of"),
        ((Q4, R5, L4, L5), {"ks": (1, 6)}, r"ks.*\[1, 5\]"),
        ((Q4, R5, L4, L5), {"ks": (0,)}, "ks"),
        ((Q4, R5, L4, L5), {"ks": ()}, "ks is empty"),
        ((Q4, R5, L4 + 10, L5), {"ks": (1,)}, "missing from reference_labels"),
        ((Q4, R5, L4, torch.tensor([0, 0, 1, 2, 3])), {"ks": (1,)}, "several times"),
        ((Q4, R5, L4, L5), {"distractors": "drop"}, "variant of the university1652"),
        ((Q4, R5, L4, L5), {"distractors": "ignore"}, "distractors must be one of"),
        ((Q4, R5, L4, L5), {"backend": "annoy"}, "backend must be one of"),
        ((Q4, R5, L4, L5), {"chunk_size": 0}, "chunk_size"),
        ((Q4, R5, L4, L5), {"ties": "random"}, "ties must be one of"),
        ((Q4, R5, L4, -torch.ones(5).long()), {"protocol": "university1652"}, "no reference"),
        ((Q4, R5, -torch.ones(4).long(), L5), {"protocol": "university1652"}, "junk label"),
        ((Q4, R5, L4, L5), {"query_positions": torch.zeros(4, 2)}, "pass both"),
        (
            (Q4, R5, L4, L5),
            {"query_positions": torch.zeros(4, 2), "reference_positions": torch.zeros(5, 2)},
            "position_metric must",
        ),
        (
            (Q4, R5, L4, L5),
            {
                "query_positions": torch.zeros(4, 3),
                "reference_positions": torch.zeros(5, 2),
                "position_metric": "euclidean",
            },
            r"query_positions must have shape \(4, 2\)",
        ),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate_retrieval(*args, **kwargs)


def test_non_tensor_descriptors():
    with pytest.raises(TypeError, match=r"query_descriptors must be a torch\.Tensor"):
        evaluate_retrieval(Q4.numpy(), R5, L4, L5)


# ---------------------------------------------------------------------------------------------
# embed
# ---------------------------------------------------------------------------------------------


class Pairs(Dataset):
    """(image, label) items with labels that differ from the indices."""

    def __init__(self, n=11):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, 4, 4, generator=g)
        self.labels = (torch.arange(n) * 7 + 3).tolist()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(48, 6)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        return self.dropout(self.linear(x.flatten(1)))

    def embed(self, x, view="query"):
        return self(x) * (1.0 if view == "query" else -1.0)


def test_embed_a_dataset_in_order_in_eval_mode_and_restores_the_mode():
    data, net = Pairs(), Net()
    net.train()
    desc, labels = embed(net, data, batch_size=4, progress=False)
    assert net.training  # restored
    expected = net.eval()(data.images)  # dropout off: the same as in eval mode
    torch.testing.assert_close(desc, expected)
    assert labels.dtype == torch.long and labels.tolist() == data.labels
    assert not desc.requires_grad and not desc.is_inference()


def test_embed_bound_methods_partials_and_loaders():
    data, net = Pairs(), Net()
    net.train()
    expected = net.eval()(data.images)
    net.train()
    d1, _ = embed(net.embed, data, batch_size=3, progress=False)
    d2, _ = embed(functools.partial(net.embed, view="reference"), data, progress=False)
    assert net.training
    torch.testing.assert_close(d1, expected)
    torch.testing.assert_close(d2, -expected)
    loader = DataLoader(data, batch_size=5)
    net.eval()
    d3, labels = embed(lambda x: net(x), loader, progress=False)
    torch.testing.assert_close(d3, expected)
    assert labels.tolist() == data.labels


def test_embed_amp_and_storage_dtype():
    data, net = Pairs(), Net()
    expected = net.eval()(data.images)
    desc, _ = embed(net, data, amp=torch.bfloat16, progress=False)
    assert desc.dtype == torch.float32
    torch.testing.assert_close(desc, expected, rtol=3e-2, atol=3e-2)
    half, _ = embed(net, data, dtype=torch.float16, progress=False)
    assert half.dtype == torch.float16
    desc, _ = embed(net, data, amp=True, progress=True)  # tqdm, when installed, to stderr


def test_embed_feeds_evaluate_retrieval():
    data, net = Pairs(), Net()
    net.eval()  # in training mode, dropout can leave two images one equal direction: a tie
    q, ql = embed(lambda x: nn.functional.normalize(net(x), dim=1), data, progress=False)
    assert len(q.unique(dim=0)) == len(q)
    result = evaluate_retrieval(q, q, ql, ql, ks=(1,))
    assert result["R@1"] == 100.0


def test_embed_bad_input():
    with pytest.raises(ValueError, match=r"\(image, label\) pairs"):
        embed(Net(), TensorDataset(torch.rand(4, 3, 4, 4)), progress=False)
    with pytest.raises(ValueError, match=r"descriptors \(B, D\)"):
        embed(lambda x: x, Pairs(), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        embed(Net(), Pairs(), batch_size=0)
    with pytest.raises(ValueError, match="amp"):
        embed(Net(), Pairs(), amp="yes", progress=False)
    with pytest.raises(TypeError, match="callable"):
        embed(3, Pairs())
    with pytest.raises(ValueError, match="empty"):
        embed(Net(), Pairs(0), progress=False)


class Named(Pairs):
    """Items labelled by strings (e.g. folder names), or by fractional numbers."""

    def __init__(self, labels):
        super().__init__(len(labels))
        self.labels = labels


@pytest.mark.parametrize(
    "labels,match",
    [
        (["0839", "0840", "0841"], r"integers .*got str labels such as '0839'.*Map them"),
        ([0.5, 1.0, 2.0], r"non-integer .* such as 0.5.*truncate"),
        ([True, False, True], "integers"),
    ],
)
def test_embed_rejects_labels_that_are_not_integers(labels, match):
    with pytest.raises(ValueError, match=match):
        embed(Net(), Named(labels), batch_size=2, progress=False)
    _, ok = embed(Net(), Named([3.0, 4.0, 5.0]), progress=False)  # integral floats are fine
    assert ok.tolist() == [3, 4, 5] and ok.dtype == torch.long


WORLD = 2


def _embed_worker(rank, port):

    with gloo_group(rank, WORLD, port):
        seen = []

        class Recording(Net):
            def forward(self, x):
                seen.append(len(x))
                return super().forward(x)

        for n in (11, 12):  # odd: the last share is padded with a duplicate
            data, net = Pairs(n), Recording()
            seen.clear()
            desc, labels = embed(net, data, batch_size=4, progress=False)
            assert sum(seen) == -(-n // WORLD), "each rank embeds only its share"
            expected = net.eval()(data.images)
            torch.testing.assert_close(desc, expected)
            assert labels.tolist() == data.labels
            seen.clear()
            desc, labels = embed(net, DataLoader(data, batch_size=3), progress=False)
            torch.testing.assert_close(desc, expected)
            assert labels.tolist() == data.labels


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_embed_under_two_processes_returns_the_dataset_in_order():
    torch.multiprocessing.spawn(_embed_worker, args=(free_port(),), nprocs=WORLD)


# ---------------------------------------------------------------------------------------------
# retrieval grid
# ---------------------------------------------------------------------------------------------


def test_retrieval_grid_size_and_outline_colours(tmp_path):
    from PIL import Image

    tile, border, k = 20, 3, 3
    queries = torch.zeros(2, 3, 10, 14)  # black
    references = [torch.ones(3, 8 + i, 8) for i in range(6)]  # white, sizes differ
    ranked = torch.tensor([[0, 1, 2, 5], [3, 4, 5, 0]])
    truth = torch.tensor([[True, False, False, True], [False, False, True, False]])
    path = save_retrieval_grid(
        tmp_path / "grid.png", queries, references, ranked, truth, k=k, tile_size=tile,
        border=border,
    )  # fmt: skip
    image = np.asarray(Image.open(path).convert("RGB"))
    cell = tile + 3 * border
    assert image.shape == (2 * cell + border, (k + 1) * cell + border, 3)

    def outline(row, col):  # a pixel of the outline, and one inside the tile
        top, left = row * cell + border, col * cell + border
        return tuple(image[top + 1, left + 1]), tuple(
            image[top + border + tile // 2, left + border + tile // 2]
        )

    for row in range(2):
        frame, inside = outline(row, 0)
        assert frame == QUERY_COLOUR and inside == (0, 0, 0)
        for j in range(k):
            frame, inside = outline(row, j + 1)
            assert frame == (TRUE_COLOUR if truth[row, j] else FALSE_COLOUR)
            assert inside == (255, 255, 255)
    assert tuple(image[0, 0]) == (255, 255, 255)  # the gap


def test_retrieval_grid_undoes_normalisation_and_checks_shapes(tmp_path):
    from PIL import Image

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    grey = torch.zeros(1, 3, 6, 6)  # normalised zeros = the mean = 0.5 grey
    path = save_retrieval_grid(
        tmp_path / "g.png", grey, grey, [[0]], [[True]], k=1, tile_size=6, border=1,
        mean=mean, std=std,
    )  # fmt: skip
    image = np.asarray(Image.open(path).convert("RGB"))
    assert tuple(image[4, 4]) == (128, 128, 128)
    with pytest.raises(ValueError, match="ranked_indices must have shape"):
        save_retrieval_grid(tmp_path / "x.png", grey, grey, [[0]], [[True]], k=2)
    with pytest.raises(ValueError, match="images must be"):
        save_retrieval_grid(tmp_path / "x.png", torch.zeros(1, 5, 6, 6), grey, [[0]], [[True]], k=1)


def test_retrieval_grid_leaves_no_reference_empty_and_never_wraps_negative_indices(tmp_path):
    from PIL import Image

    tile, border = 6, 1
    queries = torch.zeros(1, 3, 6, 6)
    references = [torch.full((3, 6, 6), 0.5), torch.ones(3, 6, 6)]  # grey, white
    path = save_retrieval_grid(
        tmp_path / "g.png", queries, references, [[0, -1]], [[False, True]], k=2,
        tile_size=tile, border=border,
    )  # fmt: skip
    image = np.asarray(Image.open(path).convert("RGB"))
    cell = tile + 3 * border
    outer = tile + 2 * border  # a tile and its outline
    top, left = border, 2 * cell + border  # the second reference's
    assert (image[top : top + outer, left : left + outer] == 255).all()  # empty
    assert tuple(image[top, cell + border]) == FALSE_COLOUR  # the first one's outline
    for bad, match in (
        ([[0, -2]], r"ranked_indices\[0, 1\] = -2 .*\[0, 2\)"),
        ([[2, 0]], r"ranked_indices\[0, 0\] = 2 "),
        ([[0.0, 1.0]], "integer indices"),
    ):
        with pytest.raises(ValueError, match=match):
            save_retrieval_grid(tmp_path / "x.png", queries, references, bad, [[1, 1]], k=2)
    assert not (tmp_path / "x.png").exists()


def test_huge_finite_descriptors_are_not_mistaken_for_inf():
    q = torch.full((2, 4), 3e38)  # finite, but their row sums overflow
    q[1] = -q[1]
    result = evaluate_retrieval(q, q, [0, 1], [0, 1], ks=(1,))
    assert result["R@1"] == 100.0
