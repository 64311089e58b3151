"""A PACS as archive and as destination: DICOMweb discovery and retrieval, a DICOM receiver
(C-STORE SCP), and findings written back as DICOM Structured Reports (no Prefect here)."""
