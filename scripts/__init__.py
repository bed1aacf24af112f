"""Command-line tools beside the pack (demo, assets, measurements, the import-graph check): run each one from the
repository root as ``python -m scripts.<name>``, so the repository's packages import without path edits."""
