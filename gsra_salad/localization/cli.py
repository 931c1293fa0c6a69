"""The ``index`` and ``locate`` commands, as functions a command line wires up.

``add_index_arguments(parser)`` / ``run_index(args)`` and ``add_locate_arguments(parser)`` /
``run_locate(args)``: each ``add_*`` fills an ``argparse`` (sub)parser, each ``run_*`` takes the
parsed namespace and returns the exit status. Their output is the command's output: ``locate``
writes one JSON line per photo to stdout; problems go to stderr as one line each.

Exit status: 0 when everything was answered; 1 when some photos could not be read (the others
are answered, the failures counted); 2 for bad input that stops the command (a bad CSV, a
missing checkpoint, an empty, corrupted or foreign index), with nothing written.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="gsra-salad locate")
    >>> add_locate_arguments(parser)
    >>> args = parser.parse_args(["--index", "idx", "a.jpg", "b.jpg", "--k", "3"])
    >>> [str(p) for p in args.photos], args.k
    (['a.jpg', 'b.jpg'], 3)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data._base import load_rgb
from ..evaluation import geodesic_distance, save_retrieval_grid
from ..models import CrossViewGeoLocalizer
from ._tiles import resolve_transform
from .index import GalleryIndex
from .localize import ESTIMATES, Localization, locate_descriptors

__all__ = ["add_index_arguments", "add_locate_arguments", "run_index", "run_locate"]

HEADERS = {("path", "lat", "lon"): "haversine", ("path", "x", "y"): "euclidean"}


class CommandError(Exception):
    """Bad input that stops a command: printed as one line, exit status 2."""


def _size(text: str) -> int | tuple[int, int]:
    parts = [int(p) for p in text.lower().replace("x", ",").split(",") if p]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise argparse.ArgumentTypeError(f"expected N or H,W, got {text!r}")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (32)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument(
        "--image-size",
        type=_size,
        default=None,
        help="resize images to N or H,W and normalise with ImageNet statistics (needs "
        "torchvision); default: the model's recorded preprocessing",
    )


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``index`` command's arguments to ``parser``.

    ``index --checkpoint DIR --tiles TILES.csv --out INDEX``: embeds the tiles listed in the
    CSV (header ``path,lat,lon`` in degrees or ``path,x,y`` in planar metres; paths relative to
    the CSV's folder) with the model saved in ``DIR`` (``save_pretrained``) and writes the
    gallery index to ``INDEX``, atomically. ``--dataset cvusa|cvact|university1652
    --data-root ROOT --split SPLIT`` takes the satellite tiles of a dataset's split instead;
    CVACT records UTM positions, CVUSA and University-1652 record none: ``--positions CSV``.

    Args:
        parser: an ``argparse.ArgumentParser`` or a subparser.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_index_arguments(p)
        >>> p.parse_args(["--checkpoint", "ck", "--tiles", "t.csv", "--out", "ix"]).dtype
        'float16'
    """
    parser.add_argument("--checkpoint", type=Path, required=True, help="a save_pretrained dir")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiles", type=Path, help="CSV: path,lat,lon or path,x,y")
    source.add_argument(
        "--dataset",
        choices=DATASETS,
        help="the satellite tiles of a dataset's split (with --data-root, --split); CVACT's "
        "positions are its UTM metres, CVUSA and University-1652 need --positions",
    )
    parser.add_argument("--data-root", type=Path, help="--dataset: the dataset's directory")
    parser.add_argument(
        "--split",
        help="--dataset: cvusa train|val, cvact train|val|test, university1652 test "
        "(default: val; test for university1652)",
    )
    parser.add_argument(
        "--positions",
        type=Path,
        help="--dataset: CSV of the tiles' positions (path,lat,lon or path,x,y; paths relative "
        "to the CSV's folder), for a dataset whose layout records none",
    )
    parser.add_argument("--out", type=Path, required=True, help="the index directory to write")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    parser.add_argument(
        "--approximate",
        action="store_true",
        help="also build and save the faiss-ivf index (for large galleries; the faiss extra)",
    )
    _common(parser)


