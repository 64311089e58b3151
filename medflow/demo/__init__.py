"""Demo data: a synthetic archive (DICOM, NIfTI, pictures, video, raw low-dose projections) and
the demo's tiny models, written with the real libraries; no real patients."""
