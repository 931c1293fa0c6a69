"""Losses against literal transcriptions of the published code (float64), and across processes."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.reproduce_published import sample4geo_info_nce, semi_soft_tri_hard
from gsra_salad.losses import (
    InfoNCELoss,
    SoftMarginTripletLoss,
    info_nce_loss,
    soft_margin_triplet_loss,
)
from tests._helpers import free_port, gloo_group

# ---------------------------------------------------------------------------------------------
# test oracles: the published formulas written out literally (float64, CPU)
# ---------------------------------------------------------------------------------------------


def published_soft_triplet(inputs_q, inputs_k, alpha=10):
    """LRFR's ``SoftTripletLoss`` (utils/losses.py), without its ``.cuda()``."""

    def single_forward(inputs_q, inputs_k):
        n = inputs_q.size(0)
        normalized_inputs_q = inputs_q / torch.norm(inputs_q, dim=1, keepdim=True)
        normalized_inputs_k = inputs_k / torch.norm(inputs_k, dim=1, keepdim=True)
        sim_mat = torch.matmul(normalized_inputs_q, normalized_inputs_k.t())
        eyes_ = torch.eye(n, dtype=sim_mat.dtype)
        pos_mask = eyes_.eq(1)
        neg_mask = ~pos_mask
        pos_sim = torch.masked_select(sim_mat, pos_mask)
        neg_sim = torch.masked_select(sim_mat, neg_mask)
        pos_sim_ = pos_sim.unsqueeze(dim=1).expand(n, n - 1)
        neg_sim_ = neg_sim.reshape(n, n - 1)
        loss_batch = torch.log(1 + torch.exp((neg_sim_ - pos_sim_) * alpha))
        return loss_batch.mean()

    return (single_forward(inputs_q, inputs_k) + single_forward(inputs_k, inputs_q)) * 0.5


# LRFR's SemiSoftTriHard.forward (utils/losses.py), transcribed once, for the reproduction
# check and these tests
published_semi_soft_tri_hard = semi_soft_tri_hard


def per_row_oracle(q, r, labels, row_loss):
    """Both directions; each row's loss computed alone over its own negatives."""
    q, r = F.normalize(q, dim=1), F.normalize(r, dim=1)
    total = 0.0
    for a, b in ((q, r), (r, q)):
        rows = []
        for i in range(len(a)):
            negatives = [j for j in range(len(a)) if j != i and labels[j] != labels[i]]
            rows.append(row_loss(a[i], b[i], b[negatives]))
        total = total + torch.stack(rows).mean()
    return total / 2


def info_nce_row(scale, smoothing):
    def row(anchor, positive, negatives):
        logits = scale * torch.cat([positive[None], negatives]) @ anchor
        log_p = torch.log_softmax(logits, 0)
        return -(1 - smoothing) * log_p[0] - smoothing * log_p.mean()

    return row


def semi_hard_row(alpha):
    def row(anchor, positive, negatives):
        d_pos = 2 - 2 * anchor @ positive
        d = 2 - 2 * negatives @ anchor
        below = d[d < d_pos]
        h1 = below.max().clamp(min=0) if len(below) else d.new_zeros(())
        return F.softplus(alpha * (d_pos - torch.maximum(h1, d.min())))

    return row


def all_row(alpha):
    def row(anchor, positive, negatives):
        return F.softplus(alpha * (negatives @ anchor - anchor @ positive)).mean()

    return row


def pairs(b, d, dtype=torch.float64, normalise=True):
    q = torch.randn(b, d, dtype=dtype)
    r = q + 0.7 * torch.randn(b, d, dtype=dtype)  # correlated pairs, as after some training
    if normalise:
        q, r = F.normalize(q, dim=1), F.normalize(r, dim=1)
    return q.requires_grad_(), r.requires_grad_()


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


# ---------------------------------------------------------------------------------------------
# values and gradients equal the published formulas
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b,d", [(2, 3), (8, 16), (33, 64)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_info_nce_equals_sample4geo(b, d, smoothing):
    q, r = pairs(b, d, normalise=False)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
    ours = info_nce_loss(q, r, scale, label_smoothing=smoothing)
    theirs = sample4geo_info_nce(q, r, scale, nn.CrossEntropyLoss(label_smoothing=smoothing))
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for g1, g2 in zip(grads(ours, q, r, scale), grads(theirs, q, r, scale)):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("b,d", [(2, 3), (8, 16), (33, 64)])
@pytest.mark.parametrize("alpha", [1.0, 10.0])
def test_all_negatives_equal_lrfr_soft_triplet(b, d, alpha):
    q, r = pairs(b, d, normalise=False)
    ours = soft_margin_triplet_loss(q, r, alpha=alpha, negatives="all")
    theirs = published_soft_triplet(q, r, alpha)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for g1, g2 in zip(grads(ours, q, r), grads(theirs, q, r)):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("b,d", [(2, 3), (8, 16), (33, 64)])
