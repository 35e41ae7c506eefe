"""`nodal train`: train the segmenter and the classifier, write a model directory.

From phantoms (the default: reproducible from seeds) or from a site's labelled images
(`--data DIR`: cases.json, an nnU-Net raw dataset or CT with DICOM SEG, see
docs/training.md). The same code path trains both.
"""

from __future__ import annotations

import logging
import math
import pickle
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import monai
import numpy as np
import torch
from monai.losses import DiceCELoss

from inference import phantoms
from inference.classify import CROP
from inference.model_store import save_model
from inference.networks import NodeClassifier, build_segmenter, classifier_scalars
from inference.plausibility import Rules
from inference.preprocess import normalise
from inference.progress import progress
from inference.training_data import (
    Case,
    classifier_samples,
    false_positive_map,
    labelled_case,
    phantom_case,
    segmentation_patches,
)

log = logging.getLogger(__name__)

#: Seeds below this are for training; evaluation uses seeds from EVAL_SEED_BASE up.
EVAL_SEED_BASE = 1_000_000


@dataclass(frozen=True)
class TrainConfig:
    cases: int = 48
    seed: int = 0
    working_spacing_mm: float = 1.0
    patch: int = 64  # stored patch side
    train_crop: int = 48  # random crop of the stored patch seen per step
    patches_per_case: int = 48
    seg_steps: int = 1800
    seg_batch: int = 4
    seg_channels: tuple[int, ...] = (16, 32, 64, 128)
    cls_epochs: int = 30
    cls_width: int = 16
    seg_lr: float = 2e-3
    node_share: float = 0.4  # segmenter patches centred on a node
    hard_share: float = 0.3  # ... on node-like tissue that is not a node
    mined_share: float = 0.0  # ... on the false positives of the `init_from` model (mining)
    thick_share: float = 0.0  # segmenter batches seen as slices 3-5 mm thick would show them
    augment: float = 0.0  # probability of each of nnU-Net's augmentations per segmenter item (augmenters)
    node_power: float = 1.0  # node patches: node drawn by voxels ** power (1: each voxel alike, 0: each node)
    init_from: str | None = None  # model directory whose weights both networks start from
    fresh_classifier: bool = False  # with init_from: the classifier starts from random weights
    workers: int = 2
    variety: bool = False  # domain-randomised phantoms (phantoms.variety_spec), issue 15
    mixed: bool = False  # both phantoms of every seed: the plain and the domain-randomised one
    name: str = "nodal-ln-demo"
    version: str = "0.1.0"


def training_spec(seed: int) -> phantoms.PhantomSpec:
    """Vary the native geometry so the model sees many scanners' grids."""
    rng = np.random.default_rng([seed, 7])
    ps = float(rng.uniform(0.75, 1.0))
    ss = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0]))
    n = math.ceil(380 / ps)
    return phantoms.PhantomSpec(
        rows=n,
        columns=n,
        pixel_spacing_mm=ps,
        slices=int(150 / ss),
        slice_spacing_mm=ss,
        nodes=(5, 12),
        noise_hu=float(rng.uniform(8, 18)),
    )


def _phantom_samples(args) -> tuple:
    seed, cfg = args
    torch.set_num_threads(1)
    spec = phantoms.variety_spec(seed) if cfg.variety else training_spec(seed)
    case = phantom_case(seed, spec, cfg.working_spacing_mm)
    return _samples(case, seed, cfg)


_MINING_MODEL: dict = {}


def mine(case: Case, cfg: TrainConfig) -> Case:
    """Mark where the `init_from` model finds something that is no node (hard negative
    mining): the segmenter then trains on its own mistakes."""
    if not cfg.mined_share:
        return case
    if not cfg.init_from:
        raise ValueError("mining false positives needs a model to start from (--init-from)")
    from inference.model_store import load_model
    from inference.segment import node_probability

    if cfg.init_from not in _MINING_MODEL:  # once per worker process
        _MINING_MODEL[cfg.init_from] = load_model(Path(cfg.init_from), device="cpu")
    model = _MINING_MODEL[cfg.init_from]
    prob = node_probability(model.segmenter, case.image, model.device)
    case.mined = false_positive_map(prob, case.nodes, model.threshold)
    return case


