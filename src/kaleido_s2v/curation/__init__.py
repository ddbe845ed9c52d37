"""S2V data curation (`kaleido-s2v curate`): stages, the local runner and the Ray Data driver.

`run_pipeline(inputs, output_dir, stage_names, config)` (alias `curate`) runs the named stages; see
docs/curate.md. Ray is imported only by `ray_driver`.
"""

from .runner import run_pipeline

curate = run_pipeline

__all__ = ["curate", "run_pipeline"]
