"""Per-plane acquisition facts: what tells the parts of a series apart (series number, image
type, complex component, echo) and what orders and describes its volumes (temporal position,
acquisition number and time, trigger time, instance number, diffusion b-value and gradient).

All are technical values, never identifying; times are kept as seconds of the day only to
order and space volumes (what leaves memory is relative to the first volume).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from medflow.readers.dicom.values import first_item, float_or_none, text_of, value_of

__all__ = ["NO_FACTS", "PlaneFacts", "classic_facts", "frame_facts", "seconds_of_day"]

_COMPONENTS = {
    "M": "magnitude",
    "MAGNITUDE": "magnitude",
    "P": "phase",
    "PHASE": "phase",
    "R": "real",
    "REAL": "real",
    "I": "imaginary",
    "IMAGINARY": "imaginary",
}


@dataclass(frozen=True, slots=True)
class PlaneFacts:
    """The acquisition facts of one plane (None: not recorded)."""

    series_number: int | None = None
    image_type: tuple[str, ...] = ()
    complex_component: str | None = None  # magnitude, phase, real, imaginary
    echo_number: int | None = None
    echo_time_ms: float | None = None
    repetition_time_ms: float | None = None
    temporal_index: int | None = None
    acquisition_number: int | None = None
    trigger_time_ms: float | None = None
    acquisition_time_s: float | None = None  # seconds of the day
    instance_number: int | None = None
    b_value: float | None = None
    gradient_lps: tuple[float, float, float] | None = None  # unit vector, patient LPS
    stack_id: str | None = None  # enhanced objects: the frame's Stack ID

    def volume_key(self) -> tuple[Any, ...]:
        """What orders the planes found at one position into volumes (acquisition order).

        Planes whose keys are equal cannot be told apart: they are not volumes of one series.
        """
        return tuple(
            (v is None, v if v is not None else 0)
            for v in (
                self.temporal_index,
                self.acquisition_number,
                self.trigger_time_ms,
                self.acquisition_time_s,
                self.instance_number,
                self.b_value,
                self.gradient_lps,
            )
        )


NO_FACTS = PlaneFacts()


def _either(value: Any, fallback: Any) -> Any:
    return value if value is not None else fallback


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def seconds_of_day(value: Any) -> float | None:
    """``HHMMSS.ffffff`` (TM), or the time part of ``YYYYMMDDHHMMSS.ffffff`` (DT), in seconds."""
    text = str(value).strip() if value not in (None, "") else ""
    if len(text) >= 14 and text[:8].isdigit() and text[8:14].isdigit():
        text = text[8:]  # a DT: its time of day
    text = text.split("+")[0].split("-")[0]
    head, _, frac = text.partition(".")
    if len(head) < 2 or not head.isdigit():
        return None
    hh, mm, ss = int(head[0:2]), int(head[2:4] or 0), int(head[4:6] or 0)
    try:
        extra = float(f"0.{frac}") if frac and frac.isdigit() else 0.0
    except ValueError:
        extra = 0.0
    return hh * 3600 + mm * 60 + ss + extra


def _image_type(value: Any) -> tuple[str, ...]:
    if value in (None, ""):
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(str(v).strip().upper() for v in items)


def _component(image_type: tuple[str, ...], explicit: str | None) -> str | None:
    if explicit and explicit.upper() in _COMPONENTS:
        return _COMPONENTS[explicit.upper()]
    if len(image_type) > 2 and image_type[2] in ("M", "P", "R", "I"):
        return _COMPONENTS[image_type[2]]
    for word in image_type:
        if len(word) > 1 and word in _COMPONENTS:
            return _COMPONENTS[word]
    return None


def _unit(vector: Any) -> tuple[float, float, float] | None:
    try:
        v = [float(x) for x in vector]
    except (TypeError, ValueError):
        return None
    if len(v) != 3 or not all(math.isfinite(x) for x in v):
        return None
    norm = math.sqrt(sum(x * x for x in v))
    if norm < 1e-6:
        return (0.0, 0.0, 0.0)
    return (v[0] / norm, v[1] / norm, v[2] / norm)


def _diffusion(ds: Dataset, csa: bool) -> tuple[float | None, tuple[float, float, float] | None]:
    """b-value and gradient direction: the standard elements (top level or MR Diffusion
    macro), else Siemens' CSA image header."""
    item = first_item(ds, "MRDiffusionSequence") or ds
    b = float_or_none(value_of(item, "DiffusionBValue"))
    direction = first_item(item, "DiffusionGradientDirectionSequence") or item
    g = value_of(direction, "DiffusionGradientOrientation")
    gradient = _unit(g) if g is not None else None
    if b is None and csa:
        b, gradient = _csa_diffusion(ds)
    if b is not None and b <= 0:
        gradient = (0.0, 0.0, 0.0)
    return b, gradient