def _samples(case: Case, seed: int, cfg: TrainConfig) -> tuple:
    rng = np.random.default_rng([seed, 11])
    case = mine(case, cfg)
    if cfg.patches_per_case:
        imgs, masks = segmentation_patches(
            case,
            cfg.patches_per_case,
            cfg.patch,
            rng,
            cfg.node_share,
            cfg.hard_share,
            cfg.mined_share,
            node_power=cfg.node_power,
        )
    else:  # the segmenter is not trained in this run
        imgs, masks = (
            np.zeros((0,) + (cfg.patch,) * 3, np.float16),
            np.zeros((0,) + (cfg.patch,) * 3, np.uint8),
        )
    crops, scalars, labels = classifier_samples(case, rng)
    return imgs, masks, crops, scalars, labels


def collect(cfg: TrainConfig, data_dir: Path | None, cache_dir: Path | None = None) -> tuple:
    """Training samples; phantom samples are cached per (seed, cases, patch settings). With
    `cfg.mixed`, the plain phantoms' samples and the domain-randomised ones', each from its
    own cache entry."""
    if cfg.mixed and data_dir is None:
        plain = collect(replace(cfg, mixed=False, variety=False), None, cache_dir)
        varied = collect(replace(cfg, mixed=False, variety=True), None, cache_dir)
        return joined([plain, varied])
    cache = None
    if data_dir is None and cache_dir is not None:
        key = f"s{cfg.seed}-n{cfg.cases}-p{cfg.patch}x{cfg.patches_per_case}-w{cfg.working_spacing_mm}"
        if (cfg.node_share, cfg.hard_share) != (0.4, 0.3):  # the first recorded shares keep their key
            key += f"-h{cfg.node_share}-{cfg.hard_share}"
        if cfg.variety:
            key += "-variety"
        if cfg.node_power == 0:  # recorded as --per-node
            key += "-per-node"
        elif cfg.node_power != 1:
            key += f"-np{cfg.node_power}"
        if cfg.mined_share:  # mined patches depend on the model that made the mistakes
            key += f"-m{cfg.mined_share}-{_parent_segmenter_sha(cfg)[:12]}"
        key += phantoms.revision_tag(cfg.variety)
        cache = Path(cache_dir) / f"samples-{key}.pkl"
        if cache.is_file():
            log.info("using cached training samples %s", cache)
            with open(cache, "rb") as f:
                return pickle.load(f)
    samples = _collect(cfg, data_dir)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(cache, "wb") as f:
            pickle.dump(samples, f, protocol=pickle.HIGHEST_PROTOCOL)
    return samples


def _collect(cfg: TrainConfig, data_dir: Path | None) -> tuple:
    t0 = time.time()
    if data_dir is None:
        if cfg.seed + cfg.cases > EVAL_SEED_BASE:
            raise ValueError("training seeds must stay below the evaluation seeds")
        jobs = [(cfg.seed + i, cfg) for i in range(cfg.cases)]
        with ProcessPoolExecutor(cfg.workers) as pool:
            parts = list(progress(pool.map(_phantom_samples, jobs), len(jobs), "training phantoms"))
    else:
        from inference.datasets import open_dataset

        dataset = open_dataset(Path(data_dir))
        cases = dataset.split("train")
        if not cases:
            raise ValueError(f"{data_dir} ({dataset.layout}) has no training cases")
        log.info("site data: %s layout, %d training case(s)", dataset.layout, len(cases))
        parts = []
        for i, ref in enumerate(cases):
            c = ref.load()
            parts.append(_samples(labelled_case(c.hu, c.spacing, c.label, cfg.working_spacing_mm), i, cfg))
    samples = joined(parts)
    log.info(
        "collected %d patches and %d node crops in %.0f s", len(samples[0]), len(samples[2]), time.time() - t0
    )
    return samples


