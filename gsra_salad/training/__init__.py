"""The training loop the examples share: AdamW, schedules, clipping, mixed precision,
checkpoints that resume exactly (and refuse to resume with changed settings), callbacks, and
DistributedDataParallel through ``torchrun``.

Read it in this order: :mod:`.config` (TrainConfig and what may change on resume),
:mod:`.precision` (autocast and the scaler), :mod:`.optim` (optimizer, schedules, clipping),
:mod:`.state` (TrainState: everything stateful in a run, seeds, RNG states),
:mod:`.checkpoint` (atomic ``last/`` and ``best/``), :mod:`.distributed` (the process group),
:mod:`.callbacks` and :mod:`.loop` (:func:`fit`). Library code logs
(``logging.getLogger("gsra_salad.training")``); it never prints.

Example:
    >>> import torch
    >>> from gsra_salad import CrossViewGeoLocalizer, GlobalSpatialRelationAttention, SALAD
    >>> from gsra_salad.losses import InfoNCELoss
    >>> from gsra_salad.models import TinyCNN
    >>> from gsra_salad.training import RetrievalTask, TrainConfig, fit
    >>> images = torch.rand(8, 3, 32, 32)
    >>> class Pairs(torch.utils.data.Dataset):
    ...     labels = list(range(8))
    ...     def __len__(self): return 8
    ...     def __getitem__(self, i): return images[i], images[i].flip(-1), i
    >>> class Side(torch.utils.data.Dataset):
    ...     def __init__(self, flip): self.flip = flip
    ...     def __len__(self): return 8
    ...     def __getitem__(self, i): return (images[i].flip(-1) if self.flip else images[i]), i
    >>> model = CrossViewGeoLocalizer(TinyCNN(16), None, SALAD(16, 4, 4, token_dim=0))
    >>> config = TrainConfig(epochs=1, batch_size=4, workers=0, progress=False)
    >>> result = fit(model, InfoNCELoss(), Pairs(), [RetrievalTask("val", Side(0), Side(1))],
    ...              config)
    >>> sorted(result.metrics["val"])[:3], result.state.next_epoch
    (['R@1', 'R@1%', 'R@10'], 1)
"""

from .callbacks import Callback, CallbackList
from .checkpoint import (
    STATE_DICT_FILE,
    TRAINING_STATE_FILE,
    CheckpointError,
    load_model_weights,
    load_training_state,
    recover,
    save_checkpoint,
)
from .config import FREE_ON_RESUME, ResumeError, TrainConfig, resume_changes
from .distributed import (
    DistributedContext,
    barrier,
    cleanup_distributed,
    get_context,
    init_distributed,
)
from .loop import (
    FitResult,
    RetrievalTask,
    TrainData,
    TrainStep,
    build_train_state,
    evaluate,
    fit,
    train_one_epoch,
)
from .optim import WarmupSchedule, build_optimizer, build_scheduler, clip_gradients
from .precision import AUTOCAST_DTYPES, autocast, grad_scaler, resolve_precision
from .state import TrainState, get_rng_state, seed_everything, set_rng_state

__all__ = [
    "AUTOCAST_DTYPES",
    "FREE_ON_RESUME",
    "STATE_DICT_FILE",
    "TRAINING_STATE_FILE",
    "Callback",
    "CallbackList",
    "CheckpointError",
    "DistributedContext",
    "FitResult",
    "ResumeError",
    "RetrievalTask",
    "TrainConfig",
    "TrainData",
    "TrainState",
    "TrainStep",
    "WarmupSchedule",
    "autocast",
    "barrier",
    "build_optimizer",
    "build_scheduler",
    "build_train_state",
    "cleanup_distributed",
    "clip_gradients",
    "evaluate",
    "fit",
    "get_context",
    "get_rng_state",
    "grad_scaler",
    "init_distributed",
    "load_model_weights",
    "load_training_state",
    "recover",
    "resolve_precision",
    "resume_changes",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "train_one_epoch",
]
