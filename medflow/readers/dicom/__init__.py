"""The DICOM reader: headers for grouping, and whole series into a
:class:`~storage.images.DecodedImage`.

Recognising DICOM: a file is DICOM when it has the 128-byte preamble and ``DICM``, or, without
them, when its first bytes are a plausible data element of group 0002 or 0008 and the parsed
data set then has a valid SOP Class UID. Everything wrong with a file raises
:class:`~tasks.SourceError` (see :mod:`medflow.reasons`): the path as given (for the restricted
``sources`` table only), a :class:`~medflow.reasons.ReasonCode`, a public ``reason`` a user can act
on, built only from non-identifying facts (numbers, element keywords, transfer syntax and SOP
class names; never a path, a file name, a UID or a library's message), and, where a library
said why, its message as the restricted ``detail``.

Identifiers (patient name and ID, birth date, accession number, institution, descriptions and
all UIDs) never reach the output: :class:`DicomHeader` keeps the Study/Series/SOP Instance UIDs
in memory for grouping only (and out of its ``repr``); ``ImageMeta.attrs`` holds only the
technical facts listed in :func:`read_dicom_series`; messages quoted from pydicom or its decoder
plugins go to the restricted detail only, scrubbed of the file's identifying values, and
pydicom's own log warnings (which can quote element values) are silenced.

What comes out of :func:`read_dicom_series`:

* a series of single-frame slices, or an enhanced multi-frame object whose frames carry
  positions: a volume ``("z", "y", "x")`` = (slice, row, column), slices sorted by the
  projection of ImagePositionPatient on the slice normal (row cosines x column cosines);
  several volumes at the same positions (a time series, diffusion, several files of enhanced
  volumes, Siemens mosaics over several files): ``("t", "z", "y", "x")``; a series of several
  parts (echoes, magnitude and phase, ...): one such image per part
  (:func:`read_dicom_parts`);
* one single-frame object: a 2-D image ``("y", "x")``, or ``("c", "y", "x")`` for colour;
* a multi-frame object without per-frame positions (US/XA cine, multi-frame SC):
  ``("t", "y", "x")`` or ``("t", "c", "y", "x")`` with the frame interval in seconds.

Values: grey data is the stored value times RescaleSlope plus RescaleIntercept (HU for CT),
as int16 when every slope and intercept is a whole number and every value fits int16, else as
float32; 8-bit unsigned grey data without a rescale stays uint8. MONOCHROME1 is inverted to
MONOCHROME2 (``stored -> min + max - stored`` over the BitsStored range) before the rescale,
and ``attrs["monochrome1_inverted"]`` says so. Colour (RGB, YBR_* and PALETTE COLOR) comes out
as RGB in its stored sample type (uint8 mostly).

Geometry: the affine maps voxel index (column, row, slice) to RAS+ mm: DICOM's LPS affine built
from ImageOrientationPatient, ImagePositionPatient and the spacing, with its first two rows
negated; its slice column is the measured step from one slice position to the next, so a tilted
gantry shears it (``attrs["gantry_tilt_deg"]``). Spacing is ``PixelSpacing`` (row spacing,
column spacing) in-plane and the measured distance between consecutive slice positions along
the normal -- never SliceThickness, except for a lone slice, which has nothing to measure.

Modules, one per concern: :mod:`~medflow.readers.dicom.files` (recognising and parsing files),
:mod:`~medflow.readers.dicom.headers` (one file's header, grouping), :mod:`~medflow.readers.dicom.scan` (the fast
header scan), :mod:`~medflow.readers.dicom.series` (opening a series' files), :mod:`~medflow.readers.dicom.geometry`
(planes, stacking, affine), :mod:`~medflow.readers.dicom.enhanced` (enhanced multi-frame objects),
:mod:`~medflow.readers.dicom.mosaic` (Siemens mosaics), :mod:`~medflow.readers.dicom.facts` (per-plane
acquisition facts), :mod:`~medflow.readers.dicom.assembly` (parts and volumes: 4D assembly),
:mod:`~medflow.readers.dicom.pixels` (decoding) and :mod:`~medflow.readers.dicom.volume` (assembling images:
:func:`read_dicom_series`, :func:`read_dicom_parts`); :mod:`~medflow.readers.dicom.values` holds the small
value parsers and error wording they share. Size limits are :mod:`medflow.readers.limits`.
"""

from medflow.readers.dicom.files import is_dicom
from medflow.readers.dicom.geometry import (
    ORIENTATION_TOLERANCE,
    SLICE_TOLERANCE_MM,
    SLICE_TOLERANCE_REL,
)
from medflow.readers.dicom.headers import DicomHeader, group_by_series, read_dicom_header
from medflow.readers.dicom.scan import read_dicom_headers
from medflow.readers.dicom.volume import DicomPart, DicomParts, read_dicom_parts, read_dicom_series

__all__ = [
    "ORIENTATION_TOLERANCE",
    "SLICE_TOLERANCE_MM",
    "SLICE_TOLERANCE_REL",
    "DicomHeader",
    "DicomPart",
    "DicomParts",
    "group_by_series",
    "is_dicom",
    "read_dicom_header",
    "read_dicom_headers",
    "read_dicom_parts",
    "read_dicom_series",
]
