"""The Prefect tasks of the pipeline: thin wrappers that call the library (readers, denoising,
encoders, storage) and record what happened."""
