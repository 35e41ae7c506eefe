"""Labelled result images (Secondary Capture) for PACS that render neither SEG nor SR.

One RGB image per key slice: the CT in a soft-tissue window, the contour of every node on
that slice in its segment colour, its long and short axis on its key slice, its label
``LN-n``, a banner ``AI RESULT - NOT VERIFIED - model <model name> <model version>`` and a
legend with the measurements, closed by ``software nodal <package version>``.  Small source
images are enlarged (nearest neighbour) so that the text stays legible.  A study without
findings gets one image of its middle slice that says so.

Text is drawn with Pillow's built-in font (no font files); Pillow comes with scikit-image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage
from skimage.draw import line as draw_line

from inference import rules
from inference.findings import Finding, ModelInfo, StudyFindings
from inference.followup import Comparison
from inference.volume import Volume
from sr_templates import codes, provenance
from sr_templates.seg import segment_rgb
from sr_templates.sources import SourceSeries
from sr_templates.uids import ResultUIDs

WINDOW_CENTER_HU = 40.0
WINDOW_WIDTH_HU = 400.0
#: Result images are enlarged until their longer side is at least this many pixels.
MIN_SIZE = 512
BANNER_COLOR = (255, 200, 0)
NO_FINDINGS_TEXT = "NO LYMPH NODES FOUND"
#: At most this many node lines in the legend (the rest: "... and N more" nodes).
MAX_LEGEND_LINES = 6


def banner_text(model: ModelInfo) -> str:
    """The banner: an unverified AI result, and the model (name and version) that made it."""
    # ASCII hyphens: the built-in font has no em dash.
    return f"AI RESULT - NOT VERIFIED - model {provenance.model_label(model)}"


def footer_text() -> str:
    """The legend's last line: the software that wrote the image, labelled as such."""
    return f"software nodal {codes.SOFTWARE_VERSION}"


@dataclass(frozen=True)
class KeyImage:
    """One result image to render: volume slice `k` and the findings drawn on it."""

    k: int
    findings: tuple[tuple[int, Finding], ...]  # (0-based finding index, finding)


