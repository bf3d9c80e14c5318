"""Pipeline stages. Each module defines:

    VERSION    str; bump it when the stage's output for the same inputs changes
    KIND       the artifact kind it produces
    KEYED_ON   the spec sections it reads (it can read no others: see pipeline.SpecView)
    INPUTS     upstream stages whose artifacts it reads
    READS      (optional) {upstream: (file, ...)}: the only files of that input it reads, so
               they alone key it (a rerun upstream that changes only its stats leaves it cached)
    external_files(spec, spec_dir) -> {label: Path}   (optional) files whose bytes key the stage
    run(ctx: pipeline.StageContext) -> dict            writes into ctx.out, returns a summary

Heavy imports (torch, transformers, litellm, onnxruntime) stay inside run() or in the modules
it calls, so `distill plan` can import every stage cheaply. Artifact formats: docs/ARTIFACTS.md.
"""
