"""The `nodal` command."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from pathlib import Path

from dicom_node.config import ConfigError, Settings, load_settings
from dicom_node.observe.logs import configure_logging

log = logging.getLogger("nodal")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given, for `invocation`
    try:
        settings = load_settings(args.config)
    except ConfigError as e:
        print(f"nodal: {e}", file=sys.stderr)
        return 2
    configure_logging(settings)
    try:
        return args.func(args, settings) or 0
    except (ValueError, FileNotFoundError) as e:  # VolumeError, ModelCardError, ... are ValueErrors
        print(f"nodal: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


CONFIG_HELP = "YAML configuration (default: $NODAL_CONFIG or embedded defaults)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nodal", description="DICOM AI node for lymph nodes on CT")
    p.add_argument("--config", help=CONFIG_HELP)
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    c = sub.add_parser("process", help="analyse one CT series offline and write the results")
    c.add_argument("input", type=Path, help="folder (or file) with the DICOM instances of one CT series")
    c.add_argument("--out", type=Path, required=True, help="folder for findings.json and the DICOM results")
    c.set_defaults(func=cmd_process)

    c = sub.add_parser("demo", help="generate a phantom CT study and process it offline (no node needed)")
    c.add_argument("--seed", type=int, default=2_000_000)
    c.add_argument("--dir", type=Path, default=None, help="work folder (default: <data_dir>/demo)")
    c.set_defaults(func=cmd_demo)

    c = sub.add_parser("phantom", help="write a synthetic CT phantom series and its ground truth")
    c.add_argument("--seed", type=int, required=True)
    c.add_argument("--out", type=Path, required=True)
    # defaults of the geometry options: inference.phantoms.PhantomSpec's
    c.add_argument("--rows", type=int, default=None, help="rows and columns")
    c.add_argument("--slices", type=int, default=None)
    c.add_argument("--pixel-spacing", type=float, default=None)
    c.add_argument("--slice-spacing", type=float, default=None)
    c.add_argument(
        "--format",
        choices=["dicom", "nnunet", "dicom-seg"],
        default="dicom",
        help="dicom: one CT series and ground_truth.json; nnunet: an nnU-Net raw dataset; "
        "dicom-seg: CT series with a DICOM SEG each (see docs/training.md)",
    )
    c.add_argument("--count", type=int, default=1, help="phantoms (seeds from --seed) in the dataset")
    c.add_argument("--test-count", type=int, default=0, help="nnunet: further phantoms in imagesTs/labelsTs")
    c.add_argument("--one-segment", action="store_true", help="dicom-seg: one segment for all nodes")
    c.set_defaults(func=cmd_phantom)

    c = sub.add_parser("train", help="train the segmenter and classifier, write a model directory")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument(
        "--data",
        type=Path,
        default=None,
        help="site data: cases.json, nnU-Net raw dataset or CT with DICOM SEG (default: phantoms)",
    )
    # defaults of the training options: inference.train.TrainConfig's (None: not given)
    c.add_argument("--cases", type=int, default=None, help="number of phantoms (ignored with --data)")
    c.add_argument("--seed", type=int, default=None)
    c.add_argument(
        "--seg-steps", type=int, default=None, help="0 with --init-from: keep its segmenter as it is"
    )
    c.add_argument("--cls-epochs", type=int, default=None)
    c.add_argument("--seg-lr", type=float, default=None, help="peak learning rate of the segmenter")
    c.add_argument(
        "--hard-share",
        type=float,
        default=None,
        help="share of segmenter patches centred on node-like tissue that is not a node",
    )
    c.add_argument(
        "--node-share", type=float, default=None, help="share of segmenter patches centred on a node"
    )
    c.add_argument(
        "--mined-share",
        type=float,
        default=None,
        help="share of segmenter patches centred on the false positives of the --init-from model",
    )
    c.add_argument(
        "--node-power",
        type=float,
        default=None,
        help="draw the node of a node patch with weight (its voxels) ** POWER: 1 (default) each node "
        "voxel alike, which favours large nodes; 0 each node alike",
    )
    c.add_argument("--per-node", action="store_true", help="the same as --node-power 0")
    c.add_argument(
        "--thick-share",
        type=float,
        default=None,
        help="share of segmenter batches seen as slices 3-5 mm thick would show them",
    )
    c.add_argument(
        "--augment",
        type=float,
        default=None,
        help="probability of each of a subset of nnU-Net's augmentations (rotation and scaling, noise, "
        "blur) per segmenter item",
    )
    c.add_argument(
        "--init-from", type=Path, default=None, help="model directory to continue training from (fine-tuning)"
    )
    c.add_argument(
        "--fresh-classifier",
        action="store_true",
        help="with --init-from: train the classifier from random weights (the segmenter continues)",
    )
    c.add_argument(
        "--variety",
        action="store_true",
        help="domain-randomised phantoms (inference.phantoms.variety_spec: anatomy, patient size, "
        "spacing, kernel, noise, metal; docs/model.md)",
    )
    c.add_argument(
        "--mixed",
        action="store_true",
        help="both phantoms of every seed, the plain and the domain-randomised one (twice the phantoms)",
    )
    c.add_argument("--version", default=None)
    c.add_argument("--name", default=None)
    c.add_argument(
        "--verifier-cases", type=int, default=32, help="phantoms to fit the candidate verifier on (0: none)"
    )
    c.set_defaults(func=cmd_train)

    c = sub.add_parser(
        "train-verifier", help="fit the candidate verifier of an existing model on training phantoms"
    )
    c.add_argument("--model-dir", type=Path, required=True)
    c.add_argument("--cases", type=int, default=32)
    c.add_argument(
        "--keep-share",
        type=float,
        default=None,
        help="share of true nodes the threshold keeps",
    )
    c.add_argument(
        "--cross-validate", action="store_true", help="only print 4-fold figures for several keep shares"
    )
    c.add_argument("--variety", action="store_true", help="fit on domain-randomised phantoms (variety_spec)")
    c.add_argument(
        "--mixed",
        action="store_true",
        help="fit on a plain and a domain-randomised phantom from each seed (twice --cases phantoms)",
    )
    c.set_defaults(func=cmd_train_verifier)

    c = sub.add_parser(
        "train-checker",
        help="fit the checker (a CNN on each candidate's crop: node or look-alike) of an existing model",
    )
    c.add_argument("--model-dir", type=Path, required=True)
    c.add_argument("--cases", type=int, help="seeds; each gives a plain and a variety phantom")
    c.add_argument("--keep-share", type=float, help="share of the verifier's nodes kept, out of fold")
    c.add_argument("--epochs", type=int)
    c.add_argument("--version", default=None, help="the card's version with the checker (default: unchanged)")
    c.set_defaults(func=cmd_train_checker)

    c = sub.add_parser(
        "checker",
        help="set a model's checker threshold, or let the checker judge candidates without the verifier",
    )
    c.add_argument("--model-dir", type=Path, required=True)
    c.add_argument(
        "--threshold", type=float, default=None, help="keep candidates the checker scores at least this"
    )
    c.add_argument(
        "--without-verifier",
        action="store_true",
        help="remove the verifier: the checker judges every candidate the segmenter finds",
    )
    c.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=None,
        help="first take the checker of this model directory (e.g. after training the segmenter on)",
    )
    c.add_argument("--version", default=None, help="the card's new version (default: unchanged)")
    c.set_defaults(func=cmd_checker)

    c = sub.add_parser(
        "classifier", help="set how a model's classifier scores a node (test-time mirror images)"
    )
    c.add_argument("--model-dir", type=Path, required=True)
    c.add_argument(
        "--test-time-flips",
        choices=("on", "off"),
        required=True,
        help="on: a node's score is the mean logit over its crop's eight mirror images",
    )
    c.add_argument("--version", default=None, help="the card's new version (default: unchanged)")
    c.set_defaults(func=cmd_classifier)

    c = sub.add_parser("segmenter", help="set how a model's segmenter is run (test-time mirror images)")
    c.add_argument("--model-dir", type=Path, required=True)
    c.add_argument(
        "--test-time-flips",
        required=True,
        help="the mirror images the probability is averaged over besides the image, comma-separated, "
        "each the axes it flips (z slices, y rows, x columns): 'x' (left-right), 'x,y', 'x,y,xy'; "
        "'none': the image alone",
    )
    c.add_argument("--version", default=None, help="the card's new version (default: unchanged)")
    c.set_defaults(func=cmd_segmenter)

    c = sub.add_parser(
        "plausibility", help="write the plausibility rules (inference.plausibility) into a model's card"
    )
    c.add_argument("--model-dir", type=Path, required=True)
    c.add_argument("--off", nargs="*", default=[], metavar="RULE", help="rules to store switched off")
    c.add_argument("--remove", action="store_true", help="remove the rules from the card (none applied)")
    c.set_defaults(func=cmd_plausibility)

    c = sub.add_parser(
        "necks", help="split segmented components at narrow necks (inference.necks): write it into a card"
    )
    c.add_argument("--model-dir", type=Path, required=True)
    c.add_argument("--ratio", type=float, help="split at a bridge thinner than this share of a part")
    c.add_argument("--max-neck-mm", type=float, help="and no deeper than this from the edge (mm)")
    c.add_argument("--part-threshold", type=float, help="checker threshold for a part of a rejected whole")
    c.add_argument("--remove", action="store_true", help="remove it from the card (components are not split)")
    c.add_argument("--version", default=None, help="the card's new version (default: unchanged)")
    c.set_defaults(func=cmd_necks)

    c = sub.add_parser("evaluate", help="score a model on held-out phantoms")
    c.add_argument("--cases", type=int, default=20)
    c.add_argument("--seed", type=int, default=None, help="first seed (default: the first held-out seed)")
    c.add_argument("--json", action="store_true", help="print JSON only")
    c.add_argument(
        "--data", type=Path, default=None, help="score on a site's labelled cases instead (as train --data)"
    )
    c.add_argument(
        "--split",
        choices=["auto", "train", "test", "verifier"],
        default="auto",
        help="with --data: which cases (auto: the test split where there is one, else the training cases)",
    )
    c.add_argument(
        "--record",
        action="store_true",
        help="keep the headline figures, with this command and today's date, in the model's card",
    )
    c.add_argument(
        "--family",
        choices=("train", "variety", "heldout", "both"),
        default="train",
        help="phantom family: train (the generator of the training data, on unseen seeds), variety "
        "(the same generator, domain-randomised), heldout (an independent generator never used for "
        "training or fitting), or both (train and heldout) side by side",
    )
    c.set_defaults(func=cmd_evaluate)

    # --- follow-up studies (issue 17): the comparison scored on phantom pairs -------------
    c = sub.add_parser(
        "evaluate-followup", help="score the follow-up comparison on phantom pairs of known truth"
    )
    c.add_argument("--pairs", type=int, default=12, help="phantom pairs (scenarios in turn)")
    c.add_argument("--seed", type=int, default=None, help="first seed (default: the first follow-up seed)")
    c.add_argument("--json", action="store_true", help="print JSON on one line")
    c.set_defaults(func=cmd_evaluate_followup)
    # --- end of follow-up block ------------------------------------------------------------

    c = sub.add_parser("config", help="check the configuration and print the effective values")
    c.set_defaults(func=cmd_config)

    c = sub.add_parser("serve", help="run the node: DIMSE and STOW-RS receivers, workers, delivery, REST API")
    c.set_defaults(func=cmd_serve)

    c = sub.add_parser("worker", help="run one Celery worker (queue.backend: celery): one job at a time")
    c.add_argument("--gpu", type=int, default=None, help="bind to this GPU (sets CUDA_VISIBLE_DEVICES)")
    c.add_argument("--name", default=None, help="worker name in logs and jobs.worker (default: gpuN or cpu)")
    c.set_defaults(func=cmd_worker)

    c = sub.add_parser("db", help="index schema: `nodal db upgrade` migrates it, `nodal db current` shows it")
    c.add_argument("action", choices=["upgrade", "current"])
    c.set_defaults(func=cmd_db)

    c = sub.add_parser("echo", help="C-ECHO a DICOM peer: a destination name or AE@HOST:PORT")
    c.add_argument("peer", help="destination name from the configuration, or AE@HOST:PORT")
    c.add_argument("--timeout", type=float, default=10.0)
    c.set_defaults(func=cmd_echo)

    c = sub.add_parser(
        "retrieve", help="fetch a study from the PACS (query destination) and analyse it, with its prior"
    )
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", help="Study Instance UID")
    which.add_argument("--accession", help="Accession Number")
    c.add_argument(
        "--node", default=None, help="the running node's HTTP base (default: http://127.0.0.1:<http_port>)"
    )
    c.set_defaults(func=cmd_retrieve)
    for command in sub.choices.values():  # `nodal serve --config FILE` as well as `nodal --config FILE serve`
        command.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
    return p


def _given(args: argparse.Namespace, **fields: str) -> dict:
    """The options given on the command line, by the dataclass field they set; the others
    keep the dataclass's default (one fact, one place)."""
    return {field: getattr(args, arg) for field, arg in fields.items() if getattr(args, arg) is not None}


