import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gsra_salad import SALAD, dustbin_sinkhorn
from tests._helpers import (
    DEVICES,
    assert_gradients,
    free_port,
    gloo_group,
    published_matching_probs,
)


class _PublishedSALAD(nn.Module):
    """The published SALAD's parameter layout and its .repeat() forward, for comparison."""

    def __init__(self, num_channels, num_clusters, cluster_dim, token_dim, dropout=0.3):
        super().__init__()
        self.num_clusters, self.cluster_dim, self.token_dim = num_clusters, cluster_dim, token_dim
        drop = nn.Dropout(dropout)
        if token_dim:
            self.token_features = nn.Sequential(
                nn.Linear(num_channels, 512), nn.ReLU(), nn.Linear(512, token_dim)
            )
        self.cluster_features = nn.Sequential(
            nn.Conv2d(num_channels, 512, 1), drop, nn.ReLU(), nn.Conv2d(512, cluster_dim, 1)
        )
        self.score = nn.Sequential(
            nn.Conv2d(num_channels, 512, 1), drop, nn.ReLU(), nn.Conv2d(512, num_clusters, 1)
        )
        self.dust_bin = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        x, t = x if self.token_dim else (x, None)
        f = self.cluster_features(x).flatten(2)
        p = self.score(x).flatten(2)
        p = published_matching_probs(p, self.dust_bin).exp()[:, :-1, :]
        p = p.unsqueeze(1).repeat(1, self.cluster_dim, 1, 1)
        f = f.unsqueeze(2).repeat(1, 1, self.num_clusters, 1)
        out = F.normalize((f * p).sum(dim=-1), p=2, dim=1).flatten(1)
        if t is not None:
            out = torch.cat([F.normalize(self.token_features(t), p=2, dim=-1), out], dim=-1)
        return F.normalize(out, p=2, dim=-1)


def _inputs(batch, channels, h, w, token, dtype=torch.float64, device="cpu"):
    x = torch.randn(batch, channels, h, w, dtype=dtype, device=device)
    return (x, torch.randn(batch, channels, dtype=dtype, device=device)) if token else x


