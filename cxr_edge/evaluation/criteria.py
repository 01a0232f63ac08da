"""The one agreement criterion, shared by the export gates and ``bench``.

An artifact must give the same top class as its FP32 model on at least ``minimum`` of the images. Judged
on n images, a point estimate alone contradicts itself between stages: an artifact that passed its export
gate on the validation images can fail ``bench`` on a smaller test split because one image flipped, although
that few images cannot tell its rate from the minimum. So the verdict is three-way, with the
split and n it was judged on: ``passed`` (at or above the minimum), ``within resolution`` (below it, but
the exact 95% interval still reaches it: n is too small to tell, accepted and said so), or ``failed``
(below it with 95% confidence).
"""

from __future__ import annotations

from .intervals import exact_ci

PASSED, WITHIN_RESOLUTION, FAILED = "passed", "within resolution", "failed"


def agreement_verdict(agreeing: int, n: int, minimum: float, split: str | None = None) -> dict:
    if n <= 0:
        return {"status": PASSED, "rate": None, "n": 0, "ci95": None, "minimum": minimum, "split": split,
                "text": "no images to judge agreement on"}
    rate = agreeing / n
    ci = exact_ci(agreeing, n)
    assert ci is not None  # exact_ci is None only for n <= 0, answered above
    if rate >= minimum:
        status = PASSED
    elif ci[1] >= minimum:
        status = WITHIN_RESOLUTION
    else:
        status = FAILED
    where = f" on the {split} split" if split else ""
    text = (f"top-class agreement with FP32 {agreeing}/{n} = {100 * rate:.1f}%{where} (95% CI {100 * ci[0]:.1f}-"
            f"{100 * ci[1]:.1f}%), minimum {100 * minimum:.1f}%: {status}")
    if status == WITHIN_RESOLUTION:
        text += f" ({n} images cannot tell this from {100 * minimum:.1f}%)"
    return {"status": status, "rate": rate, "n": n, "ci95": ci, "minimum": minimum, "split": split, "text": text}


def accepted(verdict: dict) -> bool:
    return verdict["status"] != FAILED
