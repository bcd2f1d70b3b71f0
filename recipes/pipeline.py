"""Run the main job as a plain script: `python recipes/pipeline.py [key=value ...]`.

The same as `nemo-plugins pipeline`; a starting point for scripts of your own.
"""

import logging
import sys

from nemo_plugins.config import DEFAULT_CONFIGS, ConfigError, load_config
from nemo_plugins.pipeline import PipelineConfig, run_pipeline

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(PipelineConfig, DEFAULT_CONFIGS, sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
    run_pipeline(cfg)
