"""DICOM instances built for the tests: Part 10 bytes and their file meta, in any transfer syntax."""

from __future__ import annotations

import io

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import encode_file_meta

from dicom_node.spool.part10 import PREAMBLE

CT = "1.2.840.10008.5.1.4.1.1.2"


def part10(sop="1.2.3.4.5", study="1.2.3", series="1.2.3.4", modality="CT", **extra) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = modality
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness = "2.5"
    ds.SeriesDescription = "Thorax"
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def enhanced_ct(
    positions_z: list[float],
    kernel: str | None = "Br40d",
    thickness: str = "1",
    orientation_per_frame: bool = False,
    frame_times: list[str] | None = None,
    **extra,
) -> bytes:
    """An Enhanced CT instance, its frames axial at `positions_z`: slice thickness, kernel
    and orientation in the shared functional groups (the orientation per frame if asked),
    each frame's position (and Frame Acquisition DateTime, `frame_times`) in its own; no
    top-level Slice Thickness or Image Position."""
    orientation = Dataset()
    orientation.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    measures = Dataset()
    measures.SliceThickness = thickness
    measures.PixelSpacing = ["0.7", "0.7"]
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    if not orientation_per_frame:
        shared.PlaneOrientationSequence = [orientation]
    if kernel is not None:
        reconstruction = Dataset()
        reconstruction.ConvolutionKernel = kernel
        shared.CTReconstructionSequence = [reconstruction]
    frames = []
    for i, z in enumerate(positions_z):
        position = Dataset()
        position.ImagePositionPatient = ["0", "0", str(z)]
        frame = Dataset()
        frame.PlanePositionSequence = [position]
        if frame_times is not None:
            content = Dataset()
            content.FrameAcquisitionDateTime = frame_times[i]
            frame.FrameContentSequence = [content]
        if orientation_per_frame:
            frame.PlaneOrientationSequence = [orientation]
        frames.append(frame)
    data = part10(
        SOPClassUID=ENHANCED_CT,
        ImageType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"],
        NumberOfFrames=len(positions_z),
        SharedFunctionalGroupsSequence=[shared],
        PerFrameFunctionalGroupsSequence=frames,
        Rows=2,
        Columns=2,
        BitsAllocated=16,
        PixelData=b"\0" * (8 * len(positions_z)),
        **extra,
    )
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.SliceThickness
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dataset_and_ts(data: bytes) -> tuple[bytes, str]:
    """Re-encode a test instance in `ts` and split it as a C-STORE would carry it."""
    import struct

    end = 144 + struct.unpack("<I", data[140:144])[0]
    return data[end:], str(
        pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID
    )


def in_syntax(data: bytes, ts: str) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    buf = io.BytesIO()
    if ts == ExplicitVRBigEndian:  # pydicom writes big endian only as a bare dataset
        del ds.file_meta
        ds.preamble = None
        pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=False, force_encoding=True)
        return pydicom_meta(CT, ds.SOPInstanceUID, ts, "") + buf.getvalue()
    ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def pydicom_meta(sop_class: str, sop: str, ts: str, ae: str) -> bytes:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    if ae:
        meta.SourceApplicationEntityTitle = ae
    return PREAMBLE + encode_file_meta(meta)