def findings_table(doc: dict) -> str:
    head = f"{'node':<6} {'short mm':>8} {'long mm':>8} {'vol mm3':>9} {'HU':>6} {'p(malig)':>8}  size class"
    lines = [f"model {doc['model']['name']} {doc['model']['version']}: {len(doc['nodes'])} node(s)", head]
    for n in doc["nodes"]:
        lines.append(
            f"{n['label']:<6} {n['short_axis_mm']:>8.1f} {n['long_axis_mm']:>8.1f} {n['volume_mm3']:>9.0f} "
            f"{n['mean_hu']:>6.0f} {n['malignancy_probability']:>8.2f}  {n['size_category']}"
        )
    return "\n".join(lines)


def cmd_process(args, settings: Settings) -> int:
    from dicom_node.jobs.analysis import process

    doc = process(args.input, args.out, settings)
    print(findings_table(doc))
    print(f"results in {args.out}: findings.json, {', '.join(doc['result_files'])}")
    return 0


def cmd_phantom(args, settings: Settings) -> int:
    from inference import phantoms

    geometry = _given(
        args,
        rows="rows",
        columns="rows",
        slices="slices",
        pixel_spacing_mm="pixel_spacing",
        slice_spacing_mm="slice_spacing",
    )
    spec = phantoms.PhantomSpec(**geometry)
    if args.format != "dicom":
        return phantom_dataset(args, spec)
    if args.count != 1 or args.test_count:
        raise ValueError("--format dicom writes one phantom; use --format nnunet or dicom-seg for more")
    ph = phantoms.generate(args.seed, spec)
    paths = phantoms.write_phantom(ph, args.out / "dicom")
    (args.out / "ground_truth.json").write_text(json.dumps(ph.ground_truth(), indent=2) + "\n")
    print(f"{len(paths)} CT slices and ground truth ({len(ph.nodes)} nodes) in {args.out}")
    return 0