@pytest.mark.parametrize("alpha", [1.0, 10.0])
def test_semi_hard_equals_lrfr_semi_soft_tri_hard(b, d, alpha):
    # on normalised inputs (the published loss assumes them); ours normalises again, which
    # changes nothing in value and, through a normalising layer, nothing in the gradient
    raw_q, raw_r = pairs(b, d, normalise=False)
    q, r = F.normalize(raw_q, dim=1), F.normalize(raw_r, dim=1)
    ours = soft_margin_triplet_loss(q, r, alpha=alpha, negatives="semi-hard")
    theirs = published_semi_soft_tri_hard(q, r, alpha)  # (grd, sat): any order, it is symmetric
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for g1, g2 in zip(grads(ours, raw_q, raw_r), grads(theirs, raw_q, raw_r)):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


def test_semi_hard_covers_both_negative_branches():
    # h1 > h2 (a negative closer than the positive exists) and h1 = 0 (none does) both occur
    torch.manual_seed(3)
    q, r = pairs(16, 4)
    dist = 2 - 2 * r @ q.T
    below = (dist < dist.diag()[:, None]) & ~torch.eye(16, dtype=torch.bool)
    assert below.any(1).any() and (~below.any(1)).any()
    ours = soft_margin_triplet_loss(q, r, negatives="semi-hard")
    torch.testing.assert_close(ours, published_semi_soft_tri_hard(q, r), rtol=1e-12, atol=1e-12)


def test_semi_hard_gradcheck():
    q, r = pairs(6, 5)
    torch.autograd.gradcheck(
        lambda a, b: soft_margin_triplet_loss(a, b, alpha=3.0, negatives="semi-hard"), (q, r)
    )
    torch.autograd.gradcheck(lambda a, b: info_nce_loss(a, b, 5.0, labels=None), (q, r))


