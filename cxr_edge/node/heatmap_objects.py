"""The Grad-CAM map in DICOM, twice: a captioned colour Secondary Capture any viewer shows, and the raw map as a
fractional Segmentation that viewers overlay on the radiograph.

Why a Segmentation and not a Parametric Map: highdicom 0.28's ``ParametricMap`` cannot be built on a single-frame
projection radiograph without a Frame of Reference (CR/DX have none; it fails building its dimension index, a test
keeps the reproducer), and a pseudo-colour presentation state colours the radiograph itself, so it cannot carry a
second image. A FRACTIONAL Segmentation has the map's values (0..1 in 255 steps) at the source's pixel matrix,
references the source image per frame, and OHIF, 3D Slicer and Weasis overlay it.

A map with no localised evidence (:func:`cxr_edge.runtime.gradcam.map_evidence`) gives a Secondary Capture of the
radiograph in gray with the caption "NO LOCALISED EVIDENCE: ..." and no colour bar; its Segmentation is still made,
with every value zero (the raw map stays in the node's .npy), and its segment label and content description say
"no localised evidence".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import result_codes as rc
from .result_codes import coded

#: the captioned Secondary Capture's longest side (the node's decoded preview is at most this already)
MAX_SC_SIDE = 1024


def captioned_overlay(preview: np.ndarray, cam: np.ndarray, result: dict[str, Any], model: dict[str, Any],
                      blended: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8: the map over the image, a colour bar, the decision, the model and the disclaimer burned in; for a
    map with no localised evidence the gray radiograph and a caption saying so (:func:`explained_overlay`).
    ``blended``: the map already blended over ``preview`` (BGR, the node's kiosk overlay), reused as it is."""
    from ..runtime.overlay import explained_overlay

    decision = result.get("decision") or {}
    lines = [str(decision.get("text") or result.get("label")),
             f"model {model.get('recipe')} {model.get('version')} sha256 {str(model.get('sha256'))[:12]} "
             f"({model.get('precision')}, {model.get('backend')})",
             f"Grad-CAM of the decided class. {rc.DISCLAIMER.upper()}."]
    longest = max(preview.shape[:2])
    if blended is not None and max(blended.shape[:2]) > MAX_SC_SIDE:
        blended = None  # (larger than a screen: blended again on the reduced preview)
    if blended is None and longest > MAX_SC_SIDE:  # a viewer's screen, not the detector's matrix: ~3 MB of RGB at most
        import cv2

        f = MAX_SC_SIDE / longest
        preview = cv2.resize(preview, (round(preview.shape[1] * f), round(preview.shape[0] * f)),
                             interpolation=cv2.INTER_AREA)
    bgr = explained_overlay(preview, cam, lines, blended=blended)
    return np.ascontiguousarray(bgr[:, :, ::-1])


def secondary_capture(source, rgb: np.ndarray, *, series_uid: str, sop_uid: str, equipment, when, instance_number: int):
    """A colour Secondary Capture of the captioned overlay in the source's study, referencing the source image."""
    from highdicom import sc
    from pydicom.dataset import Dataset

    po = source.get("PatientOrientation")
    orientation = (str(po[0]), str(po[1])) if po is not None and not isinstance(po, str) and len(po) == 2 else None
    img = sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=9902, sop_instance_uid=sop_uid,
        instance_number=instance_number, manufacturer="cxr-edge",
        patient_orientation=orientation or ("L", "F"),  # (highdicom requires one; emptied below when unknown)
        transfer_syntax_uid="1.2.840.10008.1.2.1", contributing_equipment=[equipment],
        series_description=f"{rc.DISCLAIMER} (heatmap)"[:64], content_date=when.date(), content_time=when.time())
    if orientation is None:  # the source does not say (type 2 in CR): empty, as the standard says for unknown
        setattr(img, "PatientOrientation", "")  # noqa: B010  (highdicom types it as a list)
    if "Laterality" not in img:  # type 2C (paired body parts); a chest is not one, so empty unless the source says
        img.Laterality = source.get("Laterality") or ""
    img.BurnedInAnnotation = "YES"  # the caption, the model and the disclaimer are in the pixels
    img.ImageType = ["DERIVED", "SECONDARY"]
    img.DerivationDescription = f"Grad-CAM overlay by cxr-edge. {rc.DISCLAIMER}."[:1024]
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    img.SourceImageSequence = [ref]
    return img


def map_segmentation(source, cam: np.ndarray, model: dict[str, Any], *, series_uid: str, sop_uid: str, equipment,
                     when, instance_number: int):
    """The raw map at the source's pixel matrix as a FRACTIONAL (probability-typed) Segmentation, one segment."""
    import cv2
    from highdicom import AlgorithmIdentificationSequence, seg

    from ..runtime.gradcam import map_evidence, normalise

    localised = map_evidence(cam).localised
    label = "Grad-CAM relevance" if localised else "Grad-CAM: no localised evidence"  # a viewer's segment list says so
    rows, cols = int(source.Rows), int(source.Columns)
    m = cv2.resize(normalise(cam).astype(np.float32), (cols, rows), interpolation=cv2.INTER_LINEAR)
    if not localised:  # a flat map scaled by its own maximum is 1.0 everywhere: a viewer would paint the whole chest
        m = np.zeros_like(m)
    algo = AlgorithmIdentificationSequence(name=f"cxr-edge {model.get('recipe')} Grad-CAM"[:64],
                                           family=coded(*rc.ARTIFICIAL_INTELLIGENCE), version=str(model.get("version")),
                                           parameters={"model_sha256": str(model.get("sha256"))})
    desc = seg.SegmentDescription(
        segment_number=1, segment_label=label, segmented_property_category=coded(*rc.MORPHOLOGICALLY_ABNORMAL),
        segmented_property_type=coded(*rc.GRADCAM), algorithm_type="AUTOMATIC", algorithm_identification=algo)
    s = seg.Segmentation(
        source_images=[source], pixel_array=np.clip(m, 0.0, 1.0), segmentation_type="FRACTIONAL",
        segment_descriptions=[desc], series_instance_uid=series_uid, series_number=9903, sop_instance_uid=sop_uid,
        instance_number=instance_number, manufacturer="cxr-edge", manufacturer_model_name=f"{model.get('recipe')}"[:64],
        software_versions=str(model.get("version")), device_serial_number=str(model.get("sha256"))[:64],
        fractional_type="PROBABILITY", max_fractional_value=255, contributing_equipment=[equipment],
        series_description=f"{rc.DISCLAIMER} (map)"[:64], content_date=when.date(), content_time=when.time(),
        transfer_syntax_uid="1.2.840.10008.1.2.5")  # RLE lossless: a smooth map compresses several-fold
    po = source.get("PatientOrientation")  # no Frame of Reference: the orientation is how the map lies on the image
    s.PatientOrientation = po if po is not None and not isinstance(po, str) and len(po) == 2 else ""
    s.ContentDescription = (f"Grad-CAM, {rc.DISCLAIMER}" if localised else "Grad-CAM: NO LOCALISED EVIDENCE")[:64]
    return s