def phantom_dataset(args, spec) -> int:
    """`nodal phantom --format nnunet|dicom-seg`: phantoms as a site's labelled dataset."""
    from inference import dataset_export, phantoms

    if args.count < 1 or args.test_count < 0:
        raise ValueError("--count must be at least 1 and --test-count at least 0")
    seeds = range(args.seed, args.seed + args.count + args.test_count)
    generated = [phantoms.generate(s, spec) for s in seeds]
    train, test = generated[: args.count], generated[args.count :]
    if args.format == "nnunet":
        dataset_export.export_nnunet(train, args.out, test)
    else:
        if test:
            raise ValueError(
                "--test-count is for --format nnunet; write test phantoms to a folder of their own"
            )
        dataset_export.export_dicom_seg(train, args.out, per_node=not args.one_segment)
    nodes = sum(len(ph.nodes) for ph in generated)
    print(f"{len(generated)} phantom(s) with {nodes} nodes as a {args.format} dataset in {args.out}")
    return 0


def cmd_demo(args, settings: Settings) -> int:
    from inference import phantoms

    work = args.dir or settings.node.data_dir / "demo"
    ct = work / f"phantom-{args.seed}"
    if not (ct / "dicom").is_dir():
        ph = phantoms.generate(args.seed)
        phantoms.write_phantom(ph, ct / "dicom")
        (ct / "ground_truth.json").write_text(json.dumps(ph.ground_truth(), indent=2) + "\n")
    truth = json.loads((ct / "ground_truth.json").read_text())
    from dicom_node.jobs.analysis import process

    doc = process(ct / "dicom", work / "results", settings)
    print(findings_table(doc))
    print(f"\nground truth ({ct / 'ground_truth.json'}):")
    for n in sorted(truth["nodes"], key=lambda n: -n["volume_mm3"]):
        print(
            f"  {n['station']:<12} short {n['short_axis_mm']:5.1f} mm  long {n['long_axis_mm']:5.1f} mm"
            f"  {'malignant' if n['malignant_criterion'] else 'benign'}"
        )
    print(f"results in {work / 'results'}")
    return 0


