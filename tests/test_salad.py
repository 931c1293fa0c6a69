import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gsra_salad import SALAD, dustbin_sinkhorn
from tests._helpers import DEVICES, published_matching_probs


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
    for name, p in salad.named_parameters():
        assert p.grad is not None, name
        if name == "dust_bin":
            assert p.grad.item() == 0.0  # documented: the output does not depend on it
        else:
            assert p.grad.abs().sum() > 0, name


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


def test_autocast_and_compile():
    salad = SALAD(32, 8, 4, token_dim=0).eval()
    x = torch.randn(2, 32, 4, 4)
    want = salad(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = salad(x)
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.02)
    compiled = torch.compile(salad)
    torch.testing.assert_close(compiled(x), want, rtol=1e-4, atol=1e-5)


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


def test_ddp_does_not_see_an_unused_dust_bin(tmp_path):
    """DistributedDataParallel (gloo, one process) errors on the second step if a parameter got
    no gradient in the first; dust_bin's exact zero gradient must count as used."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = torch.nn.parallel.DistributedDataParallel(SALAD(16, 4, 2, token_dim=0))
        for _ in range(3):
            model(torch.randn(2, 16, 3, 3)).sum().backward()
        assert model.module.dust_bin.grad.item() == 0.0
    finally:
        dist.destroy_process_group()
