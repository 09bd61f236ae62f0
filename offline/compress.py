"""MoE-SVD compression, the public entry: `compress(model_dir, out_dir, CompressionOptions(...)) -> Path`.

Where things live (docs/format.md describes what is written):
  offline/pipeline.py             the layer-sequential pipeline and `compress` (stages, writer, reports)
  offline/compression_options.py  `CompressionOptions`: every option with its help (the CLI is generated)
  offline/methods/                one module per method, registered by name (`--method`)
  offline/sensitivity.py          S_L (Eq. 4) and the plan; offline/decompose.py the linear algebra;
  offline/slimming.py             neuron selection; offline/calibration.py data and statistics hooks
"""

from __future__ import annotations

from offline.compression_options import CompressionOptions, OptionsError
from offline.pipeline import compress

__all__ = ["CompressionOptions", "OptionsError", "compress"]
