"""visionflow components: everything that computes, importable and testable without Prefect."""
