"""Snakemake adapter: tile heatmaps of one run, for one slide (rule heatmap) or k risk-ranked slots."""

from pathlib import Path

from modaltune.heatmaps import make_heatmaps, make_ranked_heatmaps
from modaltune.shards import expand_feature_inputs
from modaltune.workflow import limit_threads, log_to

limit_threads(snakemake.threads)
out, p = snakemake.output, snakemake.params
common = dict(
    run_dir=str(Path(snakemake.input.state).parent),
    cases=snakemake.input.cases,
    splits=snakemake.input.splits,
    fold=int(p.fold),
    pathways_path=snakemake.input.pathways,
    feature_files=expand_feature_inputs(snakemake.input.features),
    sheet=list(snakemake.input.sheets),
    score=p.score,
    top_tiles=p.top_tiles,
    thumbnail_px=p.thumbnail_px,
)
with log_to(snakemake.log[0]):
    if "which" in p.keys():
        parts = zip(out.h5, out.png, out.tiles, out.geojson, strict=True)
        slots = [dict(h5=a, png=b, tiles=c, geojson=d) for a, b, c, d in parts]
        make_ranked_heatmaps(predictions=snakemake.input.predictions, k=p.k, which=p.which, outputs=slots, **common)
    else:
        outputs = [dict(h5=out.h5, png=out.png, tiles=out.tiles, geojson=out.geojson)]
        make_heatmaps(slides=[snakemake.wildcards.slide], outputs=outputs, **common)