def joined(parts: list[tuple]) -> tuple:
    """The samples of several cases (or collections) as one collection, in order."""
    imgs = np.concatenate([p[0] for p in parts])
    masks = np.concatenate([p[1] for p in parts])
    crops = [c for p in parts for c in p[2]]
    scalars = [s for p in parts for s in p[3]]
    labels = [lab for p in parts for lab in p[4]]
    return imgs, masks, crops, scalars, labels


def family_words(cfg: TrainConfig) -> str:
    """How the card names the phantoms a configuration trains on."""
    if cfg.mixed:
        return "each seed plain and domain-randomised (variety_spec), "
    return "domain-randomised (variety_spec), " if cfg.variety else ""


def _parent_segmenter_sha(cfg: TrainConfig) -> str:
    from inference.model_store import read_card

    return read_card(Path(cfg.init_from))["weights"]["segmenter"]["sha256"] if cfg.init_from else ""


def _flip(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    dims = [d for d in (2, 3, 4) if rng.random() < 0.5]
    return x.flip(dims) if dims else x


def thick_slices(hu: torch.Tensor, thickness: int, phase: int) -> torch.Tensor:
    """`hu` (batch, 1, slice, row, column) on the working grid as a CT with slices
    `thickness` voxels thick and as far apart shows it once resampled to that grid: each
    slab of `thickness` slices (from `phase`) averaged, then interpolated linearly between
    the slabs' centres (nearest beyond the first and last)."""
    slabs = torch.nn.functional.avg_pool3d(
        hu[:, :, phase:], (thickness, 1, 1), (thickness, 1, 1), ceil_mode=True
    )
    n = slabs.shape[2]
    z = torch.arange(hu.shape[2], dtype=torch.float32)
    at = ((z - phase - (thickness - 1) / 2) / thickness).clamp(0, n - 1)
    lo = at.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    w = (at - lo).view(1, 1, -1, 1, 1)
    return slabs[:, :, lo] * (1 - w) + slabs[:, :, hi] * w


#: voxels of the crop's own edge replicated around it while it is blurred (MONAI's Gaussian
#: kernel reaches 4 sigma, sigma at most 1 voxel), so that the blur does not draw in zeros
BLUR_EDGE = 4


def augmenters(p: float, seed: int) -> tuple:
    """nnU-Net's augmentations of a segmenter item (channel-first HU `hu` and its `mask`),
    a subset of its defaults, each applied with probability `p`: (spatial, on the stored patch
    before the crop: rotated up to 30 degrees about each axis and its sampling grid scaled
    by 0.75-1.25 along each axis apart (the CT 0.8-1.33 times its size), the mask with it;
    intensity, on the crop: Gaussian noise of sd up to 15 HU, then a blur of sigma 0.5-1
    voxel per axis). MONAI's dictionary transforms, each with a random stream of its own
    from `seed` (shared with the transform it wraps)."""
    from monai.transforms import Compose, RandAffined, RandGaussianNoised, RandGaussianSmoothd

    spatial = RandAffined(
        keys=("hu", "mask"),
        prob=p,
        rotate_range=(math.pi / 6,) * 3,
        scale_range=(0.25,) * 3,
        mode=("bilinear", "nearest"),
        padding_mode="border",
    )
    noise = RandGaussianNoised(keys="hu", prob=p, std=15.0, sample_std=True)
    blur = RandGaussianSmoothd(keys="hu", prob=p, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0))
    intensity = Compose([noise, blur])  # (a Compose seeds its transforms when made: set theirs after)
    for i, transform in enumerate((spatial, noise, blur)):
        transform.set_random_state(state=np.random.RandomState([seed, i]))
    return spatial, intensity