def _csa_diffusion(ds: Dataset) -> tuple[float | None, tuple[float, float, float] | None]:
    from nibabel.nicom import csareader

    try:
        header = csareader.get_csa_header(ds, "image")
    except Exception:  # a damaged private header: no diffusion facts from it
        return None, None
    if not header:
        return None, None
    b = float_or_none(csareader.get_b_value(header))
    g = csareader.get_g_vector(header)
    return b, (_unit(g) if g is not None else None)


_GE_COMPONENTS = {0: "magnitude", 1: "phase", 2: "real", 3: "imaginary"}


def _ge_component(ds: Dataset) -> str | None:
    """GE's private image type (0043,xx2F of "GEMS_PARM_01"): 0 magnitude, 1 phase, 2 real,
    3 imaginary, as dcm2niix reads it."""
    if "GE" not in (text_of(ds, "Manufacturer") or "").upper():
        return None
    try:
        value = ds.private_block(0x0043, "GEMS_PARM_01")[0x2F].value
        return _GE_COMPONENTS.get(int(value[0] if isinstance(value, list | tuple) else value))
    except (KeyError, ValueError, TypeError, AttributeError, IndexError):
        return None


def classic_facts(ds: Dataset, *, csa: bool | None = None) -> PlaneFacts:
    """The facts of a single-frame object (``csa``: read Siemens' CSA header as well; by
    default for Siemens MR objects)."""
    image_type = _image_type(value_of(ds, "ImageType"))
    if csa is None:
        csa = (
            text_of(ds, "Modality") == "MR"
            and "SIEMENS" in (text_of(ds, "Manufacturer") or "").upper()
        )
    b, gradient = _diffusion(ds, csa)
    explicit = text_of(ds, "ComplexImageComponent") or None
    component = _component(image_type, explicit) if explicit else None
    return PlaneFacts(
        series_number=_int_or_none(value_of(ds, "SeriesNumber")),
        image_type=image_type,
        complex_component=component or _ge_component(ds) or _component(image_type, None),
        echo_number=_int_or_none(value_of(ds, "EchoNumbers")),
        echo_time_ms=float_or_none(value_of(ds, "EchoTime")),
        repetition_time_ms=float_or_none(value_of(ds, "RepetitionTime")),
        temporal_index=_int_or_none(value_of(ds, "TemporalPositionIdentifier")),
        acquisition_number=_int_or_none(value_of(ds, "AcquisitionNumber")),
        trigger_time_ms=float_or_none(value_of(ds, "TriggerTime")),
        acquisition_time_s=seconds_of_day(
            value_of(ds, "AcquisitionTime") or value_of(ds, "AcquisitionDateTime")
        ),
        instance_number=_int_or_none(value_of(ds, "InstanceNumber")),
        b_value=b,
        gradient_lps=gradient,
    )


def frame_facts(ds: Dataset, item: Dataset, shared: Dataset | None) -> PlaneFacts:
    """The facts of one frame of an enhanced object: its functional groups, then the shared
    ones, then the object's top-level elements."""

    def macro(keyword: str) -> Dataset | None:
        return first_item(item, keyword) or first_item(shared, keyword)

    top = classic_facts(ds, csa=False)
    frame_type_item = macro("MRImageFrameTypeSequence") or macro("CTImageFrameTypeSequence")
    image_type = top.image_type
    component = top.complex_component
    if frame_type_item is not None:
        image_type = _image_type(value_of(frame_type_item, "FrameType")) or image_type
        component = _component(image_type, text_of(frame_type_item, "ComplexImageComponent"))
    content = macro("FrameContentSequence")
    echo = macro("MREchoSequence")
    timing = macro("MRTimingAndRelatedParametersSequence")
    cardiac = macro("CardiacSynchronizationSequence")
    diffusion = macro("MRDiffusionSequence")
    b, gradient = top.b_value, top.gradient_lps
    if diffusion is not None:
        holder = Dataset()
        holder.MRDiffusionSequence = [diffusion]
        b, gradient = _diffusion(holder, False)
    temporal = _int_or_none(value_of(content, "TemporalPositionIndex")) if content else None
    when = seconds_of_day(value_of(content, "FrameAcquisitionDateTime")) if content else None
    return PlaneFacts(
        series_number=top.series_number,
        image_type=image_type,
        complex_component=component,
        echo_number=top.echo_number,
        echo_time_ms=_either(
            float_or_none(value_of(echo, "EffectiveEchoTime")) if echo is not None else None,
            top.echo_time_ms,
        ),
        repetition_time_ms=_either(
            float_or_none(value_of(timing, "RepetitionTime")) if timing is not None else None,
            top.repetition_time_ms,
        ),
        temporal_index=temporal if temporal is not None else top.temporal_index,
        acquisition_number=top.acquisition_number,
        trigger_time_ms=(
            float_or_none(value_of(cardiac, "NominalCardiacTriggerDelayTime"))
            if cardiac is not None
            else None
        ),
        acquisition_time_s=when if when is not None else top.acquisition_time_s,
        instance_number=top.instance_number,
        b_value=b,
        gradient_lps=gradient,
        stack_id=text_of(content, "StackID") if content is not None else None,
    )