def cmd_train(args, settings: Settings) -> int:
    from inference.train import TrainConfig, train

    if args.mixed and (args.variety or args.data is not None):
        print(
            "nodal: --mixed trains on both kinds of phantom; it takes neither --variety nor --data",
            file=sys.stderr,
        )
        return 2
    if args.per_node and args.node_power is not None:
        print("nodal: --per-node is --node-power 0; give one of them", file=sys.stderr)
        return 2
    if args.per_node:
        args.node_power = 0.0

    given = _given(
        args,
        cases="cases",
        seed="seed",
        seg_steps="seg_steps",
        cls_epochs="cls_epochs",
        seg_lr="seg_lr",
        hard_share="hard_share",
        node_share="node_share",
        mined_share="mined_share",
        node_power="node_power",
        thick_share="thick_share",
        augment="augment",
        version="version",
        name="name",
    )
    cfg = TrainConfig(
        **given,
        fresh_classifier=args.fresh_classifier,
        patches_per_case=0 if args.seg_steps == 0 else TrainConfig.patches_per_case,
        init_from=str(args.init_from) if args.init_from else None,
        variety=args.variety,
        mixed=args.mixed,
    )
    command = invocation(args, "train")
    out = train(args.out, cfg, args.data, command=command, cache_dir=settings.node.data_dir / "train-cache")
    print(f"model written to {out}")
    if args.verifier_cases and args.data is None:
        args.model_dir, args.cases, args.keep_share = out, args.verifier_cases, None
        return cmd_train_verifier(args, settings)
    if args.data is not None:
        from inference.train_verifier import train_verifier_on_site

        report = train_verifier_on_site(out, args.data)
        print(
            json.dumps({"verifier": report})
            if report
            else "candidate verifier not fitted: the data has no verifier cases (cases.json's "
            "verifier_cases, see docs/training.md)"
        )
    return 0