def test_float32_close_to_float64():
    q, r = pairs(16, 32)
    for fn in (
        lambda a, b: info_nce_loss(a, b, 14.0),
        lambda a, b: soft_margin_triplet_loss(a, b, negatives="semi-hard"),
        lambda a, b: soft_margin_triplet_loss(a, b, negatives="all"),
    ):
        torch.testing.assert_close(fn(q.float(), r.float()), fn(q, r).float(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# labels: same-location pairs are never negatives
# ---------------------------------------------------------------------------------------------

LABELS = torch.tensor([0, 1, 0, 2, 3, 1, 4, 0, 5, 6])


def test_unique_labels_change_nothing():
    q, r = pairs(10, 8)
    labels = torch.arange(10) * 7
    for fn in (
        lambda **kw: info_nce_loss(q, r, 10.0, **kw),
        lambda **kw: soft_margin_triplet_loss(q, r, negatives="semi-hard", **kw),
        lambda **kw: soft_margin_triplet_loss(q, r, negatives="all", **kw),
    ):
        torch.testing.assert_close(fn(labels=labels), fn(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "name,fn,row",
    [
        (
            "info_nce",
            lambda q, r, lab: info_nce_loss(q, r, 10.0, labels=lab),
            info_nce_row(10, 0.1),
        ),
        (
            "semi-hard",
            lambda q, r, lab: soft_margin_triplet_loss(q, r, negatives="semi-hard", labels=lab),
            semi_hard_row(10.0),
        ),
        (
            "all",
            lambda q, r, lab: soft_margin_triplet_loss(q, r, negatives="all", labels=lab),
            all_row(10.0),
        ),
    ],
)
def test_same_label_pairs_are_not_negatives(name, fn, row):
    q, r = pairs(10, 8)
    ours = fn(q, r, LABELS)
    oracle = per_row_oracle(q, r, LABELS.tolist(), row)
    torch.testing.assert_close(ours, oracle, rtol=1e-10, atol=1e-12)
    for g1, g2 in zip(grads(ours, q, r), grads(oracle, q, r)):
        torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)
    # and the oracle is right without labels too
    torch.testing.assert_close(fn(q, r, None), per_row_oracle(q, r, list(range(10)), row))


# ---------------------------------------------------------------------------------------------
# modules, logit scale, stability
# ---------------------------------------------------------------------------------------------


def test_modules_call_the_functions_and_rebuild_from_config():
    q, r = pairs(8, 16)
    info = InfoNCELoss(temperature=0.05, label_smoothing=0.2).double()
    torch.testing.assert_close(info(q, r), info_nce_loss(q, r, 20.0, label_smoothing=0.2))
    for negatives in ("semi-hard", "all"):
        tri = SoftMarginTripletLoss(alpha=5.0, negatives=negatives)
        expected = soft_margin_triplet_loss(q, r, alpha=5.0, negatives=negatives)
        torch.testing.assert_close(tri(q, r, labels=None), expected)
        assert type(tri)(**tri.get_config()).get_config() == tri.get_config()
    rebuilt = InfoNCELoss(**info.get_config())
    assert rebuilt.get_config() == info.get_config()
    assert info.get_config() == {
        "temperature": 0.05, "learnable": True, "label_smoothing": 0.2, "gather": False
    }  # fmt: skip
    assert "negatives='all'" in repr(SoftMarginTripletLoss(negatives="all"))


def test_logit_scale_is_stored_as_log_learnable_and_clamped_at_100():
    loss_fn = InfoNCELoss(temperature=0.07)
    assert isinstance(loss_fn.log_logit_scale, nn.Parameter)
    torch.testing.assert_close(loss_fn.log_logit_scale, torch.tensor(math.log(1 / 0.07)))
    q, r = pairs(4, 8, dtype=torch.float32)
    loss_fn(q, r).backward()
    assert loss_fn.log_logit_scale.grad is not None and loss_fn.log_logit_scale.grad != 0
    with torch.no_grad():
        loss_fn.log_logit_scale.fill_(math.log(250.0))
    loss_fn.log_logit_scale.grad = None
    assert loss_fn.logit_scale.item() == pytest.approx(100.0)
    loss_fn(q, r).backward()
    assert loss_fn.log_logit_scale.grad == 0  # above the bound: no gradient

    fixed = InfoNCELoss(temperature=0.1, learnable=False)
    assert not list(fixed.parameters())
    assert "log_logit_scale" in fixed.state_dict()
    assert fixed.logit_scale.item() == pytest.approx(10.0)


def test_softplus_is_stable_for_large_margins():
    q, r = pairs(6, 4)
    r_bad = -r.detach().clone().requires_grad_()  # every positive is the farthest item
    for negatives in ("semi-hard", "all"):
        loss = soft_margin_triplet_loss(q, r_bad, alpha=1e4, negatives=negatives)
        assert torch.isfinite(loss) and loss > 1e3
        g = grads(loss, q, r_bad)
        assert all(torch.isfinite(t).all() for t in g)
    # where the published log(1 + exp(.)) overflows, in float32
    qf, rf = q.detach().float(), r_bad.detach().float()
    assert torch.isinf(published_soft_triplet(qf, rf, alpha=1e3))
    assert torch.isfinite(soft_margin_triplet_loss(qf, rf, alpha=1e3, negatives="all"))


def test_gather_without_process_group_is_single_process():
    q, r = pairs(6, 4)
    for fn in (
        lambda **kw: info_nce_loss(q, r, 10.0, **kw),
        lambda **kw: soft_margin_triplet_loss(q, r, negatives="semi-hard", **kw),
    ):
        torch.testing.assert_close(fn(gather=True), fn(gather=False), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

LOSSES = [
    lambda q, r, **kw: info_nce_loss(q, r, 10.0, **kw),
    lambda q, r, **kw: soft_margin_triplet_loss(q, r, **kw),
    lambda q, r, **kw: InfoNCELoss()(q, r, **kw),
    lambda q, r, **kw: SoftMarginTripletLoss(negatives="all")(q, r, **kw),
]


@pytest.mark.parametrize("fn", LOSSES)
@pytest.mark.parametrize(
    "q,r,kw,match",
    [
        (torch.randn(4, 8), torch.randn(5, 8), {}, "same shape"),
        (torch.randn(4, 8), torch.randn(4, 6), {}, "same shape"),
        (torch.randn(4, 8, 1), torch.randn(4, 8, 1), {}, r"shape \(B, D\)"),
        (torch.randn(1, 8), torch.randn(1, 8), {}, "no negatives"),
        (torch.full((4, 8), float("nan")), torch.randn(4, 8), {}, "NaN or inf"),
        (torch.randn(4, 8), torch.full((4, 8), float("inf")), {}, "NaN or inf"),
        (torch.ones(4, 8, dtype=torch.long), torch.ones(4, 8, dtype=torch.long), {}, "floating"),
        (torch.randn(4, 8), torch.randn(4, 8), {"labels": torch.zeros(4).long()}, "least two"),
        (torch.randn(4, 8), torch.randn(4, 8), {"labels": torch.arange(3)}, "labels must have"),
        (torch.randn(4, 8), torch.randn(4, 8), {"labels": torch.rand(4)}, "integer tensor"),
    ],
)  # fmt: skip
def test_bad_input_raises_a_clear_error(fn, q, r, kw, match):
    with pytest.raises(ValueError, match=match):
        fn(q, r, **kw)


def test_bad_arguments():
    with pytest.raises(ValueError, match="negatives must be one of"):
        SoftMarginTripletLoss(negatives="hard")
    with pytest.raises(ValueError, match="negatives must be one of"):
        soft_margin_triplet_loss(torch.randn(2, 3), torch.randn(2, 3), negatives="hard")
    with pytest.raises(ValueError, match="alpha"):
        SoftMarginTripletLoss(alpha=0)
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0.0)
    with pytest.raises(ValueError, match="clamped at 100"):
        InfoNCELoss(temperature=0.001)
    with pytest.raises(ValueError, match="label_smoothing"):
        InfoNCELoss(label_smoothing=1.0)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        info_nce_loss([[1.0, 2.0]], torch.randn(1, 2), 1.0)


# ---------------------------------------------------------------------------------------------
# across processes: 2 gloo processes == one process on the concatenated batch
# ---------------------------------------------------------------------------------------------

WORLD, LOCAL_B, D_IN, D_OUT = 2, 5, 6, 4


def make_case(name):
    """Global batch, labels and a fresh (model, loss) pair, identical in every process."""
    g = torch.Generator().manual_seed(1234)
    xq = torch.randn(WORLD * LOCAL_B, D_IN, generator=g, dtype=torch.float64)
    xr = xq + 0.5 * torch.randn(WORLD * LOCAL_B, D_IN, generator=g, dtype=torch.float64)
    # same-location pairs on different processes
    labels = torch.tensor([0, 1, 2, 3, 4, 2, 5, 0, 6, 7])
    torch.manual_seed(99)
    model = nn.Linear(D_IN, D_OUT).double()
    loss_fn = {
        "info_nce": lambda: InfoNCELoss(label_smoothing=0.1, gather=True),
        "semi-hard": lambda: SoftMarginTripletLoss(alpha=10.0, negatives="semi-hard", gather=True),
        "all": lambda: SoftMarginTripletLoss(alpha=10.0, negatives="all", gather=True),
    }[name]().double()
    return xq, xr, labels, model, loss_fn


def _gather_worker(rank, port, names):
    import torch.distributed as dist

    with gloo_group(rank, WORLD, port), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _gather_checks(rank, names, dist)
    # torch.distributed.nn.functional.all_gather warns on every call and rank (torch 2.14)
    deprecated = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not deprecated, deprecated


def _gather_checks(rank, names, dist):
    for name in names:
        for use_labels in (False, True):
            xq, xr, labels, model, loss_fn = make_case(name)
            sl = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
            q_in = xq[sl].clone().requires_grad_()
            r_in = xr[sl].clone().requires_grad_()
            kw = {"labels": labels[sl]} if use_labels else {}
            loss = loss_fn(model(q_in), model(r_in), **kw)
            loss.backward()
            # DistributedDataParallel's averaging of the parameters' gradients
            params = list(model.parameters()) + list(loss_fn.parameters())
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= WORLD
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            mean_loss /= WORLD

            # the single-process loss on the concatenated batch
            xq1, xr1, labels1, model1, loss1 = make_case(name)
            loss1.gather = False
            q1, r1 = xq1.clone().requires_grad_(), xr1.clone().requires_grad_()
            kw1 = {"labels": labels1} if use_labels else {}
            single = loss1(model1(q1), model1(r1), **kw1)
            single.backward()
            params1 = list(model1.parameters()) + list(loss1.parameters())

            tag = f"{name}, labels={use_labels}, rank {rank}"
            torch.testing.assert_close(mean_loss, single.detach(), msg=tag)
            assert len(params) == len(params1)
            for p, p1 in zip(params, params1):
                torch.testing.assert_close(p.grad, p1.grad, msg=tag)
            # the inputs' gradients hold every process's contribution: 1/W of the
            # single-process gradient of the global mean, as DDP sums then averages
            torch.testing.assert_close(q_in.grad / WORLD, q1.grad[sl], msg=tag)
            torch.testing.assert_close(r_in.grad / WORLD, r1.grad[sl], msg=tag)
            # each process sees negatives from the other: the local loss differs from the
            # loss of the local batch alone
            local_alone = make_case(name)[4]
            local_alone.gather = False
            alone = local_alone(model(xq[sl]), model(xr[sl]), **kw)
            assert not torch.allclose(alone, loss), tag


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_gather_across_two_processes_equals_one_process_on_the_whole_batch():
    torch.multiprocessing.spawn(
        _gather_worker, args=(free_port(), ("info_nce", "semi-hard", "all")), nprocs=WORLD
    )
