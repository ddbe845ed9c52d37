"""One module per stage. `STAGES` maps the CLI name to `module:Class`; classes are imported on use."""

from __future__ import annotations

from importlib import import_module

STAGES: dict[str, str] = {
    "scenes": "kaleido_s2v.curation.stages.scenes:SceneStage",
    "quality": "kaleido_s2v.curation.stages.quality:QualityStage",
    "caption": "kaleido_s2v.curation.stages.caption:CaptionStage",
    "subjects": "kaleido_s2v.curation.stages.subjects:SubjectsStage",
    "ground": "kaleido_s2v.curation.stages.ground:GroundStage",
    "segment": "kaleido_s2v.curation.stages.segment:SegmentStage",
    "filter": "kaleido_s2v.curation.stages.filter:FilterStage",
    "face": "kaleido_s2v.curation.stages.face:FaceStage",
    "crosspair": "kaleido_s2v.curation.stages.crosspair:CrossPairStage",
    "inpaint": "kaleido_s2v.curation.stages.inpaint:InpaintStage",
    "redux": "kaleido_s2v.curation.stages.redux:ReduxStage",
    "export": "kaleido_s2v.curation.stages.export:ExportStage",
}


def stage_class(name: str):
    module, cls = STAGES[name].split(":")
    return getattr(import_module(module), cls)