def _each(transform, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """`transform` applied to every item of the batches (batch, 1, ...) given by key."""
    from monai.utils import convert_to_tensor

    out = [transform(dict(zip(batch, items, strict=True))) for items in zip(*batch.values(), strict=True)]
    return {key: torch.stack([convert_to_tensor(o[key], track_meta=False) for o in out]) for key in batch}


def augmented(augment: tuple, hu: torch.Tensor, mask: torch.Tensor, crop: tuple) -> tuple:
    """Stored patches (batch, 1, z, y, x) of CT and mask through `augmenters`: the spatial
    transform on each patch, then the `crop`, then noise and blur on the crop with its edge
    replicated `BLUR_EDGE` voxels around it."""
    moved = _each(augment[0], hu=hu, mask=mask)
    hu, mask = moved["hu"][crop], moved["mask"][crop]
    e = BLUR_EDGE
    padded = torch.nn.functional.pad(hu, (e,) * 6, mode="replicate")
    return _each(augment[1], hu=padded)["hu"][..., e:-e, e:-e, e:-e], mask


def train_segmenter(
    cfg: TrainConfig, imgs: np.ndarray, masks: np.ndarray, start: dict | None = None
) -> torch.nn.Module:
    """Train the U-Net; `start` is a state dict to continue from (fine-tuning)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 3])
    net = build_segmenter(cfg.seg_channels)
    if start is not None:
        net.load_state_dict(start)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.seg_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.seg_lr, total_steps=cfg.seg_steps, pct_start=0.1
    )
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    augment = augmenters(cfg.augment, cfg.seed) if cfg.augment else None
    net.train()
    t0 = time.time()
    for step in progress(range(cfg.seg_steps), cfg.seg_steps, "segmenter"):
        idx = rng.integers(0, len(imgs), cfg.seg_batch)
        o = rng.integers(0, cfg.patch - cfg.train_crop + 1, 3)
        window = tuple(slice(a, a + cfg.train_crop) for a in o)
        # the whole stored patch only where the spatial augmentation needs it
        picked: tuple[np.ndarray | slice, ...] = (idx,) if augment else (idx, *window)
        hu = torch.from_numpy(imgs[picked].astype(np.float32))[:, None]
        y = torch.from_numpy(masks[picked].astype(np.float32))[:, None]
        if augment:
            hu, y = augmented(augment, hu, y, (slice(None), slice(None), *window))
        hu = hu * float(rng.uniform(0.97, 1.03)) + float(rng.normal(0, 8))
        if cfg.thick_share and rng.random() < cfg.thick_share:
            thickness = int(rng.integers(3, 6))
            hu = thick_slices(hu, thickness, int(rng.integers(0, thickness)))
        x = normalise(hu)
        both = _flip(torch.cat([x, y], 1), rng)
        x, y = both[:, :1], both[:, 1:]
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.seg_steps - 1:
            log.info(
                "segmenter step %d/%d loss %.4f (%.0f s)",
                step,
                cfg.seg_steps,
                loss.item(),
                time.time() - t0,
            )
    return net.eval()


def train_classifier(
    cfg: TrainConfig, crops, scalars, labels, start: dict | None = None, name: str = "classifier"
) -> torch.nn.Module:
    """A crop network (`networks.NodeClassifier`) fitted to `labels`; `name` is what the
    progress and the log call it (the malignancy classifier, or the checker)."""
    torch.manual_seed(cfg.seed + 1)
    rng = np.random.default_rng([cfg.seed, 5])
    channels = int(crops[0].shape[0]) if len(crops) else 2  # CT and mask per crop
    net = NodeClassifier(cfg.cls_width, in_channels=channels)
    if start is not None:
        net.load_state_dict(start)
    y_all = torch.tensor(labels, dtype=torch.float32)
    pos = float(y_all.mean()) if len(labels) else 0.5
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((1 - pos) / max(pos, 1e-3)))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    batch = 16
    steps = cfg.cls_epochs * max(1, len(crops) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=max(steps, 1), pct_start=0.1)
    x_all = np.stack(crops) if crops else np.zeros((0, channels, 1, 1, 1), np.float16)
    s_all = torch.tensor([classifier_scalars(sa, la) for sa, la in scalars], dtype=torch.float32)
    net.train()
    t0 = time.time()
    for step in progress(range(steps), steps, name):
        idx = rng.integers(0, len(crops), batch)
        x = _flip(torch.from_numpy(x_all[idx].astype(np.float32)), rng)
        if rng.random() < 0.5:
            x = x.transpose(3, 4)  # in-plane transpose: orientation is not a malignancy sign
        opt.zero_grad()
        loss = loss_fn(net(x, s_all[idx]), y_all[idx])
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log.info(
                "%s step %d/%d loss %.4f (%.0f s)",
                name,
                step,
                steps,
                loss.item(),
                time.time() - t0,
            )
    return net.eval()


def starting_weights(cfg: TrainConfig) -> tuple[dict, dict | None]:
    """The state dicts of `cfg.init_from` (checked against its card) and what the new card
    records about it; nothing when training starts from random weights."""
    if not cfg.init_from:
        return {}, None
    from inference.model_store import load_model

    parent = load_model(Path(cfg.init_from), device="cpu")
    seg = parent.card["segmenter"]
    if (
        tuple(seg["channels"]) != tuple(cfg.seg_channels)
        or parent.card["classifier"]["width"] != cfg.cls_width
    ):
        raise ValueError(f"{cfg.init_from}: its networks have another shape than this training's")
    states = {
        "segmenter": {k: v.clone() for k, v in parent.segmenter.state_dict().items()},
        "classifier": {k: v.clone() for k, v in parent.classifier.state_dict().items()},
    }
    card = parent.card
    record = {
        "name": card["name"],
        "version": card["version"],
        "training_command": card.get("training", {}).get("command", ""),
        "training_data": card.get("training_data", ""),
        "weights_sha256": {r: card["weights"][r]["sha256"] for r in ("segmenter", "classifier")},
    }
    return states, record


def train(
    out_dir: Path,
    cfg: TrainConfig,
    data_dir: Path | None = None,
    command: str = "",
    cache_dir: Path | None = None,
) -> Path:
    start, parent = starting_weights(cfg)
    imgs, masks, crops, scalars, labels = collect(cfg, data_dir, cache_dir)
    if cfg.seg_steps == 0 and "segmenter" not in start:
        raise ValueError("--seg-steps 0 keeps the segmenter of --init-from; there is none")
    if cfg.seg_steps == 0:  # only the classifier is trained; the segmenter is the parent's
        seg = build_segmenter(cfg.seg_channels)
        seg.load_state_dict(start["segmenter"])
        seg.eval()
    else:
        seg = train_segmenter(cfg, imgs, masks, start.get("segmenter"))
    cls_start = None if cfg.fresh_classifier else start.get("classifier")
    cls = train_classifier(cfg, crops, scalars, labels, cls_start)
    synthetic = data_dir is None
    card = {
        "name": cfg.name,
        "version": cfg.version,
        "training_data": (
            f"{cfg.cases * (2 if cfg.mixed else 1)} synthetic CT phantoms (inference/phantoms.py, "
            + family_words(cfg)
            + f"seeds {cfg.seed}-{cfg.seed + cfg.cases - 1}),"
            f" {len(imgs)} patches, {len(crops)} labelled nodes"
            if data_dir is None
            else f"site data from {Path(data_dir).name}: {len(crops)} labelled nodes"
        )
        + (
            f"; continued from {parent['name']} {parent['version']}: {parent['training_data']}"
            if parent
            else ""
        ),
        "intended_use": (
            "Demonstration and integration testing of the nodal pipeline. Trained on synthetic "
            "phantoms only; NOT for clinical use, NOT a medical device. Train on your own labelled "
            "CT (e.g. LNQ2023, TCIA CT Lymph Nodes) with `nodal train --data` before any evaluation."
            if synthetic
            else "Site-trained model; validate locally before use."
        ),
        "not_for_clinical_use": synthetic,
        "working_spacing_mm": cfg.working_spacing_mm,
        "segmenter": {
            "architecture": "monai.networks.nets.UNet + 1x1x1 conv head",
            "channels": list(cfg.seg_channels),
            "res_units": 1,
            "roi_size": [96, 96, 96],
            "threshold": 0.5,
        },
        "classifier": {
            "architecture": "inference.networks.NodeClassifier",
            "width": cfg.cls_width,
            "crop_voxels": CROP,
        },
        "plausibility": Rules().to_card(),
        "training": {
            "command": command,
            "initialised_from": parent,
            "config": {k: v for k, v in cfg.__dict__.items()},
            "torch": torch.__version__,
            "monai": monai.__version__,
        },
    }
    return save_model(out_dir, card, seg, cls)
