"""Stage entry points: one function per pipeline stage, called by the CLI, dvc.yaml and the Prefect flows."""