def cmd_train_verifier(args, settings: Settings) -> int:
    from inference.train_verifier import train_verifier

    cache = settings.node.data_dir / "train-cache"
    if getattr(args, "cross_validate", False):
        from inference.train_verifier import cross_validate, training_parts

        mixed = getattr(args, "mixed", False)
        parts = training_parts(args.model_dir, args.cases, cache_dir=cache, variety=args.variety, mixed=mixed)
        print(json.dumps({"cross_validation": cross_validate(parts, (0.95, 0.97, 0.98))}))
        return 0
    keep_share = args.keep_share
    if keep_share is None:  # train_verifier's own default
        keep_share = inspect.signature(train_verifier).parameters["keep_share"].default
    command = f"nodal train-verifier --model-dir {args.model_dir} --cases {args.cases}"
    command += f" --keep-share {keep_share}" + (" --variety" if getattr(args, "variety", False) else "")
    command += " --mixed" if getattr(args, "mixed", False) else ""
    report = train_verifier(
        args.model_dir,
        args.cases,
        keep_share=keep_share,
        cache_dir=cache,
        command=command,
        variety=getattr(args, "variety", False),
        mixed=getattr(args, "mixed", False),
    )
    print(json.dumps({"verifier": report}))
    return 0


def cmd_train_checker(args, settings: Settings) -> int:
    from inference.train_checker import train_checker

    defaults = inspect.signature(train_checker).parameters  # train_checker's own defaults
    chosen = {
        name: defaults[name].default if value is None else value
        for name, value in (("cases", args.cases), ("keep_share", args.keep_share), ("epochs", args.epochs))
    }
    command = (
        f"nodal train-checker --model-dir {args.model_dir} --cases {chosen['cases']}"
        f" --keep-share {chosen['keep_share']} --epochs {chosen['epochs']}"
    ) + (f" --version {args.version}" if args.version else "")
    report = train_checker(
        args.model_dir,
        cache_dir=settings.node.data_dir / "train-cache",
        command=command,
        version=args.version,
        **chosen,
    )
    print(json.dumps({"checker": report}))
    return 0


def cmd_checker(args, settings: Settings) -> int:
    from inference.model_store import set_checker

    command = invocation(args, "checker")
    checker = set_checker(
        args.model_dir, args.threshold, args.without_verifier, args.version, command, args.source
    )
    print(json.dumps({"checker": {k: v for k, v in checker.items() if k != "fit"}}))
    return 0


def cmd_classifier(args, settings: Settings) -> int:
    from inference.model_store import set_classifier

    command = invocation(args, "classifier")
    classifier = set_classifier(args.model_dir, args.test_time_flips == "on", args.version, command)
    print(json.dumps({"classifier": classifier}))
    return 0


