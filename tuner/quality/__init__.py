"""Sample quality: `extractors` (Inception, mnist-cnn) and `extractor_train`, `fid` (Fréchet
distance and reference statistics), `floor` (the sequential sampler's FID spread over seeds),
`distributed` (sampling split over torchrun ranks), `paired` (the one per-sample drift
definition) and `fid_run` (what the `fid` command computes).

May import tuner.bundled and tarflow only.
"""
