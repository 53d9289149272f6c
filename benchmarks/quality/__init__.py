"""Quality benchmark v2: synthetic heads with a truth (several views, truth albedo and light),
baselines (the model's mean face), a peer (eos), and real photos. Entry point:
`benchmarks/quality_v2.py`. Only `reconstruction.py` touches the reconstruction pipeline."""