def mirror_axes(text: str) -> list[tuple[int, ...]]:
    """`nodal segmenter --test-time-flips`: 'none', or groups of axis letters ('x,y,xy')."""
    if text.strip() == "none":
        return []
    axes = {"z": 0, "y": 1, "x": 2}
    groups = [g.strip() for g in text.split(",")]
    if not all(groups) or any(c not in axes for g in groups for c in g):
        raise ValueError(f"--test-time-flips: 'none' or comma-separated groups of z, y, x, not {text!r}")
    return [tuple(sorted(axes[c] for c in g)) for g in groups]


def cmd_segmenter(args, settings: Settings) -> int:
    from inference.model_store import set_segmenter

    command = invocation(args, "segmenter")
    try:
        segmenter = set_segmenter(args.model_dir, mirror_axes(args.test_time_flips), args.version, command)
    except ValueError as e:  # a ModelCardError too
        print(f"nodal segmenter: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"segmenter": segmenter}))
    return 0


def cmd_plausibility(args, settings: Settings) -> int:
    from inference.model_store import set_plausibility
    from inference.plausibility import RULES, Rules

    unknown = sorted(set(args.off) - set(RULES))
    if unknown:
        print(f"nodal: unknown rule(s) {', '.join(unknown)}; known: {', '.join(RULES)}", file=sys.stderr)
        return 2
    card = set_plausibility(args.model_dir, None if args.remove else Rules(off=tuple(args.off)))
    print(json.dumps({"plausibility": card.get("plausibility")}))
    return 0


def cmd_necks(args, settings: Settings) -> int:
    from inference.model_store import set_necks
    from inference.necks import FIELDS, Necks

    given = {name: getattr(args, name) for name in FIELDS if getattr(args, name) is not None}
    if args.remove == bool(given):
        print("nodal: give --ratio, --max-neck-mm and --part-threshold, or --remove", file=sys.stderr)
        return 2
    try:
        entry = None if args.remove else given
        necks = Necks.from_card(entry)
    except ValueError as e:
        print(f"nodal: necks: {e}", file=sys.stderr)
        return 2
    card = set_necks(args.model_dir, necks, args.version)
    print(json.dumps({"version": card["version"], "necks": card["segmenter"].get("necks")}))
    return 0


def cmd_evaluate(args, settings: Settings) -> int:
    if getattr(args, "data", None) is not None:
        return evaluate_data(args, settings)
    from dicom_node.jobs.analysis import load_model, pipeline_settings
    from inference.evaluate import evaluate
    from inference.train import EVAL_SEED_BASE

    families = ("train", "heldout") if args.family == "both" else (args.family,)
    model = load_model(settings)
    results = {
        family: evaluate(
            model,
            args.cases,
            args.seed if args.seed is not None else EVAL_SEED_BASE,
            settings=pipeline_settings(settings),
            family=family,
        )
        for family in families
    }
    result = results if args.family == "both" else results[args.family]
    print(json.dumps(result, indent=None if args.json else 2))
    if args.family == "both" and not args.json:
        print(side_by_side(results))
    if args.record:
        from inference.model_store import evaluation_name

        for r in results.values():
            record(args, settings, evaluation_name(r), r)
    return 0


def invocation(args, name: str, leave_out: tuple[str, ...] = ()) -> str:
    """How a command was run, written as `nodal NAME ...` whether it ran as `nodal`, as
    `python -m dicom_node.cli` or through `main(argv)`: the arguments from the command's
    name on, without `--config` and its value (a local path) and the flags `leave_out`."""
    argv = args.argv[args.argv.index(name) + 1 :] if name in args.argv else []
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--config":
            skip = True
        elif not a.startswith("--config=") and a not in leave_out:
            kept.append(a)
    return " ".join(["nodal", name, *kept])


def record(args, settings: Settings, name: str, result: dict) -> None:
    """`--record`: the evaluation's figures into the evaluated model's card."""
    import datetime

    from inference.model_store import record_evaluation

    command = invocation(args, "evaluate", leave_out=("--record",))
    record_evaluation(settings.inference.model_dir, name, result, command, datetime.date.today().isoformat())


# --- follow-up studies (issue 17) --------------------------------------------------------
def cmd_evaluate_followup(args, settings: Settings) -> int:
    """`nodal evaluate-followup`: matching, short-axis change and response on phantom pairs."""
    from dicom_node.jobs.analysis import load_model, pipeline_settings
    from inference.evaluate_followup import FOLLOWUP_SEED_BASE, evaluate_followup

    result = evaluate_followup(
        load_model(settings),
        args.pairs,
        args.seed if args.seed is not None else FOLLOWUP_SEED_BASE,
        settings=pipeline_settings(settings),
    )
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


# --- end of follow-up block --------------------------------------------------------------


def evaluate_data(args, settings: Settings) -> int:
    """`nodal evaluate --data DIR`: the evaluation's scores on a site's labelled cases."""
    from dicom_node.jobs.analysis import load_model, pipeline_settings
    from inference.datasets import open_dataset
    from inference.evaluate_data import evaluate_dataset

    dataset = open_dataset(args.data)
    result = evaluate_dataset(load_model(settings), dataset, args.split, pipeline_settings(settings))
    print(json.dumps(result, indent=None if args.json else 2))
    if args.record:
        record(args, settings, f"dataset {args.data.resolve().name}, {result['data']['split']} split", result)
    return 0


def side_by_side(results: dict[str, dict]) -> str:
    """The headline figures of several families as a small text table."""
    keys = ("sensitivity", "fp_per_volume", "dice", "short_axis_mae_mm", "auc", "auc_size_rule", "nodes")
    names = list(results)
    lines = ["metric".ljust(20) + "".join(n.rjust(12) for n in names)]
    for k in keys:
        lines.append(k.ljust(20) + "".join(str(results[n].get(k)).rjust(12) for n in names))
    return "\n".join(lines)


def cmd_config(args, settings: Settings) -> int:
    import yaml

    print(yaml.safe_dump(json.loads(settings.model_dump_json()), sort_keys=False), end="")
    return 0


def cmd_serve(args, settings: Settings) -> int:
    from dicom_node.serve import serve

    return serve(settings)


def cmd_worker(args, settings: Settings) -> int:
    from dicom_node.jobs.celery_backend import run_worker

    if settings.queue.backend != "celery":
        print(
            "nodal: `nodal worker` needs queue.backend: celery (NODAL_QUEUE__BACKEND=celery)", file=sys.stderr
        )
        return 2
    return run_worker(settings, args.gpu, args.name)


def cmd_db(args, settings: Settings) -> int:
    from dicom_node.index import schema
    from dicom_node.index.db import make_engine

    engine = make_engine(settings.index_url())
    try:
        if args.action == "upgrade":
            before, after = schema.upgrade(engine)
            print(f"index schema: {before or 'empty'} -> {after}")
        else:
            have, want = schema.current(engine), schema.head()
            print(f"index schema: {have or 'none'} (newest: {want})")
            return 0 if have == want else 1
    finally:
        engine.dispose()
    return 0


def cmd_echo(args, settings: Settings) -> int:
    from dicom_node.delivery.echo import echo, resolve_peer

    try:
        peer = resolve_peer(args.peer, settings)
    except ValueError as e:
        print(f"nodal: {e}", file=sys.stderr)
        return 2
    result = echo(settings.node.ae_title, peer, args.timeout)
    print(result.message)
    return 0 if result.ok else 1


def cmd_retrieve(args, settings: Settings) -> int:
    """POST /api/retrieve on the running node (its token from the configuration)."""
    import requests

    from dicom_node.api.auth import http_token

    scheme = "https" if settings.node.http_tls.enabled else "http"
    base = (args.node or f"{scheme}://127.0.0.1:{settings.node.http_port}").rstrip("/")
    token = http_token(settings.node.http_auth)
    body = {"study_instance_uid": args.study} if args.study else {"accession_number": args.accession}
    try:
        r = requests.post(
            f"{base}/api/retrieve",
            json=body,
            headers={"Authorization": f"Bearer {token}"} if token else {},
            timeout=3600,
            verify=str(settings.node.http_tls.ca_file) if settings.node.http_tls.ca_file else True,
        )
    except requests.RequestException as e:
        print(f"nodal: cannot reach the node at {base}: {type(e).__name__}", file=sys.stderr)
        return 1
    if r.status_code != 202:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        print(f"nodal: retrieve refused ({r.status_code}): {detail}", file=sys.stderr)
        return 1
    print(json.dumps(r.json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