@pytest.mark.parametrize("token_dim", [0, 16])
@pytest.mark.parametrize("impl", ["reference", "fused", "auto"])
def test_matches_published_formulation_with_published_weights(token_dim, impl):
    published = _PublishedSALAD(32, 8, 4, token_dim).double().eval()
    with torch.no_grad():
        published.dust_bin.fill_(0.37)
    salad = SALAD(32, 8, 4, token_dim=token_dim, impl=impl).double().eval()
    salad.load_state_dict(published.state_dict(), strict=True)
    x = _inputs(3, 32, 4, 5, token_dim > 0)
    torch.testing.assert_close(salad(x), published(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("token_dim", [0, 16])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_matches_reference_values_and_gradients(device, token_dim, batch):
    torch.manual_seed(0)
    ref = SALAD(32, 8, 4, token_dim=token_dim, dropout=0.0, impl="reference").double().to(device)
    fused = SALAD(32, 8, 4, token_dim=token_dim, dropout=0.0, impl="fused").double().to(device)
    fused.load_state_dict(ref.state_dict())
    x = _inputs(batch, 32, 3, 6, token_dim > 0, device=device)
    w = torch.randn(batch, ref.output_dim, dtype=torch.float64, device=device)
    grads = []
    for module in (ref, fused):
        out = module(x)
        loss = (out * w).sum()
        grads.append((out, torch.autograd.grad(loss, list(module.parameters()))))
    (o1, g1), (o2, g2) = grads
    torch.testing.assert_close(o2, o1)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("token_dim", [0, 16])
def test_output_shape_norm_and_every_parameter_gets_a_gradient(token_dim):
    salad = SALAD(32, 8, 4, token_dim=token_dim)
    out = salad(_inputs(2, 32, 4, 4, token_dim > 0, dtype=torch.float32))
    assert out.shape == (2, 8 * 4 + token_dim) == (2, salad.output_dim)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    (out * torch.randn_like(out)).sum().backward()
    assert salad.dust_bin.grad.item() == 0.0  # documented: the output does not depend on it
    # the last score bias adds a constant per cluster row: zero up to rounding (documented)
    assert_gradients(salad.named_parameters(), ("dust_bin", "score.3.bias"))


def test_state_dict_names_follow_the_published_module():
    with_token = SALAD(1536, 64, 128, 256)
    assert sorted(with_token.state_dict()) == sorted(
        [
            "token_features.0.weight", "token_features.0.bias",
            "token_features.2.weight", "token_features.2.bias",
            "cluster_features.0.weight", "cluster_features.0.bias",
            "cluster_features.3.weight", "cluster_features.3.bias",
            "score.0.weight", "score.0.bias", "score.3.weight", "score.3.bias",
            "dust_bin",
        ]
    )  # fmt: skip
    assert with_token.state_dict()["score.3.weight"].shape == (64, 512, 1, 1)
    assert with_token.state_dict()["token_features.2.weight"].shape == (256, 512)
    lrfr = SALAD(384, 128, 64, token_dim=0)
    assert not any(k.startswith("token_features") for k in lrfr.state_dict())
    assert lrfr.output_dim == 128 * 64


def test_aggregation_is_the_assignment_weighted_sum():
    """Hand check of one cluster descriptor against the assignment from the operator."""
    salad = SALAD(8, 2, 3, token_dim=0, dropout=0.0).double()
    x = torch.randn(1, 8, 2, 2, dtype=torch.float64)
    f = salad.cluster_features(x).flatten(2)[0]  # (l, n)
    p = dustbin_sinkhorn(salad.score(x).flatten(2), 1.0, 3)[0, :-1].exp()  # (m, n)
    clusters = torch.stack([(f * p[k]).sum(1) for k in range(2)], dim=1)  # (l, m)
    want = F.normalize(F.normalize(clusters, dim=0).flatten(), dim=0)
    torch.testing.assert_close(salad(x)[0], want)


def test_autocast():
    salad = SALAD(32, 8, 4, token_dim=0).eval()
    x = torch.randn(2, 32, 4, 4)
    want = salad(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = salad(x)
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.02)


@pytest.mark.parametrize(("mode", "backend"), [("eval", "inductor"), ("train", "aot_eager")])
def test_compile_fullgraph_matches_eager(mode, backend):
    """fullgraph=True: no graph break anywhere (it raises at the first). Train compiles forward
    and backward; it uses the aot_eager backend (dynamo + AOTAutograd, the parts a graph break
    or an untraceable autograd.Function would fail) to keep the test fast on small machines."""
    torch._dynamo.reset()
    salad = SALAD(16, 4, 2, token_dim=8, dropout=0.0)
    getattr(salad, mode)()
    x = (torch.randn(2, 16, 3, 3), torch.randn(2, 16))
    w = torch.randn(2, salad.output_dim)
    compiled = torch.compile(salad, fullgraph=True, backend=backend)
    got = compiled(x)
    want = salad(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if mode == "train":
        params = list(salad.parameters())
        g_got = torch.autograd.grad((got * w).sum(), params)
        g_want = torch.autograd.grad((want * w).sum(), params)
        for name, a, b in zip(dict(salad.named_parameters()), g_got, g_want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("impl", ["reference", "fused", "auto"])
def test_torch_func_grad_and_vmap(impl):
    salad = SALAD(16, 4, 2, token_dim=0, dropout=0.0, impl=impl).double()
    params = dict(salad.named_parameters())
    x = torch.randn(3, 16, 3, 3, dtype=torch.float64)
    w = torch.randn(3, salad.output_dim, dtype=torch.float64)

    def loss(p):
        return (torch.func.functional_call(salad, p, (x,)) * w).sum()

    grads = torch.func.grad(loss)(params)
    want = torch.autograd.grad(loss(params), list(params.values()))
    for (name, g), g_want in zip(grads.items(), want):
        torch.testing.assert_close(g, g_want, msg=name)
    assert grads["dust_bin"].item() == 0.0
    per_sample = torch.func.vmap(lambda xi: salad(xi[None])[0])(x)
    torch.testing.assert_close(per_sample, salad(x))


def test_impl_is_validated_on_assignment(monkeypatch):
    import gsra_salad.layers.salad as salad_module

    salad = SALAD(16, 4, 2, token_dim=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        salad.impl = "referense"
    assert salad.impl == "auto"
    seen = []

    def spy(*args, impl, **kwargs):
        seen.append(impl)
        return dustbin_sinkhorn(*args, impl=impl, **kwargs)

    monkeypatch.setattr(salad_module, "dustbin_sinkhorn", spy)
    salad.impl = "reference"
    salad(torch.randn(1, 16, 3, 3))
    assert seen == ["reference"]
    assert "impl='reference'" in repr(salad)


def test_numpy_arguments_and_constructor_arguments_kept_as_attributes():
    np = pytest.importorskip("numpy")
    args = dict(
        num_channels=np.int64(16),
        num_clusters=np.int32(4),
        cluster_dim=np.int64(2),
        token_dim=np.int64(0),
        dropout=np.float32(0.25),
        sinkhorn_iters=np.int64(3),
        impl="fused",
    )
    salad = SALAD(**args)
    assert salad(torch.randn(2, 16, 3, 3)).shape == (2, 8)
    for name, value in args.items():
        kept = getattr(salad, name)
        assert kept == value and type(kept) is type(value if name == "impl" else value.item())
    rebuilt = SALAD(**{name: getattr(salad, name) for name in args})
    assert repr(rebuilt) == repr(salad)
    with pytest.raises(TypeError, match="num_clusters must be an int, got float"):
        SALAD(16, 4.0, 2)
    with pytest.raises(TypeError, match="dropout must be a float"):
        SALAD(16, 4, 2, dropout="0.1")
    with pytest.raises(ValueError, match="token_dim must be >= 0"):
        SALAD(16, 4, 2, token_dim=-1)


@pytest.mark.parametrize("impl", ["reference", "fused", "auto"])
@pytest.mark.parametrize("where", ["token", "features"])
@pytest.mark.parametrize(("bad", "kind"), [(math.nan, "NaN"), (math.inf, "inf")])
def test_non_finite_input_is_rejected(impl, where, bad, kind):
    salad = SALAD(16, 4, 2, token_dim=8, impl=impl).eval()
    features, token = torch.randn(2, 16, 3, 3), torch.randn(2, 16)
    if where == "token":
        token[1, 5] = bad
        index = r"\(1, 5\)"
    else:
        features[1, 2, 0, 1] = bad
        index = r"\(1, 2, 0, 1\)"
    with pytest.raises(
        ValueError, match=rf"SALAD: {where} contains {kind} \(first at index {index}"
    ):
        salad((features, token))
    with torch.no_grad():
        salad.dust_bin.fill_(math.nan)
    with pytest.raises(ValueError, match=r"dustbin must be finite.*dust_bin"):
        salad((torch.randn(2, 16, 3, 3), torch.randn(2, 16)))


def test_einops_is_used_for_the_flattening():
    """einops is a required dependency: the layer's reshapes use it."""
    import einops

    import gsra_salad.layers.salad as salad_module

    assert salad_module.rearrange is einops.rearrange


def test_bad_input_raises_clear_errors():
    salad = SALAD(32, 64, 4, token_dim=0)
    with pytest.raises(
        ValueError,
        match=r"n = 6x6 = 36 local features.*m = 64 clusters.*larger input.*8x8.*128x128 pix",
    ):
        salad(torch.randn(1, 32, 6, 6))
    with pytest.raises(ValueError, match="built for num_channels=32, got features with 16"):
        salad(torch.randn(1, 16, 8, 8))
    with pytest.raises(TypeError, match="token_dim=0 takes the features"):
        salad((torch.randn(1, 32, 8, 8), torch.randn(1, 32)))
    tok = SALAD(32, 8, 4, token_dim=16)
    with pytest.raises(TypeError, match=r"needs the pair \(features"):
        tok(torch.randn(1, 32, 4, 4))
    with pytest.raises(ValueError, match=r"token must have shape \(B, C\)"):
        tok((torch.randn(2, 32, 4, 4), torch.randn(1, 32)))
    with pytest.raises(ValueError, match="num_clusters must be >= 1"):
        SALAD(32, 0, 4)
    with pytest.raises(ValueError, match="impl must be one of"):
        SALAD(32, 8, 4, impl="fast")


_DDP_WORLD, _DDP_STEPS = 2, 3


def _ddp_batches():
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(_DDP_STEPS, _DDP_WORLD, 2, 16, 3, 3, generator=g)
    ws = torch.randn(_DDP_STEPS, _DDP_WORLD, 2, 8, generator=g)
    return xs, ws


def _train_steps(model, params, rank_batches, scale=1.0):
    """SGD steps on ``rank_batches(step) -> (x, w)``; returns per-step grads and final weights."""
    opt = torch.optim.SGD(params, lr=0.5)
    grads = []
    for step in range(_DDP_STEPS):
        x, w = rank_batches(step)
        opt.zero_grad()
        ((model(x) * w).sum() * scale).backward()
        grads.append([p.grad.clone() for p in params])
        opt.step()
    return grads, [p.detach().clone() for p in params]


def _ddp_worker(rank, port, state, out_dir):

    with gloo_group(rank, _DDP_WORLD, port):
        salad = SALAD(16, 4, 2, token_dim=0, dropout=0.0)
        salad.load_state_dict(state)
        model = torch.nn.parallel.DistributedDataParallel(salad)  # find_unused_parameters=False
        xs, ws = _ddp_batches()
        result = _train_steps(model, list(salad.parameters()), lambda t: (xs[t, rank], ws[t, rank]))
        torch.save(result, f"{out_dir}/rank{rank}.pt")


def test_ddp_two_ranks_match_one_process_on_the_whole_batch(tmp_path):
    """Two spawned gloo ranks: DistributedDataParallel (without find_unused_parameters) errors
    on the second step if a parameter got no gradient in the first, so dust_bin's exact zero
    gradient must count as used. The ranks' gradients and weights must agree with each other
    and with one process training on the concatenated batch (DDP averages over ranks)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    salad = SALAD(16, 4, 2, token_dim=0, dropout=0.0)
    state = {k: v.clone() for k, v in salad.state_dict().items()}
    mp.spawn(_ddp_worker, args=(free_port(), state, str(tmp_path)), nprocs=_DDP_WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(_DDP_WORLD)]
    xs, ws = _ddp_batches()
    single = _train_steps(
        salad, list(salad.parameters()), lambda t: (xs[t].flatten(0, 1), ws[t].flatten(0, 1)),
        scale=1.0 / _DDP_WORLD,
    )  # fmt: skip
    names = [name for name, _ in salad.named_parameters()]
    (grads, weights), (grads_1, weights_1) = ranks
    for step in range(_DDP_STEPS):  # the ranks agree exactly
        for a, b in zip([*grads[step], *weights], [*grads_1[step], *weights_1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    grads_1, weights_1 = single
    for step in range(_DDP_STEPS):
        for name, a, b in zip(names, grads[step], grads_1[step]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")
            if name == "dust_bin":
                assert a.item() == 0.0
    for name, a, b in zip(names, weights, weights_1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
