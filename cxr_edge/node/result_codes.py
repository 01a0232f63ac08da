"""The coded concepts the result objects use, in one place, with where each comes from.

SNOMED CT (SCT) and DICOM (DCM) codes where the standard has one; otherwise the private coding scheme
``99CXREDGE`` (DICOM PS3.16 reserves designators starting with "99" for private schemes), documented in
docs/dicom-conformance.md so a receiving site can map it.
"""

from __future__ import annotations

from ..classes import COVID, LUNG_OPACITY, NORMAL, VIRAL_PNEUMONIA

#: the private coding scheme's designator and its version
PRIVATE_SCHEME = "99CXREDGE"
PRIVATE_SCHEME_VERSION = "1.0"


def coded(value: str, scheme: str, meaning: str):
    """A highdicom CodedConcept (imported lazily: the node extra brings highdicom)."""
    from highdicom.sr import CodedConcept

    return CodedConcept(value, scheme, meaning, PRIVATE_SCHEME_VERSION if scheme == PRIVATE_SCHEME else None)


# ---- standard codes (pydicom's DICOM PS3.16 dictionary lists the SCT/DCM ones; COVID-19 and viral pneumonia are
# SNOMED CT International concepts newer than that dictionary's context groups)
COVID_19 = ("840539006", "SCT", "COVID-19")  # Disease caused by SARS-CoV-2 (disorder)
VIRAL_PNEUMONIA_SCT = ("75570004", "SCT", "Viral pneumonia")
NORMAL_SCT = ("17621005", "SCT", "Normal")
SUSPECTED = ("415684004", "SCT", "Suspected")  # CID 3770
YES = ("373066001", "SCT", "Yes")  # CID 230
NO = ("373067005", "SCT", "No")
THRESHOLD_VALUE = ("122411", "DCM", "Threshold Value")
IMAGING_PROCEDURE = ("363679005", "SCT", "Imaging procedure")  # CID 100
CHEST = ("816094009", "SCT", "Chest")
NO_UNITS = ("1", "UCUM", "no units")
ARTIFICIAL_INTELLIGENCE = ("123110", "DCM", "Artificial Intelligence")  # CID 7162 algorithm family
MORPHOLOGICALLY_ABNORMAL = ("49755003", "SCT", "Morphologically Abnormal Structure")  # CID 7150 segment category

# ---- private codes (no standard concept exists for these)
NOT_SUSPECTED = ("NOT-SUSPECTED", PRIVATE_SCHEME, "Not suspected")
LUNG_OPACITY_CODE = ("LUNG-OPACITY", PRIVATE_SCHEME, "Lung opacity")
DECIDED_CLASS = ("DECIDED-CLASS", PRIVATE_SCHEME, "Decided class")  # (TID 1501's own Finding is the finding type)
BORDERLINE = ("BORDERLINE", PRIVATE_SCHEME, "Decision within the borderline band of the threshold")
INTENDED_USE = ("INTENDED-USE", PRIVATE_SCHEME, "Intended use")
SCREENING_AID = ("SCREENING-AID", PRIVATE_SCHEME, "Screening aid, not for diagnostic use")
GRADCAM = ("GRADCAM", PRIVATE_SCHEME, "Grad-CAM relevance of the decided class")

#: probability of each class, as a measurement concept
PROBABILITY_OF = {
    COVID: ("P-COVID-19", PRIVATE_SCHEME, "Probability of COVID-19"),
    NORMAL: ("P-NORMAL", PRIVATE_SCHEME, "Probability of normal"),
    VIRAL_PNEUMONIA: ("P-VIRAL-PNEUMONIA", PRIVATE_SCHEME, "Probability of viral pneumonia"),
    LUNG_OPACITY: ("P-LUNG-OPACITY", PRIVATE_SCHEME, "Probability of lung opacity"),
}

#: the finding each class label stands for
CLASS_FINDING = {COVID: COVID_19, NORMAL: NORMAL_SCT, VIRAL_PNEUMONIA: VIRAL_PNEUMONIA_SCT, LUNG_OPACITY: LUNG_OPACITY_CODE}

#: the disclaimer every object carries, in words (SR: a coded intended use; images: burned in and in the descriptions)
DISCLAIMER = "AI screening aid - not for diagnostic use"