def add_locate_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``locate`` command's arguments to ``parser``.

    ``locate --index INDEX PHOTO... [--k 5] [--grid out.png] [--map out.png]``: one JSON line
    per photo, ``{"photo", "lat"/"lon" or "x"/"y", "confidence", "top": [{"path", "score",
    "lat"/"lon" or "x"/"y"}, ...]}`` (plus ``"error_m"`` with ``--truth``). With ``--truth``,
    a summary on stderr: the median error in metres and the share within ``--within-m``
    (50 m), beside the same for a tile drawn at random from the index (``--summary FILE``
    also writes it as JSON).

    Args:
        parser: an ``argparse.ArgumentParser`` or a subparser.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_locate_arguments(p)
        >>> p.parse_args(["--index", "ix", "a.jpg"]).estimate
        'weighted'
    """
    parser.add_argument("--index", type=Path, required=True, help="a gallery index directory")
    parser.add_argument("photos", nargs="+", type=Path, metavar="PHOTO", help="photos to locate")
    parser.add_argument("--k", type=int, default=5, help="tiles reported per photo (5)")
    parser.add_argument("--grid", type=Path, help="PNG: each photo beside its top-k tiles")
    parser.add_argument("--map", type=Path, help="PNG: footprint, top-k tiles and estimate")
    parser.add_argument(
        "--checkpoint", type=Path, help="the model (default: the one recorded in the index)"
    )
    parser.add_argument("--estimate", choices=ESTIMATES, default="weighted")
    parser.add_argument("--radius-m", type=float, help="default: twice the tile spacing")
    parser.add_argument(
        "--truth",
        type=Path,
        help="CSV of the photos' true positions (same header as tiles): adds error_m to each "
        "line and a summary (median error, share within --within-m, a random tile's) on stderr",
    )
    parser.add_argument(
        "--within-m", type=float, default=50.0, help="the summary's distance threshold (50 m)"
    )
    parser.add_argument("--summary", type=Path, help="with --truth: also write the summary (JSON)")
    parser.add_argument("--backend", choices=("exact", "faiss-exact", "faiss-ivf"), default="exact")
    _common(parser)


def _fail(command: str, message: str) -> int:
    print(f"gsra-salad {command}: error: {message}", file=sys.stderr)
    return 2


def read_positions_csv(path: Path) -> tuple[list[str], np.ndarray, str]:
    """Rows of a ``path,lat,lon`` / ``path,x,y`` CSV: (paths, (N, 2) positions, metric)."""
    if not path.is_file():
        raise CommandError(f"{path} not found")
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise CommandError(f"{path} cannot be read as CSV ({err})") from err
    header = tuple(c.strip().lower() for c in rows[0]) if rows else ()
    if header not in HEADERS:
        raise CommandError(
            f"{path}: the header must be 'path,lat,lon' (degrees) or 'path,x,y' (planar "
            f"metres), got {','.join(header) or 'an empty file'!r}"
        )
    paths, positions, bad = [], [], []
    for number, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        problem = _row_problem(row, header)
        if problem:
            bad.append(f"row {number}: {problem}")
            continue
        paths.append(row[0].strip())
        positions.append((float(row[1]), float(row[2])))
    if bad:
        more = f" (and {len(bad) - 5} more bad rows)" if len(bad) > 5 else ""
        raise CommandError(f"{path}: {'; '.join(bad[:5])}{more}")
    if not paths:
        raise CommandError(f"{path} lists no tiles")
    return paths, np.asarray(positions, dtype=np.float64), HEADERS[header]


def _row_problem(row: list[str], header: tuple[str, ...]) -> str | None:
    if len(row) != 3:
        return f"expected 3 fields ({','.join(header)}), got {len(row)}"
    if not row[0].strip():
        return "the path is empty"
    for name, value in zip(header[1:], row[1:]):
        if not value.strip():
            return f"{name} is missing"
        try:
            number = float(value)
        except ValueError:
            return f"{name} {value.strip()!r} is not a number"
        if not np.isfinite(number):
            return f"{name} is {value.strip()}"
    if header[1] == "lat" and (abs(float(row[1])) > 90 or abs(float(row[2])) > 180):
        return "lat/lon out of range (|lat| <= 90, |lon| <= 180 degrees)"
    return None


def _occupied(out: Path) -> bool:
    """True when ``out`` holds something other than a gallery index (never overwritten)."""
    if not out.exists():
        return False
    return not out.is_dir() or (any(out.iterdir()) and not (out / "meta.json").is_file())


def _load_model(checkpoint: Path) -> CrossViewGeoLocalizer:
    try:
        return CrossViewGeoLocalizer.from_pretrained(checkpoint)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CommandError(f"cannot load the model from {checkpoint}: {err}") from err


def _transform(model: Any, view: str, image_size: Any, command: str) -> Any:
    if image_size is not None:
        from ..data import eval_transform

        return eval_transform(image_size)
    try:
        return resolve_transform(model, view, None, command)
    except (ValueError, ImportError, AttributeError) as err:
        raise CommandError(f"{err}; or pass --image-size") from err


def run_index(args: argparse.Namespace) -> int:
    """Runs ``index`` (see :func:`add_index_arguments`); prints a one-line JSON summary.

    Args:
        args: the namespace parsed by a parser that :func:`add_index_arguments` filled.

    Returns:
        The exit status: 0, or 2 for bad input (one line on stderr, nothing written).

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_index_arguments(p)
        >>> run_index(p.parse_args(["--checkpoint", "x", "--tiles", "missing.csv", "--out", "i"]))
        2
    """
    try:
        if args.dataset is not None:
            paths, positions, metric, root = _dataset_tiles(args)
        else:
            for option in ("data_root", "split", "positions"):
                if getattr(args, option, None) is not None:
                    flag = "--" + option.replace("_", "-")
                    raise CommandError(f"{flag} goes with --dataset, not --tiles")
            paths, positions, metric = read_positions_csv(args.tiles)
            root = args.tiles.resolve().parent
        missing = [p for p in paths if not (root / p).is_file()]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise CommandError(f"{len(missing)} tile image(s) not found: {missing[:3]}{more}")
        out = args.out
        if _occupied(out):
            raise CommandError(f"{out} exists and is not a gallery index; choose another --out")
        device = _join_torchrun(args.device)
        model = _load_model(args.checkpoint).to(device)
        transform = _transform(model, "reference", args.image_size, "index")
        dtype = torch.float16 if args.dtype == "float16" else torch.float32
        index = GalleryIndex.build(
            model, [root / p for p in paths], positions, metric=metric, paths=paths,
            transform=transform, dtype=dtype, batch_size=args.batch_size,
            progress=args.progress,
        )  # fmt: skip
    except CommandError as err:
        return _fail("index", str(err))
    except (OSError, ValueError) as err:  # an undecodable tile, positions missing for some
        return _fail("index", f"{err}; nothing written")
    index.info.update(
        checkpoint=str(args.checkpoint.resolve()),
        tiles_root=str(root),
        reference_image_size=args.image_size,
    )
    index.tile_spacing_m()  # computed once, saved
    if args.approximate:
        try:
            index.build_approximate()
        except ImportError as err:
            return _fail("index", f"--approximate: {err}; nothing written")
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        index.save(out)
        summary = {"index": str(out), "tiles": len(index), "dim": index.dim, "metric": metric}
        print(json.dumps(summary))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ..training import cleanup_distributed

        cleanup_distributed()
    return 0


DATASETS = ("cvusa", "cvact", "university1652")
_SPLITS = {
    "cvusa": ("train", "val"), "cvact": ("train", "val", "test"), "university1652": ("test",)
}  # fmt: skip


def _dataset_tiles(args: argparse.Namespace) -> tuple[list[str], np.ndarray, str, Path]:
    """The satellite tiles of ``--dataset``'s ``--split``: (paths relative to the root,
    (N, 2) positions, metric, root). Positions: ``--positions``, else the reader's (CVACT's
    UTM metres); a dataset without either is a :class:`CommandError` that says so."""
    from ..data import CVACT, CVUSA, University1652

    if args.data_root is None:
        raise CommandError(f"--dataset {args.dataset} needs --data-root DIR")
    split = args.split or ("test" if args.dataset == "university1652" else "val")
    if split not in _SPLITS[args.dataset]:
        raise CommandError(
            f"--split {split}: {args.dataset} has the splits {', '.join(_SPLITS[args.dataset])}"
        )
    try:
        if args.dataset == "cvusa":
            tiles = CVUSA(args.data_root, split).reference_paths
            positions = None
        elif args.dataset == "cvact":
            reader = CVACT(args.data_root, split)
            tiles, positions = reader.reference_paths, reader.positions
        else:  # the satellite gallery, distractors included
            tiles = University1652(args.data_root, "test", view="gallery_satellite")._data.paths
            positions = None
    except (OSError, ValueError, KeyError) as err:
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        raise CommandError(" ".join(text.split())) from err
    root = Path(args.data_root)
    paths = [_relative(Path(t), root) for t in tiles]
    root = root.resolve()
    metric = "euclidean"  # CVACT's UTM metres
    if args.positions is not None:
        given, table, metric = read_positions_csv(args.positions)
        base = args.positions.resolve().parent
        lookup = {str((base / g).resolve()): tuple(p) for g, p in zip(given, table)}
        found = [lookup.get(str(root / p)) for p in paths]
        absent = [p for p, f in zip(paths, found) if f is None]
        if absent:
            more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
            raise CommandError(
                f"{args.positions} lists no position for {len(absent)} of the {len(paths)} tiles "
                f"of {args.dataset} {split}: {absent[:3]}{more}"
            )
        positions = np.asarray(found, dtype=np.float64)
    elif positions is None:
        name = {"cvusa": "CVUSA", "university1652": "University-1652"}[args.dataset]
        raise CommandError(
            f"{name}'s official layout records no positions for its tiles; pass --positions CSV "
            "(path,lat,lon or path,x,y; paths relative to the CSV's folder), or list the tiles "
            "with their positions in --tiles CSV"
        )
    return paths, np.asarray(positions, dtype=np.float64), metric, root


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` where it lies below it (the tile's id), else absolute."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path.resolve())


def _join_torchrun(device: str) -> torch.device | str:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): joins the process group, so that the embedding
    shards the tiles over the ranks, and returns this rank's device (``cuda`` means
    ``cuda:LOCAL_RANK``); otherwise ``device`` unchanged."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    from ..training import init_distributed

    return init_distributed(device).device


def _reason(err: Exception) -> str:
    """Why a photo could not be read, without repeating its path: the OS's words for a missing
    or unreadable file, else the decoder's (or the check's) message."""
    cause = err.__cause__ if isinstance(err.__cause__, Exception) else err
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause)


def _read_photos(paths: list[Path], transform: Any) -> tuple[list, list, list[str]]:
    """Decoded photos (raw, transformed) and one error line per photo that failed."""
    raw, ready, errors = [], [], []
    for path in paths:
        try:
            image = load_rgb(path)
            ready.append(transform(image))
            raw.append(image)
        except (OSError, ValueError) as err:
            errors.append(f"cannot read photo {path}: {_reason(err)}")
            raw.append(None)
            ready.append(None)
    return raw, ready, errors


def _truths(args: argparse.Namespace, metric: str) -> dict[str, tuple[float, float]]:
    if args.truth is None:
        return {}
    paths, positions, truth_metric = read_positions_csv(args.truth)
    if truth_metric != metric:
        raise CommandError(f"{args.truth} holds {truth_metric} positions, the index {metric}")
    root = args.truth.resolve().parent
    return {str((root / p).resolve()): tuple(map(float, pos)) for p, pos in zip(paths, positions)}


def _open_index(args: argparse.Namespace) -> tuple[GalleryIndex, CrossViewGeoLocalizer]:
    try:
        index = GalleryIndex.load(args.index)
    except (OSError, ValueError) as err:
        raise CommandError(str(err)) from err
    checkpoint = args.checkpoint or index.info.get("checkpoint")
    if checkpoint is None:
        raise CommandError(f"{args.index} records no model; pass --checkpoint")
    model = _load_model(Path(checkpoint)).to(args.device)
    try:
        index.check_model(model)
    except ValueError as err:
        raise CommandError(f"{args.index}: {err}") from err
    return index, model


def run_locate(args: argparse.Namespace) -> int:
    """Runs ``locate`` (see :func:`add_locate_arguments`): one JSON line per photo on stdout.

    Args:
        args: the namespace parsed by a parser that :func:`add_locate_arguments` filled.

    Returns:
        The exit status: 0; 1 when some photos could not be read (each named on stderr, the
        others answered, the count reported); 2 for bad input (nothing written).

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_locate_arguments(p)
        >>> run_locate(p.parse_args(["--index", "no-such-index", "a.jpg"]))
        2
    """
    if args.k < 1:
        return _fail("locate", f"--k must be >= 1, got {args.k}")
    if args.summary is not None and args.truth is None:
        return _fail("locate", "--summary needs --truth (the photos' true positions)")
    if not args.within_m > 0:
        return _fail("locate", f"--within-m must be > 0, got {args.within_m}")
    try:
        index, model = _open_index(args)
        truths = _truths(args, index.metric)
        transform = _transform(model, "query", args.image_size, "locate")
    except CommandError as err:
        return _fail("locate", str(err))
    if args.k > len(index):
        return _fail("locate", f"--k {args.k} exceeds the {len(index)} tiles of {args.index}")
    raw, ready, errors = _read_photos(args.photos, transform)
    for error in errors:
        print(f"gsra-salad locate: {error}", file=sys.stderr)
    good = [i for i, r in enumerate(ready) if r is not None]
    results = _answer(args, index, model, [ready[i] for i in good], [args.photos[i] for i in good])
    for result in results:
        truth = truths.get(str(Path(result.photo).resolve())) if result.photo else None
        if truth is not None:
            error_m = geodesic_distance(
                torch.tensor([result.position]), torch.tensor([truth]), index.metric
            )
            result.extra["error_m"] = float(error_m[0])
        print(result.to_json())
    if results:
        try:
            _pictures(args, index, results, [raw[i] for i in good], truths)
        except OSError as err:  # a tile image of the grid went missing since indexing
            return _fail("locate", f"{err}; the picture was not written")
    if truths:
        summary = _error_summary(results, index, truths, args.within_m)
        print(f"gsra-salad locate: {_summary_text(summary)}", file=sys.stderr)
        if args.summary is not None:
            _atomic_write(args.summary, json.dumps(summary, indent=2) + "\n")
    if errors:
        print(
            f"gsra-salad locate: {len(errors)} of {len(args.photos)} photos failed", file=sys.stderr
        )
        return 1
    return 0


def _answer(args, index, model, images, photos) -> list[Localization]:
    if not images:
        return []
    descriptors = []
    with torch.inference_mode():
        model.eval()
        for start in range(0, len(images), args.batch_size):
            batch = torch.stack(images[start : start + args.batch_size]).to(args.device)
            descriptors.append(model.embed(batch, view="query").float().cpu())
    return locate_descriptors(
        index, torch.cat(descriptors), args.k, estimate=args.estimate, radius_m=args.radius_m,
        backend=args.backend, photos=[str(p) for p in photos],
    )  # fmt: skip


RANDOM_TILES = 4096  # tiles the random-tile baseline measures against (all, when fewer)


def _error_summary(
    results: list[Localization],
    index: GalleryIndex,
    truths: dict[str, tuple[float, float]],
    within_m: float = 50.0,
) -> dict[str, Any]:
    """The errors of the photos with a true position, beside a tile drawn at random.

    The random tile's numbers are exact expectations, not a draw: the median and the share
    within ``within_m`` of the distances between each photo's true position and every tile
    (a seeded sample of ``RANDOM_TILES`` tiles for larger indexes).

    Returns:
        ``{"photos", "median_error_m", "mean_error_m", "within_m", "share_within",
        "random_tile": {"median_error_m", "mean_error_m", "share_within", "tiles"}}``;
        ``"photos": 0`` (and no errors) when no answered photo has a true position.
    """
    errors, known = [], []
    for result in results:
        if "error_m" in result.extra:
            errors.append(result.extra["error_m"])
            known.append(truths[str(Path(result.photo).resolve())])
    summary: dict[str, Any] = {"photos": len(errors), "within_m": within_m}
    if not errors:
        return summary
    positions = np.asarray(index.positions, dtype=np.float64)
    if len(positions) > RANDOM_TILES:
        pick = np.random.default_rng(0).choice(len(positions), RANDOM_TILES, replace=False)
        positions = positions[np.sort(pick)]
    tiles = torch.from_numpy(positions)
    to_tiles = torch.cat([
        geodesic_distance(tiles, torch.tensor([truth], dtype=torch.float64).expand_as(tiles),
                          index.metric)
        for truth in known
    ]).numpy()  # fmt: skip
    e = np.asarray(errors)
    summary.update(
        median_error_m=round(float(np.median(e)), 2),
        mean_error_m=round(float(e.mean()), 2),
        share_within=round(float((e <= within_m).mean()), 4),
        random_tile={
            "median_error_m": round(float(np.median(to_tiles)), 2),
            "mean_error_m": round(float(to_tiles.mean()), 2),
            "share_within": round(float((to_tiles <= within_m).mean()), 4),
            "tiles": len(tiles),
        },
    )
    return summary


def _summary_text(summary: dict[str, Any]) -> str:
    if not summary["photos"]:
        return "no answered photo is listed in --truth: no summary"
    within, rnd = f"{summary['within_m']:g} m", summary["random_tile"]
    return (
        f"{summary['photos']} photos with a true position: median error "
        f"{summary['median_error_m']:.1f} m, {100 * summary['share_within']:.0f}% within {within}"
        f"; a random tile: median {rnd['median_error_m']:.1f} m, "
        f"{100 * rnd['share_within']:.0f}% within {within}"
    )


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _atomic_png(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.png")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class _Tiles:
    """The index's tile images, decoded on demand (for the grid)."""

    def __init__(self, index: GalleryIndex) -> None:
        self.root = Path(index.info.get("tiles_root", "."))
        self.paths = index.paths

    def __getitem__(self, i: int):
        return load_rgb(self.root / self.paths[i])


def _pictures(args, index, results, raw, truths) -> None:
    from ._plot import save_map

    truth = [truths.get(str(Path(r.photo).resolve())) for r in results]
    if args.map is not None:
        _atomic_png(args.map, lambda p: save_map(p, results, index.positions, index.metric, truth))
    if args.grid is not None:
        ranked = torch.tensor([[t.index for t in r.top] for r in results])
        radius = index.tile_spacing_m()
        near = torch.zeros(ranked.shape, dtype=torch.bool)
        for i, (r, t) in enumerate(zip(results, truth)):
            if t is not None:
                pos = torch.tensor([m.position for m in r.top])
                d = geodesic_distance(pos, torch.tensor([t]).expand_as(pos), index.metric)
                near[i] = d <= radius
        _atomic_png(
            args.grid,
            lambda p: save_retrieval_grid(p, raw, _Tiles(index), ranked, near, k=ranked.shape[1]),
        )
