"""Localisation: the estimates on a synthetic region, and search over large galleries.

    python -m benchmarks.bench_localize                  # all four parts (hours, ~17 GB scratch)
    python -m benchmarks.bench_localize --quick          # smoke run (seconds)
    python -m benchmarks.bench_localize --parts trained  # a trained model's 20,164 tiles
    python -m benchmarks.bench_localize --large 200000   # the large gallery at another size

Four parts, one table each (and one JSON file):

1. ``estimates``: a synthetic region (``write_region``: one map, overlapping tiles, panoramas at
   random points), indexed and localised with a hand-made geometric matcher standing in for a
   trained model (the panorama is unwarped back to an aerial view, both views become
   low-pass, zero-mean, unit-norm grey images; see ``GeometricMatcher``). Reported: the median
   error in metres and the share within 1 and 2 tile spacings of the ``top1`` and the
   ``weighted`` estimates, beside a random tile.
2. ``trained``: a synthetic region of ``--trained-tiles`` (20,000, rounded up to a square
   grid: 20,164) tiles 16 m apart, the demo recipe trained on the region's own training split
   (or ``--checkpoint``), every tile indexed and ``--queries`` panoramas searched: build time,
   bytes, queries/s, top-1 agreement with the exact search and the top-1 tile's error in metres.
3. ``backends``: ``--tiles`` (20,000) tiles of clustered 8,192-D descriptors (see
   ``Clustered``): build time, bytes, queries/s and top-1 agreement with the exact
   search of ``faiss-exact`` and of ``faiss-ivf`` at several encodings and nprobe.
4. ``large``: ``--large`` (1,000,000) such tiles, generated chunk by chunk into a
   memory-mapped ``descriptors.npy`` (float16, never all in memory as float32) and loaded with
   ``GalleryIndex.load``: build time, the approximate index's bytes on disk and in RAM, peak
   RSS, queries/s and top-1 agreement with the exact streamed search on a sample of queries.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks._common import parser, peak_rss, print_table, write_json
from gsra_salad.localization import GalleryIndex, localize

LATENT = 64  # intrinsic dimension of the clustered descriptors
CLUSTERS = 1024


# ---------------------------------------------------------------------------------------------
# 1. the estimates on a synthetic region
# ---------------------------------------------------------------------------------------------


class GeometricMatcher(torch.nn.Module):
    """A hand-made cross-view matcher: no training, honest geometry.

    ``embed(images, "reference")``: an aerial tile (B, 3, S, S) in [0, 1];
    ``embed(images, "query")``: a north-aligned panorama (B, 3, H, W), unwarped to an aerial
    view of S x S with the inverse of ``polar_transform``. Both become grey, 16 x 16 averages,
    masked to the disc a panorama sees, zero-mean and unit-norm.
    """

    def __init__(self, size: int = 64, cells: int = 16) -> None:
        super().__init__()
        self.size, self.cells = size, cells
        yy, xx = torch.meshgrid(torch.arange(cells), torch.arange(cells), indexing="ij")
        r = ((xx + 0.5 - cells / 2) ** 2 + (yy + 0.5 - cells / 2) ** 2).sqrt() / (cells / 2)
        self.register_buffer("mask", (r <= 1).float().flatten(), persistent=False)

    def unwarp(self, pano: torch.Tensor) -> torch.Tensor:
        s = self.size
        c = (torch.arange(s, dtype=torch.float32) + 0.5) / (s / 2) - 1  # -1..1, centre 0
        dy, dx = torch.meshgrid(c, c, indexing="ij")
        r = (dx**2 + dy**2).sqrt()
        theta = torch.atan2(dx, -dy) % (2 * math.pi)  # clockwise from north (image up)
        gx = theta / math.pi - 1  # column (j + 0.5) / W = theta / 2 pi
        gy = 1 - 2 * r  # top row far (r = 1), bottom row at the centre
        grid = torch.stack([gx, gy], -1).expand(pano.shape[0], s, s, 2)
        return F.grid_sample(
            pano, grid, mode="bilinear", padding_mode="border", align_corners=False
        )

    def embed(self, images: torch.Tensor, view: str = "query") -> torch.Tensor:
        aerial = self.unwarp(images) if view == "query" else images
        grey = aerial.mean(1, keepdim=True)
        x = F.adaptive_avg_pool2d(grey, self.cells).flatten(1)
        x = x - (x * self.mask).sum(1, keepdim=True) / self.mask.sum()
        return F.normalize(x * self.mask, dim=1)

    forward = embed


def estimates(args) -> list[dict]:
    """top1 vs weighted on two regions: tiles 8 px and 16 px apart (64 px tiles, 1 m/px)."""
    rows = []
    for stride, grid in ((8, 24), (16, 16)):
        if args.quick:
            grid = 6
        rows += _region_estimates(stride, (grid, grid), 20 if args.quick else 200)
    return rows


def _region_estimates(stride: int, grid: tuple[int, int], queries: int) -> list[dict]:
    from gsra_salad.data.synthetic import write_region

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_region(Path(tmp) / "region", grid=grid, num_queries=queries, tile_size=64,
                            stride=stride, pano_size=(32, 128), seed=1)  # fmt: skip
        tiles = _read_csv(root / "tiles.csv")
        photos = _read_csv(root / "queries.csv")
        model = GeometricMatcher(64)

        def scale(x):
            return x.float() / 255

        index = GalleryIndex.build(model, [root / p for p, _ in tiles], [p for _, p in tiles],
                                   metric="euclidean", paths=[p for p, _ in tiles],
                                   transform=scale, progress=False)  # fmt: skip
        truth = np.array([p for _, p in photos])
        spacing = index.tile_spacing_m()
        variants = (
            ("top1", {}),
            ("weighted", {}),
            ("weighted softmax T=0.1", {"temperature": 0.1}),
        )
        for name, kw in variants:
            res = localize(model, index, [root / p for p, _ in photos], k=5,
                           estimate=name.split()[0], transform=scale, **kw)  # fmt: skip
            errors = np.linalg.norm(np.array([r.position for r in res]) - truth, axis=1)
            rows.append(_error_row(name, errors, spacing))
        rng = np.random.default_rng(0)
        random = index.positions[rng.integers(0, len(index), len(truth))]
        rows.append(_error_row("random tile", np.linalg.norm(random - truth, axis=1), spacing))
        for row in rows:
            row.update(tiles=len(index), queries=len(truth), spacing_m=spacing)
    return rows


def _error_row(name: str, errors: np.ndarray, spacing: float) -> dict:
    return {
        "estimate": name,
        "median_error_m": float(np.median(errors)),
        "mean_error_m": float(np.mean(errors)),
        "within_1_spacing": 100.0 * float((errors <= spacing).mean()),
        "within_2_spacings": 100.0 * float((errors <= 2 * spacing).mean()),
    }


def _read_csv(path: Path) -> list[tuple[str, tuple[float, float]]]:
    lines = path.read_text().splitlines()[1:]
    out = []
    for line in lines:
        p, x, y = line.split(",")
        out.append((p, (float(x), float(y))))
    return out


# ---------------------------------------------------------------------------------------------
# clustered descriptors, generated chunk by chunk
# ---------------------------------------------------------------------------------------------


class Clustered:
    """Descriptors of low intrinsic dimension with cluster structure, like a trained model's.

    A tile's latent code is one of ``CLUSTERS`` centres (N(0, 4 I) in ``LATENT`` dimensions)
    plus N(0, I); the descriptor is the code through a fixed random orthonormal (LATENT, D)
    basis plus isotropic noise of the same total power, L2-normalised. A tile's noise is the
    sum of two rows of a fixed Gaussian bank (4,096 x D) with random signs, over sqrt(2): cheap
    (no D-dimensional sampling per tile). A query is a tile's code plus N(0, 0.25 I) through
    the same basis, with fresh Gaussian noise (bank noise would correlate a query with every
    tile sharing one of its bank rows). Chunk ``i`` is a function of (seed, i) alone: the
    gallery is regenerated in any order.
    """

    BANK = 4096

    def __init__(self, dim: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.dim, self.seed = dim, seed
        self.basis = torch.linalg.qr(torch.randn(dim, LATENT, generator=g)).Q.T.contiguous()
        self.centres = 2 * torch.randn(CLUSTERS, LATENT, generator=g)
        self.noise = math.sqrt(5 * LATENT / dim)  # isotropic noise power = the code's power
        self.bank = torch.randn(self.BANK, dim, generator=g) * (self.noise / math.sqrt(2))

    def codes(self, start: int, count: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
        members = torch.randint(0, CLUSTERS, (count,), generator=g)
        return self.centres[members] + torch.randn(count, LATENT, generator=g)

    def descriptors(self, codes: torch.Tensor, salt: int, fresh: bool = False) -> torch.Tensor:
        g = torch.Generator().manual_seed(salt)
        x = codes @ self.basis
        if fresh:  # queries: independent Gaussian noise, uncorrelated with every tile's
            x.add_(self.noise * torch.randn(x.shape, generator=g))
        else:
            pick = torch.randint(0, self.BANK, (2, len(codes)), generator=g)
            signs = torch.randint(0, 2, (2, len(codes), 1), generator=g).float() * 2 - 1
            x.add_(self.bank[pick[0]] * signs[0]).add_(self.bank[pick[1]] * signs[1])
        return x.div_(x.norm(dim=1, keepdim=True))

    def chunk(self, start: int, count: int) -> torch.Tensor:
        return self.descriptors(self.codes(start, count), salt=2 * start + 1)

    def queries(self, tiles: np.ndarray, chunk: int, n: int) -> torch.Tensor:
        """Queries near the given tiles (indices), regenerating each tile's code."""
        codes = []
        for t in tiles.tolist():
            start = (t // chunk) * chunk
            codes.append(self.codes(start, min(chunk, n - start))[t - start])
        g = torch.Generator().manual_seed(self.seed + 7)
        noisy = torch.stack(codes) + 0.5 * torch.randn(len(codes), LATENT, generator=g)
        return self.descriptors(noisy, salt=self.seed + 11, fresh=True)


def write_gallery(directory: Path, n: int, gen: Clustered, chunk: int) -> None:
    """A gallery index directory of n clustered tiles (float16), written chunk by chunk."""
    directory.mkdir(parents=True)
    out = np.lib.format.open_memmap(directory / "descriptors.npy", mode="w+", dtype=np.float16,
                                    shape=(n, gen.dim))  # fmt: skip
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        out[start : start + count] = gen.chunk(start, count).half().numpy()
    out.flush()
    del out
    side = math.ceil(math.sqrt(n))
    ids = np.arange(n)
    np.save(directory / "positions.npy", np.stack([ids % side, ids // side], 1) * 10.0)
    (directory / "tiles.json").write_text(json.dumps([f"t{i}" for i in range(n)]))
    meta = {"format": "gsra_salad.gallery_index", "version": 1, "count": n, "dim": gen.dim,
            "dtype": "float16", "metric": "euclidean", "fingerprint": None}  # fmt: skip
    (directory / "meta.json").write_text(json.dumps(meta))


def _rate(fn, queries: torch.Tensor, batch: int) -> tuple[float, float, torch.Tensor]:
    """Queries per wall second, queries per CPU-second of this process, the top-1 ids."""
    fn(queries[:batch])  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    ids = torch.cat([fn(queries[i : i + batch]) for i in range(0, len(queries), batch)])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return len(queries) / wall, len(queries) / max(cpu, 1e-9), ids


# (encoding, pca_dim, nprobe factor relative to the default, rerank); one build a pair
SETTINGS = {
    "backends": [
        ("sq8", 256, 1.0, 0),
        ("sq8", 256, 0.25, 0),
        ("sq8", 256, 1.0, 64),
        ("pq", 256, 1.0, 0),
        ("flat", 256, 1.0, 0),
    ],
    "trained": [
        ("sq8", 256, 1.0, 0),
        ("sq8", 256, 0.25, 0),
        ("sq8", 256, 2.0, 0),
        ("sq8", 256, 4.0, 0),
        ("sq8", 256, 1.0, 64),
        ("sq8", 64, 1.0, 0),
        ("sq8", 64, 1.0, 64),
        ("pq", 256, 1.0, 0),
    ],
    "large": [
        ("sq8", 256, 0.5, 0),
        ("sq8", 256, 1.0, 0),
        ("sq8", 256, 1.0, 64),
        ("sq8", 256, 1.0, 256),
        ("sq8", 1024, 1.0, 0),
        ("sq8", 1024, 1.0, 64),
    ],
}


def backends(index: GalleryIndex, gen: Clustered, chunk: int, args, part: str) -> list[dict]:
    """Clustered galleries: queries near random tiles; also reported, how often the top-1 is
    the tile a query was drawn near."""
    rng = np.random.default_rng(1)
    num_queries = args.queries if part == "backends" else args.large_queries
    tiles = np.sort(rng.choice(len(index), size=num_queries, replace=False))
    queries = gen.queries(tiles, chunk, len(index))

    def score(ids: torch.Tensor) -> dict:
        return {"top1_is_source_tile": float((ids.numpy() == tiles).mean())}

    return compare_backends(index, queries, score, args, part)


def compare_backends(index: GalleryIndex, queries: torch.Tensor, score, args, part: str):
    """Rows of the exact search and of each approximate setting of ``part``: build time,
    bytes, queries/s and top-1 agreement with the exact search, plus ``score(top1 ids)``."""
    start = time.perf_counter()
    exact_rate, exact_cpu_rate, exact = _rate(
        lambda q: index.search(q, k=1)[1][:, 0], queries, len(queries)
    )
    exact_seconds = time.perf_counter() - start
    rows = [{"part": part, "backend": "exact (streamed)", "tiles": len(index),
             "build_s": 0.0, "index_bytes": index.nbytes()["descriptors"],
             "queries_per_s": exact_rate, "queries_per_cpu_s": exact_cpu_rate,
             "top1_agreement": 1.0, **score(exact), "exact_seconds": exact_seconds}]  # fmt: skip
    if part != "large":
        start = time.perf_counter()
        index.search(queries[:1], k=1, backend="faiss-exact")
        build = time.perf_counter() - start
        rate, cpu_rate, ids = _rate(
            lambda q: index.search(q, k=1, backend="faiss-exact")[1][:, 0], queries, 64
        )
        rows.append({"part": part, "backend": "faiss-exact", "tiles": len(index), "build_s": build,
                     "index_bytes": 4 * len(index) * index.dim, "queries_per_s": rate,
                     "queries_per_cpu_s": cpu_rate, **score(ids),
                     "top1_agreement": float((ids == exact).float().mean())})  # fmt: skip
        index._faiss.pop("flat", None)
    rows += _ivf_rows(index, queries, exact, score, args, part)
    if args.hnsw and part == "backends":
        rows.append(_hnsw_row(index, queries, exact, part))
    return rows


def _ivf_rows(index, queries, exact, score, args, part) -> list[dict]:
    rows = []
    built = None
    settings = SETTINGS[part][:2] if args.quick else SETTINGS[part]
    for encoding, pca_dim, factor, rerank in settings:
        if built != (encoding, pca_dim):
            index._faiss.clear()
            start = time.perf_counter()
            params = index.build_approximate(encoding=encoding, pca_dim=pca_dim)
            build = time.perf_counter() - start
            built = (encoding, pca_dim)
            with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
                from gsra_salad.localization._backends import write_ivf

                write_ivf(index._faiss["approximate"], str(Path(tmp) / "approximate"))
                disk = sum(f.stat().st_size for f in Path(tmp).iterdir())
        nprobe = max(1, int(params["nprobe"] * factor))
        rate, cpu_rate, ids = _rate(
            lambda q: index.search(q, k=1, backend="faiss-ivf", nprobe=nprobe,
                                   rerank=rerank)[1][:, 0],
            queries, 64,
        )  # fmt: skip
        name = f"faiss-ivf {encoding} pca{pca_dim} nlist{params['nlist']} nprobe{nprobe}"
        rows.append({
            "part": part, "backend": name + (f" rerank{rerank}" if rerank else ""),
            "tiles": len(index), "build_s": build,
            "index_bytes": index.nbytes()["approximate"], "disk_bytes": disk,
            "queries_per_s": rate, "queries_per_cpu_s": cpu_rate,
            "top1_agreement": float((ids == exact).float().mean()),
            **score(ids),
            "peak_rss_bytes": peak_rss(),
        })  # fmt: skip
    return rows


def _hnsw_row(index: GalleryIndex, queries, exact, part: str) -> dict:
    """HNSW (32 links, efSearch 64) on the same PCA projections, for the choice of backend:
    measured, not offered as a backend."""
    import faiss

    from gsra_salad.localization._backends import block_rows, iter_blocks

    ivf = index._faiss["approximate"]
    start = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(ivf.components.shape[1], 32)
    for _, block in iter_blocks(index._parts, block_rows(index.dim)):
        hnsw.add(ivf.project(block))
    build = time.perf_counter() - start
    hnsw.hnsw.efSearch = 64

    def top1(q):
        return torch.from_numpy(hnsw.search(ivf.project(q.numpy()), 1)[1][:, 0].astype(np.int64))

    rate, cpu_rate, ids = _rate(top1, queries, 64)
    links = hnsw.hnsw.neighbors.size() * 4
    return {
        "part": part, "backend": "hnsw32 flat pca256 efSearch64 (measured only)",
        "tiles": len(index), "build_s": build + 0.0,
        "index_bytes": int(4 * hnsw.ntotal * hnsw.d + links),
        "queries_per_s": rate, "queries_per_cpu_s": cpu_rate,
        "top1_agreement": float((ids == exact).float().mean()),
    }  # fmt: skip


def gallery_part(n: int, dim: int, args, part: str) -> list[dict]:
    """One gallery of n clustered tiles: written to a scratch folder (deleted after), or kept
    in ``--keep-galleries DIR`` and reused by the next run with the same size."""
    gen = Clustered(dim, seed=3)
    chunk = 2048
    if args.keep_galleries:
        tmp = Path(args.keep_galleries) / f"{part}_{n}x{dim}"
    else:
        tmp = Path(tempfile.mkdtemp(dir=args.tmp, prefix=f"bench_localize_{part}_"))
    try:
        start = time.perf_counter()
        if not (tmp / "index" / "meta.json").is_file():
            shutil.rmtree(tmp / "index", ignore_errors=True)  # a write cut short
            write_gallery(tmp / "index", n, gen, chunk)
        written = time.perf_counter() - start
        index = GalleryIndex.load(tmp / "index")
        rows = backends(index, gen, chunk, args, part)
        for row in rows:
            row["generate_and_write_s"] = written
            row["descriptors_on_disk_bytes"] = (tmp / "index" / "descriptors.npy").stat().st_size
        return rows
    finally:
        if not args.keep_galleries:
            shutil.rmtree(tmp, ignore_errors=True)


def trained_part(args) -> list[dict]:
    """A trained model's descriptors: a synthetic region of at least ``--trained-tiles`` tiles
    (16 m apart) and ``--queries`` panoramas, the demo recipe trained on the region's own
    training split for ``--train-epochs`` (VIGOR's same-area setting, as
    ``examples/train_region.py``) unless ``--checkpoint`` names a model; every tile indexed,
    every panorama searched."""
    from gsra_salad import CrossViewGeoLocalizer
    from gsra_salad.cli import train_main
    from gsra_salad.data.synthetic import write_region
    from gsra_salad.evaluation import embed
    from gsra_salad.localization._tiles import PathImages, resolve_transform, view_function

    side = math.ceil(math.sqrt(args.trained_tiles))
    keep = args.keep_galleries is not None
    base = Path(args.keep_galleries) if keep else Path(tempfile.mkdtemp(dir=args.tmp))
    root = base / f"region_{side}x{side}_q{args.queries}_t{args.train_pairs}"
    try:
        if not (root / "region.json").is_file():
            shutil.rmtree(root, ignore_errors=True)
            write_region(root, grid=(side, side), num_queries=args.queries, stride=16,
                         num_train=args.train_pairs, num_val=200, seed=0)  # fmt: skip
        run = root / f"run_{args.train_epochs}_epochs"
        checkpoint = Path(args.checkpoint) if args.checkpoint else run / "best"
        start = time.perf_counter()
        if not (checkpoint / "config.json").is_file():
            argv = ["--demo", "--data-root", str(root), "--epochs", str(args.train_epochs),
                    "--no-progress", "--output-dir", str(run), "--overwrite"]  # fmt: skip
            if train_main("cvusa", argv) != 0:
                raise SystemExit("bench_localize: training the demo recipe on the region failed")
        trained = time.perf_counter() - start
        model = CrossViewGeoLocalizer.from_pretrained(checkpoint).eval()
        tiles, photos = _read_csv(root / "tiles.csv"), _read_csv(root / "queries.csv")
        start = time.perf_counter()
        index = GalleryIndex.build(model, [root / t for t, _ in tiles], [p for _, p in tiles],
                                   metric="euclidean", paths=[t for t, _ in tiles],
                                   progress=False)  # fmt: skip
        built = time.perf_counter() - start
        transform = resolve_transform(model, "query", None, "bench_localize")
        dataset = PathImages([root / q for q, _ in photos], transform)
        with torch.no_grad():
            queries, _ = embed(view_function(model, "query"), dataset, progress=False)
        truth = np.array([p for _, p in photos])

        def score(ids: torch.Tensor) -> dict:
            errors = np.linalg.norm(index.positions[ids.numpy()] - truth, axis=1)
            return {"top1_median_error_m": float(np.median(errors)),
                    "top1_within_50m": 100.0 * float((errors <= 50).mean())}  # fmt: skip

        rows = compare_backends(index, queries, score, args, "trained")
        for row in rows:
            row.update(dim=index.dim, queries=len(queries), train_s=trained, embed_tiles_s=built)
        return rows
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tiles", type=int, default=20_000, help="tiles of the backends part")
    p.add_argument("--large", type=int, default=1_000_000, help="tiles of the large part")
    p.add_argument("--dim", type=int, default=8192)
    p.add_argument("--queries", type=int, default=500, help="queries of the backends part")
    p.add_argument("--large-queries", type=int, default=200, help="queries of the large part")
    p.add_argument("--parts", default="estimates,trained,backends,large")
    p.add_argument("--trained-tiles", type=int, default=20_000, help="tiles of the trained part")
    p.add_argument("--train-pairs", type=int, default=2000, help="training pairs (trained part)")
    p.add_argument("--train-epochs", type=int, default=12, help="epochs (trained part)")
    p.add_argument("--checkpoint", default=None, help="trained part: a model folder to index "
                   "with, instead of training the demo recipe on the region")  # fmt: skip
    p.add_argument("--hnsw", action="store_true", help="also measure HNSW (backends part)")
    p.add_argument("--tmp", default=os.environ.get("TMPDIR", "/tmp"), help="scratch directory")
    p.add_argument(
        "--keep-galleries",
        default=None,
        metavar="DIR",
        help="keep the generated galleries in DIR and reuse them on the next run",
    )
    args = p.parse_args()
    if args.quick:
        args.tiles, args.large, args.dim, args.queries = 2000, 4000, 256, 64
        args.large_queries, args.trained_tiles, args.train_pairs = 64, 64, 128
        args.train_epochs = 1
    parts = args.parts.split(",")
    results: dict[str, list[dict]] = {}

    def save() -> Path:  # after every part: a run cut short keeps what it measured
        rows = [r for v in results.values() for r in v]
        return write_json("bench_localize", args.json, "cpu", rows, parts=results, dim=args.dim)

    if "estimates" in parts:
        results["estimates"] = estimates(args)
        columns = ["estimate", "tiles", "queries", "spacing_m", "median_error_m", "mean_error_m"]
        print_table(results["estimates"], [*columns, "within_1_spacing", "within_2_spacings"])
        save()
    columns = ["backend", "tiles", "build_s", "index_bytes", "queries_per_s", "queries_per_cpu_s"]
    columns.append("top1_agreement")
    if "trained" in parts:
        results["trained"] = trained_part(args)
        print()
        print_table(results["trained"], [*columns, "top1_median_error_m", "top1_within_50m"])
        save()
    for part, n in (("backends", args.tiles), ("large", args.large)):
        if part in parts:
            results[part] = gallery_part(n, args.dim, args, part)
            print()
            print_table(results[part], columns + (["disk_bytes"] if part == "large" else []))
            save()
    print(f"\nwrote {save()}")


if __name__ == "__main__":
    main()
