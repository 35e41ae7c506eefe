"""Model directories: weights plus a model card that names them and pins their checksums.

A model directory holds `model_card.json` and the weight files it lists. Loading refuses a
directory whose card is missing a field or whose weights do not match the card's SHA-256,
so that a node never runs weights nobody can name.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from inference.classify import CROP_KINDS, crop_channels
from inference.necks import Necks
from inference.networks import NodeClassifier, build_segmenter
from inference.plausibility import Rules
from inference.verify import Verifier

CARD_NAME = "model_card.json"
REQUIRED_FIELDS = (
    "name",
    "version",
    "training_data",
    "intended_use",
    "not_for_clinical_use",
    "working_spacing_mm",
    "segmenter",
    "classifier",
    "weights",
)
#: Optional weights: candidate verification (inference.verify) and the crop checker
#: (inference.train_checker), when the model has them.
OPTIONAL_ROLES = {"verifier", "checker"}
DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "nodal-ln-demo"


class ModelCardError(ValueError):
    """The model directory cannot be trusted: card missing or incomplete, checksum mismatch."""


@dataclass(frozen=True)
class Checker:
    """The crop checker (inference.train_checker): node or look-alike."""

    net: nn.Module
    threshold: float  # a candidate scored below this is dropped
    flips: bool = False  # score as the mean over the crop's eight mirror images
    crop: str = "candidate"  # what its crop shows (inference.classify.CROP_KINDS)


@dataclass
class LoadedModel:
    card: dict
    segmenter: nn.Module
    classifier: nn.Module
    device: torch.device
    verifier: Verifier | None = None
    plausibility: Rules | None = None  # the card's plausibility rules (inference.plausibility)
    checker: Checker | None = None

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def version(self) -> str:
        return self.card["version"]

    @property
    def working_spacing(self) -> float:
        return float(self.card["working_spacing_mm"])

    @property
    def classifier_flips(self) -> bool:
        """Whether the classifier scores a node as the mean logit over its crop's eight mirror
        images (the card's `classifier.test_time_flips`; it is trained with random flips)."""
        return bool(self.card["classifier"].get("test_time_flips", False))

    @property
    def segmenter_flips(self) -> tuple[tuple[int, ...], ...]:
        """The mirror images the segmenter's probability is averaged over besides the image
        itself, each as the working grid's axes it flips (0 slices, 1 rows, 2 columns; the
        card's `segmenter.test_time_flips`; it is trained with random flips): () for none."""
        return segmenter_flips(self.card)

    @property
    def threshold(self) -> float:
        """The node probability above which a voxel belongs to a candidate: the threshold its
        checker and verifier were fitted at (the card's `segmenter.threshold`)."""
        return float(self.card["segmenter"].get("threshold", 0.5))

    @property
    def max_slice_spacing_mm(self) -> float | None:
        """Slices further apart than this and the model misses small nodes (the card's
        `limits.max_slice_spacing_mm`, measured); None when the card names no limit."""
        limit = _slice_spacing_limit(self.card)
        return None if limit is None else float(limit)

    @property
    def necks(self) -> Necks | None:
        """Where a segmented component is split to judge its parts (`inference.necks`); None:
        components are not split."""
        return Necks.from_card(self.card["segmenter"].get("necks"))


def segmenter_flips(card: dict) -> tuple[tuple[int, ...], ...]:
    """The card's `segmenter.test_time_flips`, checked: a list of distinct non-empty lists
    of distinct axes 0-2."""
    flips = card["segmenter"].get("test_time_flips", [])
    groups = tuple(tuple(group) for group in flips) if isinstance(flips, list) else None
    if (
        groups is None
        or any(
            not g or len(set(g)) != len(g) or any(type(a) is not int or a not in (0, 1, 2) for a in g)
            for g in groups
        )
        or len(set(map(frozenset, groups))) != len(groups)
    ):
        raise ModelCardError(
            f"segmenter.test_time_flips must be a list of distinct lists of axes 0-2, not {flips!r}"
        )
    return groups


def _slice_spacing_limit(card: dict):
    """The card's `limits.max_slice_spacing_mm` as written (None: no limit)."""
    return (card.get("limits") or {}).get("max_slice_spacing_mm")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_card(model_dir: Path, card: dict) -> None:
    """Replace the card in one step: a reader (a worker loading the model, the status page)
    sees the old card or the new one, never half of it."""
    tmp = model_dir / f".{CARD_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, model_dir / CARD_NAME)


@contextmanager
def _changed_card(model_dir: Path) -> Iterator[dict]:
    """The card to change in place, read and written back under the model directory's lock,
    so that two writers at once (evaluations recording side by side on a machine's cores, a
    rule set while one records) both land. A change of what decides the findings
    (`_findings_basis`) drops the card's evaluations, which measured the model before it, as
    a new version does (`_set_version`). No card is written if the change raises (weight
    files it wrote or removed before stay as they are)."""
    try:
        fd = os.open(model_dir, os.O_RDONLY)
    except FileNotFoundError:
        raise ModelCardError(f"no model directory {model_dir}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        card = read_card(model_dir)
        before = _findings_basis(card)
        yield card
        if _findings_basis(card) != before:
            card.pop("evaluation", None)
        write_card(model_dir, card)
    finally:
        os.close(fd)  # releases the lock


def _findings_basis(card: dict) -> str:
    """What in a card decides a model's findings and their figures: its weights, working grid,
    networks' settings (necks included), the checker's use and the plausibility rules (not
    how or when they were set)."""
    checker = {k: v for k, v in card.get("checker", {}).items() if k not in ("set", "taken_from")}
    classifier = {k: v for k, v in card.get("classifier", {}).items() if k != "set"}
    segmenter = {k: v for k, v in card.get("segmenter", {}).items() if k != "set"}
    basis = [card.get(k) for k in ("weights", "working_spacing_mm", "plausibility")]
    return json.dumps([*basis, segmenter, classifier, checker], sort_keys=True)


def read_card(model_dir: Path) -> dict:
    """Read and check the card and the checksums of the weights it lists."""
    model_dir = Path(model_dir)
    card_path = model_dir / CARD_NAME
    if not card_path.is_file():
        raise ModelCardError(f"no {CARD_NAME} in model directory {model_dir}; every model needs a card")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelCardError(f"{card_path} is not valid JSON: {e}") from e
    missing = [k for k in REQUIRED_FIELDS if k not in card]
    if missing:
        raise ModelCardError(f"{card_path} lacks the field(s) {', '.join(missing)}")
    limit = _slice_spacing_limit(card)
    if limit is not None and not (isinstance(limit, int | float) and math.isfinite(limit) and limit > 0):
        raise ModelCardError(
            f"{card_path}: limits.max_slice_spacing_mm must be a number above 0, not {limit!r}"
        )
    for role in ("segmenter", "classifier", *(OPTIONAL_ROLES & card["weights"].keys())):
        entry = card["weights"].get(role)
        if not entry or "file" not in entry or "sha256" not in entry:
            raise ModelCardError(f"{card_path}: weights.{role} needs 'file' and 'sha256'")
        path = model_dir / entry["file"]
        if not path.is_file():
            raise ModelCardError(f"weights file {entry['file']} named by the card is missing")
        actual = sha256(path)
        if actual != entry["sha256"]:
            raise ModelCardError(
                f"checksum of {entry['file']} is {actual[:12]}..., the card says "
                f"{entry['sha256'][:12]}...; the weights were changed or the card is stale"
            )
    return card


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def load_model(model_dir: Path | None = None, device: str = "auto") -> LoadedModel:
    model_dir = Path(model_dir or DEFAULT_MODEL_DIR)
    card = read_card(model_dir)
    dev = pick_device(device)
    seg = build_segmenter(tuple(card["segmenter"]["channels"]), card["segmenter"]["res_units"])
    cls = NodeClassifier(card["classifier"]["width"])
    for role, net in (("segmenter", seg), ("classifier", cls)):
        _load_weights(net, model_dir / card["weights"][role]["file"], dev)
    entry = card["weights"].get("verifier")
    verifier = Verifier.load(model_dir / entry["file"]) if entry else None
    checker = _load_checker(model_dir, card, dev)
    try:
        rules = Rules.from_card(card.get("plausibility"))
    except (TypeError, ValueError) as e:
        raise ModelCardError(f"{model_dir / CARD_NAME}: plausibility: {e}") from e
    try:
        Necks.from_card(card["segmenter"].get("necks"))
    except ValueError as e:
        raise ModelCardError(f"{model_dir / CARD_NAME}: segmenter.necks: {e}") from e
    try:
        segmenter_flips(card)
    except ModelCardError as e:
        raise ModelCardError(f"{model_dir / CARD_NAME}: {e}") from e
    return LoadedModel(
        card=card,
        segmenter=seg,
        classifier=cls,
        device=dev,
        verifier=verifier,
        plausibility=rules,
        checker=checker,
    )


def _load_checker(model_dir: Path, card: dict, dev: torch.device) -> Checker | None:
    entry = card["weights"].get("checker")
    if entry is None:
        return None
    spec = card.get("checker") or {}
    if "width" not in spec or "threshold" not in spec:
        raise ModelCardError(
            f"{model_dir / CARD_NAME}: weights.checker needs checker.width and checker.threshold"
        )
    crop = spec.get("crop", "candidate")  # cards from before the choice: the candidate's crop
    if crop not in CROP_KINDS:
        raise ModelCardError(f"{model_dir / CARD_NAME}: checker.crop {crop!r} is not one of {CROP_KINDS}")
    shape = NodeClassifier(int(spec["width"]), in_channels=crop_channels(crop))
    try:
        net = _load_weights(shape, model_dir / entry["file"], dev)
    except RuntimeError as e:  # weights of another shape: the card's crop is not theirs
        raise ModelCardError(
            f"{model_dir / CARD_NAME}: {entry['file']} is not a width-{spec['width']} checker "
            f"on {crop_channels(crop)} channels (checker.crop {crop!r})"
        ) from e
    return Checker(net, float(spec["threshold"]), bool(spec.get("test_time_flips", False)), crop)


def _load_weights(net: nn.Module, path: Path, dev: torch.device) -> nn.Module:
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.to(dev).eval()


def _save_weights(net: nn.Module, path: Path) -> dict:
    """Write `net`'s state dict to `path`; the card's entry for it (file and SHA-256)."""
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, path)
    return {"file": path.name, "sha256": sha256(path)}


def _with_checker_of(model_dir: Path, card: dict, source: Path) -> dict:
    """`card` with the checker of the model in `source`, its weights copied into `model_dir`
    (`read_card` has checked them against their card)."""
    theirs = read_card(source)
    entry = theirs.get("weights", {}).get("checker")
    if entry is None:
        raise ModelCardError(f"{source}: the model has no checker to take")
    if theirs.get("working_spacing_mm") != card.get("working_spacing_mm"):
        raise ModelCardError(f"{source}: its checker sees crops on another working grid than {model_dir}'s")
    shutil.copyfile(source / entry["file"], model_dir / entry["file"])
    card["weights"]["checker"] = dict(entry)
    card["checker"] = {
        **theirs["checker"],
        "taken_from": {"name": theirs["name"], "version": theirs["version"]},
    }
    card["checker"].pop("set", None)
    return card


def _set_version(card: dict, version: str | None) -> None:
    """Give the card a new `version` (None: unchanged). The evaluations it carries measured
    the model before the change, so a new version drops them: a card's figures are always
    its own version's."""
    if version is not None and version != card.get("version"):
        card["version"] = version
        card.pop("evaluation", None)


def add_checker(
    model_dir: Path,
    checker: nn.Module,
    width: int,
    threshold: float,
    fit_report: dict,
    version: str | None = None,
    flips: bool = False,
    crop: str = "candidate",
) -> Path:
    """Store the checker's weights in the model directory and pin them, its threshold, its
    scoring (`flips`: over the crop's mirror images), what its crop shows (`crop`, one of
    `inference.classify.CROP_KINDS`) and how it was fitted in the card;
    `version`, when given, becomes the card's version (a model with a checker finds other
    nodes than the model without it)."""
    model_dir = Path(model_dir)
    path = model_dir / "checker.pt"
    with _changed_card(model_dir) as card:
        _set_version(card, version)
        card["weights"]["checker"] = _save_weights(checker, path)
        card["checker"] = {
            "architecture": "inference.networks.NodeClassifier",
            "width": width,
            "threshold": threshold,
            "test_time_flips": flips,
            "crop": crop,
            "fit": fit_report,
        }
    return path


def set_checker(
    model_dir: Path,
    threshold: float | None = None,
    without_verifier: bool = False,
    version: str | None = None,
    command: str = "",
    source: Path | None = None,
) -> dict:
    """Change how a model's checker is used: its `threshold` (the one its fit chose stays in
    `checker.fit`), and, `without_verifier`, let it judge every candidate alone (the
    verifier's weights and card entry are removed). `source`: first take the checker of that
    model directory (its weights, checked against its card, and its card entry, fit
    included), e.g. to keep a checker when the segmenter is trained on. Returns the card's
    checker entry."""
    model_dir = Path(model_dir)
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise ValueError(f"checker threshold must lie between 0 and 1, not {threshold}")
    with _changed_card(model_dir) as card:
        if source is not None:
            _with_checker_of(model_dir, card, Path(source))
        if "checker" not in card.get("weights", {}):
            raise ModelCardError(f"{model_dir}: the model has no checker (nodal train-checker adds one)")
        checker = card["checker"]
        if threshold is not None:
            checker["threshold"] = threshold
        if without_verifier:
            entry = card["weights"].pop("verifier", None)
            card.pop("verifier", None)
            if entry is not None:
                (model_dir / entry["file"]).unlink(missing_ok=True)
            checker["alone"] = True  # it judges every candidate the segmenter finds
        _set_version(card, version)
        checker["set"] = {"threshold": checker["threshold"], "alone": bool(checker.get("alone"))}
        if command:
            checker["set"]["command"] = command
    return checker


def set_classifier(model_dir: Path, flips: bool, version: str | None = None, command: str = "") -> dict:
    """Change how a model's classifier scores a node: `flips`, as the mean logit over its
    crop's eight mirror images (`LoadedModel.classifier_flips`). Returns the card's
    classifier entry."""
    with _changed_card(Path(model_dir)) as card:
        classifier = card["classifier"]
        classifier.pop("test_time_flips", None)  # off is the default: a card without it is the same
        if flips:
            classifier["test_time_flips"] = True
        _set_version(card, version)
        classifier["set"] = {"test_time_flips": bool(flips), **({"command": command} if command else {})}
    return classifier


def set_segmenter(
    model_dir: Path, flips: list[tuple[int, ...]], version: str | None = None, command: str = ""
) -> dict:
    """Change how a model's segmenter is run: its probability averaged over the image and
    the mirror images `flips` (`LoadedModel.segmenter_flips`; [] for the image alone).
    Returns the card's segmenter entry."""
    with _changed_card(Path(model_dir)) as card:
        segmenter = card["segmenter"]
        segmenter.pop("test_time_flips", None)  # none is the default: a card without it is the same
        if flips:
            segmenter["test_time_flips"] = [list(g) for g in flips]
        segmenter_flips(card)  # checked before it is written
        _set_version(card, version)
        segmenter["set"] = {
            "test_time_flips": [list(g) for g in flips],
            **({"command": command} if command else {}),
        }
    return segmenter


#: What the card keeps of an evaluation (`inference.evaluate`, `inference.evaluate_data`).
EVALUATION_FIGURES = (
    "cases",
    "seeds",
    "generator_revision",
    "data",
    "nodes_short_axis_ge_5mm",
    "sensitivity",
    "fp_per_volume",
    "dice",
    "short_axis_mae_mm",
    "short_axis_bias_mm",
    "long_axis_mae_mm",
    "volume_mape",
    "auc",
    "auc_size_rule",
    "hit_rule",
)


def evaluation_name(result: dict) -> str:
    """The card's name for a phantom evaluation: its family and seeds, and the training
    generator's revision from 2 on (the same seeds make other phantoms; revision 1's entries
    keep their names)."""
    name = f"{result['family']} family, seeds {result['seeds'][0]}-{result['seeds'][1]}"
    if result.get("generator_revision", 1) > 1:
        name += f", revision {result['generator_revision']}"
    return name


def record_evaluation(model_dir: Path | None, name: str, result: dict, command: str, date: str) -> dict:
    """Keep an evaluation's headline figures in the card's `evaluation` entry under `name`
    (a phantom family and its seeds, or a site's dataset), with the command and date that
    produced them; a later evaluation of the same name replaces it. Returns the entry."""
    model_dir = Path(model_dir or DEFAULT_MODEL_DIR)
    entry = {k: result[k] for k in EVALUATION_FIGURES if k in result} | {"command": command, "date": date}
    with _changed_card(model_dir) as card:
        card.setdefault("evaluation", {})[name] = entry
    return entry


def add_verifier(model_dir: Path, verifier: Verifier, fit_report: dict) -> Path:
    """Store `verifier` in the model directory and pin it in the card."""
    model_dir = Path(model_dir)
    with _changed_card(model_dir) as card:
        path = verifier.save(model_dir, fit_report)
        card["weights"]["verifier"] = {"file": path.name, "sha256": sha256(path)}
        card["verifier"] = {"module": "inference.verify", "fit": fit_report}
        if "checker" in card:
            card["checker"]["alone"] = False  # the verifier judges first again
    return path


def save_model(model_dir: Path, card: dict, segmenter: nn.Module, classifier: nn.Module) -> Path:
    """Write weights and a card with their checksums (the card fields come from the caller)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    card = dict(card)
    card["weights"] = {}
    for role, net in (("segmenter", segmenter), ("classifier", classifier)):
        card["weights"][role] = _save_weights(net, model_dir / f"{role}.pt")
    write_card(model_dir, card)
    return model_dir


def set_necks(model_dir: Path, necks: Necks | None, version: str | None = None) -> dict:
    """Write where segmented components are split (`inference.necks`) into the card's
    `segmenter.necks`, None removing it, and optionally a new version."""
    with _changed_card(Path(model_dir)) as card:
        if necks is None:
            card["segmenter"].pop("necks", None)
        else:
            card["segmenter"]["necks"] = necks.to_card()
        _set_version(card, version)
    return card


def set_plausibility(model_dir: Path, rules: Rules | None) -> dict:
    """Write the plausibility rules (inference.plausibility) into the card; None removes them
    (other rules find other nodes: a change drops the card's evaluations, `_changed_card`)."""
    with _changed_card(Path(model_dir)) as card:
        if rules is None:
            card.pop("plausibility", None)
        else:
            card["plausibility"] = rules.to_card()
    return card
