"""The screening result as a DICOM TID 1500 measurement report (Comprehensive 3D SR), as IHE AIR carries AI results.

One report per screened image, in the image's study: the decision as coded qualitative evaluations, p(COVID), the
threshold and every class probability as measurements, the algorithm identified (TID 4019: name, version, model
sha256, precision, backend, operating point), the device observer and the Contributing Equipment, and the source
image as the measurement group's source. Built with highdicom, which enforces the template's structure.
"""

from __future__ import annotations

from typing import Any

from ..classes import COVID
from . import result_codes as rc
from .result_codes import coded


def algorithm(model: dict[str, Any]):
    """TID 4019 algorithm identification: what a reader needs to know which model said this."""
    from highdicom.sr import AlgorithmIdentification

    params = [f"model_sha256={model.get('sha256')}", f"artifact={model.get('artifact')}",
              f"precision={model.get('precision')}", f"backend={model.get('backend')}",
              f"provider={model.get('provider')}", f"threshold={model.get('threshold')}",
              f"operating_point={model.get('operating_point')}"]
    return AlgorithmIdentification(name=f"cxr-edge {model.get('recipe')}", version=str(model.get("version")),
                                   parameters=params, family=coded(*rc.ARTIFICIAL_INTELLIGENCE),
                                   manufacturer="cxr-edge")


def report(source, result: dict[str, Any], model: dict[str, Any], *, series_uid: str, sop_uid: str,
           tracking_uid: str, device_uid: str, equipment, when, instance_number: int):
    """The Comprehensive 3D SR for one result (``result`` as ``ScreeningResult.to_dict`` gives it)."""
    import highdicom.sr as hsr
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    probs: dict[str, float] = result.get("probabilities") or {}
    decision = result.get("decision") or {}
    label = str(result.get("label"))
    suspected = label == COVID
    evaluations = [
        hsr.QualitativeEvaluation(coded(*rc.COVID_19), coded(*(rc.SUSPECTED if suspected else rc.NOT_SUSPECTED))),
        hsr.QualitativeEvaluation(coded(*rc.DECIDED_CLASS), coded(*rc.CLASS_FINDING.get(label, rc.NOT_SUSPECTED))),
        hsr.QualitativeEvaluation(coded(*rc.BORDERLINE),
                                  coded(*(rc.YES if decision.get("borderline") else rc.NO))),
        hsr.QualitativeEvaluation(coded(*rc.INTENDED_USE), coded(*rc.SCREENING_AID)),
    ]
    unit = coded(*rc.NO_UNITS)
    algo = algorithm(model)
    measurements = [hsr.Measurement(name=coded(*rc.PROBABILITY_OF[c]), value=float(p), unit=unit, algorithm_id=algo)
                    for c, p in probs.items() if c in rc.PROBABILITY_OF]
    if result.get("threshold") is not None:
        measurements.append(hsr.Measurement(name=coded(*rc.THRESHOLD_VALUE), value=float(result["threshold"]), unit=unit))
    group = hsr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hsr.TrackingIdentifier(uid=tracking_uid, identifier="COVID-19 screening"),
        finding_type=coded(*rc.COVID_19), algorithm_id=algo,
        finding_sites=[hsr.FindingSite(coded(*rc.CHEST))],
        measurements=measurements, qualitative_evaluations=evaluations,
        source_images=[hsr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)])
    observer = hsr.ObserverContext(
        observer_type=coded("121007", "DCM", "Device"),
        observer_identifying_attributes=hsr.DeviceObserverIdentifyingAttributes(
            uid=device_uid, name=f"cxr-edge {model.get('recipe')}"[:64], manufacturer_name="cxr-edge",
            model_name=str(model.get("artifact"))[:64]))
    content = hsr.MeasurementReport(
        observation_context=hsr.ObservationContext(observer_device_context=observer),
        procedure_reported=coded(*rc.IMAGING_PROCEDURE),
        imaging_measurements=[group],
        title=coded("126000", "DCM", "Imaging Measurement Report"))
    sr = hsr.Comprehensive3DSR(
        evidence=[source], content=content, series_instance_uid=series_uid, series_number=9901,
        sop_instance_uid=sop_uid, instance_number=instance_number, manufacturer="cxr-edge",
        is_complete=True, is_final=False, is_verified=False, contributing_equipment=[equipment],
        coding_schemes=[CodingSchemeIdentificationItem(rc.PRIVATE_SCHEME, "cxr-edge screening concepts",
                                                       version=rc.PRIVATE_SCHEME_VERSION,
                                                       responsible_organization="cxr-edge")],
        series_description=f"{rc.DISCLAIMER} (report)"[:64], content_date=when.date(), content_time=when.time())
    sr.PreliminaryFlag = "PRELIMINARY"  # an unverified machine result, whatever a reader's viewer shows first
    return sr