def key_images(study_findings: StudyFindings) -> list[KeyImage]:
    """Key slices in findings order; each shows every node that intersects it."""
    findings = study_findings.findings
    if not findings:
        return [KeyImage(study_findings.shape[0] // 2, ())]
    slices: list[int] = []
    for f in findings:
        if f.key_slice not in slices:
            slices.append(int(f.key_slice))
    out = []
    for k in slices:
        on_slice = tuple(
            (n, f)
            for n, f in enumerate(findings)
            if f.bbox[0] <= k < f.bbox[3] and f.mask[k - f.bbox[0]].any()
        )
        out.append(KeyImage(k, on_slice))
    return out


def _frame_rescale(ds: Dataset, frame: int | None) -> tuple[float, float]:
    """(slope, intercept) of a single-frame image or of one frame of an enhanced image."""
    if frame is None:
        return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    for groups in (
        ds.get("PerFrameFunctionalGroupsSequence", [None] * frame)[frame - 1],
        ds.get("SharedFunctionalGroupsSequence", [None])[0],
    ):
        if groups is not None and "PixelValueTransformationSequence" in groups:
            item = groups.PixelValueTransformationSequence[0]
            return float(item.get("RescaleSlope", 1) or 1), float(item.get("RescaleIntercept", 0) or 0)
    return 1.0, 0.0


def slice_hu(sources: SourceSeries, k: int) -> np.ndarray:
    """Hounsfield units of volume slice `k`, decoded from its source image or frame."""
    ds = sources.dataset_of_slice(k)
    frame = sources.planes[k].frame_number
    if "PixelData" not in ds:
        raise ValueError(
            "result images need the pixel data of the source images; read them with pixels "
            "or call with result_images=False"
        )
    stored = pixel_array(ds, index=None if frame is None else frame - 1)
    slope, intercept = _frame_rescale(ds, frame)
    return stored.astype(np.float32) * slope + intercept


def window(hu: np.ndarray) -> np.ndarray:
    """Soft-tissue window to uint8."""
    low = WINDOW_CENTER_HU - WINDOW_WIDTH_HU / 2
    scaled = (hu - low) * (255.0 / WINDOW_WIDTH_HU)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # no FreeType: fixed bitmap font
        return ImageFont.load_default()


def _fitting_font(draw: ImageDraw.ImageDraw, text: str, width: int, size: int):
    while size > 8:
        font = _font(size)
        if draw.textlength(text, font=font) <= width:
            return font
        size -= 1
    return _font(8)


def render(sources: SourceSeries, study_findings: StudyFindings, key: KeyImage) -> np.ndarray:
    """The RGB result image (uint8, rows x columns x 3) of one key slice."""
    gray = window(slice_hu(sources, key.k))
    scale = max(1, math.ceil(MIN_SIZE / max(gray.shape)))
    gray = np.repeat(np.repeat(gray, scale, axis=0), scale, axis=1)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    rows, cols = gray.shape
    thickness = max(1, scale // 4, rows // 256)

    for n, finding in key.findings:
        colour = np.array(segment_rgb(n), dtype=np.uint8)
        k0, j0, i0, _, j1, i1 = finding.bbox
        mask = np.zeros((sources.rows, sources.columns), dtype=bool)
        mask[j0:j1, i0:i1] = finding.mask[key.k - k0]
        big = np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)
        edge = big & ~ndimage.binary_erosion(big, iterations=thickness)
        rgb[edge] = colour
        if finding.key_slice == key.k:
            for axis in (finding.long_axis, finding.short_axis):
                (c0, r0), (c1, r1) = axis.endpoints_pixel
                rr, cc = draw_line(*(round(v * scale - 0.5) for v in (r0, c0, r1, c1)))
                ok = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
                rgb[rr[ok], cc[ok]] = (255, 255, 255)

    image = Image.fromarray(rgb)  # uint8 rows x columns x 3: RGB
    draw = ImageDraw.Draw(image)
    margin = max(2, cols // 100)
    base_size = max(10, cols // 32)

    # Banner across the top.
    text = banner_text(study_findings.model)
    font = _fitting_font(draw, text, cols - 2 * margin, base_size)
    top = draw.textbbox((0, 0), text, font=font)
    banner_h = top[3] + 2 * margin
    draw.rectangle((0, 0, cols, banner_h), fill=(0, 0, 0))
    draw.text((margin, margin), text, font=font, fill=BANNER_COLOR)

    # Labels beside the nodes.
    label_font = _font(max(10, base_size))
    for n, finding in key.findings:
        _, j0, _, _, _, i1 = finding.bbox
        x = min(i1 * scale + margin, cols - draw.textlength(finding.label, font=label_font) - 1)
        y = max(j0 * scale - base_size, banner_h + 1)
        draw.text(
            (x, y),
            finding.label,
            font=label_font,
            fill=segment_rgb(n),
            stroke_width=max(1, base_size // 8),
            stroke_fill=(0, 0, 0),
        )

    # Legend at the bottom: what each label means, with the model that produced it.
    lines = legend(study_findings, key)
    legend_font = _fitting_font(draw, max(lines, key=len), cols - 2 * margin, base_size)
    line_h = draw.textbbox((0, 0), "Ag", font=legend_font)[3] + margin
    y0 = rows - line_h * len(lines) - margin
    draw.rectangle((0, y0 - margin, cols, rows), fill=(0, 0, 0))
    for i, line_text in enumerate(lines):
        draw.text((margin, y0 + i * line_h), line_text, font=legend_font, fill=BANNER_COLOR)
    return np.asarray(image, dtype=np.uint8)


def legend(study_findings: StudyFindings, key: KeyImage) -> list[str]:
    """The legend of key image `key`, top to bottom: its nodes (`legend_lines`), what the
    reader must know about the whole result (`StudyFindings.remarks`: slices too far apart
    for small nodes), and the software that wrote it."""
    return [*legend_lines([f for _, f in key.findings]), *study_findings.remarks, footer_text()]


def scan_edge_line(label: str | None) -> str:
    """A legend line of its own that says a node's sizes are those of its part in the scan."""
    return f"{label}: {rules.SCAN_EDGE_REMARK}"


def legend_lines(findings: Sequence[Finding]) -> list[str]:
    """The legend's node lines: each node's sizes and probability, and for a node cut by the
    edge of the scan a line of its own that says its sizes are those of the part in view
    (`NO_FINDINGS_TEXT` for none). At most `MAX_LEGEND_LINES`: whole nodes while they fit,
    then how many nodes more the SR holds (a node's sizes never without its remark)."""
    groups = [
        [
            f"{f.label}: short {f.short_axis.length_mm:.1f} mm, long {f.long_axis.length_mm:.1f} mm, "
            f"p(malignant) {f.malignancy_probability:.2f}",
            *([scan_edge_line(f.label)] if rules.FLAG_SCAN_EDGE in f.flags else []),
        ]
        for f in findings
    ]
    if not groups:
        return [NO_FINDINGS_TEXT]
    if sum(len(g) for g in groups) <= MAX_LEGEND_LINES:
        return [line for g in groups for line in g]
    lines: list[str] = []
    shown = 0
    for g in groups:
        if len(lines) + len(g) > MAX_LEGEND_LINES - 1:
            break
        lines += g
        shown += 1
    return [*lines, f"... and {len(groups) - shown} more (see the SR)"]


def _orientation_letters(vector: Sequence[float]) -> str:
    """Patient Orientation letters of a direction cosine, e.g. (1, 0, 0) -> "L"."""
    letters = []
    for axis in np.argsort(-np.abs(np.asarray(vector, dtype=float))):
        value = float(vector[axis])
        if abs(value) < 1e-3:
            break
        letters.append(("L", "P", "H")[axis] if value > 0 else ("R", "A", "F")[axis])
    return "".join(letters[:3])


def _image_orientation(ds: Dataset) -> list[float]:
    if "ImageOrientationPatient" in ds:
        return [float(v) for v in ds.ImageOrientationPatient]
    shared = ds.SharedFunctionalGroupsSequence[0]
    if "PlaneOrientationSequence" in shared:
        return [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    frame = ds.PerFrameFunctionalGroupsSequence[0]
    return [float(v) for v in frame.PlaneOrientationSequence[0].ImageOrientationPatient]


def build_result_images(
    sources: SourceSeries,
    study_findings: StudyFindings,
    result_uids: ResultUIDs,
    *,
    comparison: Comparison | None = None,
    prior: Volume | None = None,
) -> list[hd.sc.SCImage]:
    """The Secondary Capture series (one instance per key image).

    With a `comparison` and the `prior` CT, one more image per changed node follows the key
    images: the prior slice beside the current one (`sr_templates.prior_images`).
    """
    model = study_findings.model
    iop = _image_orientation(sources.header)
    orientation = (_orientation_letters(iop[:3]), _orientation_letters(iop[3:]))
    images = []
    rendered = [(key, render(sources, study_findings, key)) for key in key_images(study_findings)]
    if comparison is not None and prior is not None:
        from sr_templates.prior_images import side_by_side

        rendered.extend(side_by_side(sources, study_findings, comparison, prior, render))
    for number, (key, pixels) in enumerate(rendered, start=1):
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=sources.header,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=result_uids.sc_series,
            series_number=provenance.SC_SERIES_NUMBER,
            sop_instance_uid=result_uids.sc_instance(number),
            instance_number=number,
            manufacturer=codes.MANUFACTURER,
            patient_orientation=orientation,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[provenance.contributing_equipment(model)],
            series_description=provenance.SC_SERIES_DESCRIPTION,
            manufacturer_model_name=codes.MODEL_NAME,
            software_versions=provenance.software_versions(model),
        )
        # from_ref_dataset copies only the attributes SCImage takes; copy the rest of the
        # Patient and Study modules (Study Description, ...) so all results agree.
        sc.copy_patient_and_study_information(sources.header)
        sc.BurnedInAnnotation = "YES"
        sc.ConversionType = "WSD"  # workstation: rendered by software, not digitised
        # General Series Laterality is 2C "unless Image Laterality is present"; a CT slice
        # of the trunk is of no paired body part: U (unpaired).
        sc.ImageLaterality = "U"
        sc.ImageComments = (
            f"AI result, not verified by a physician: model {provenance.model_label(model)}, "
            f"software nodal {codes.SOFTWARE_VERSION}"
        )
        sc.DerivationDescription = "CT key slice with AI lymph node contours and labels burned in"
        source = sources.dataset_of_slice(key.k)
        ref = Dataset()
        ref.ReferencedSOPClassUID = source.SOPClassUID
        ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
        frame = sources.planes[key.k].frame_number
        if frame is not None:
            ref.ReferencedFrameNumber = frame
        sc.SourceImageSequence = [ref]
        images.append(sc)
    return images
