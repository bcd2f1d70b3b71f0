# The image of the NeMo-Aligner stages (GRPO, RLOO, online RPO and the reward servers):
# NeMo-Aligner's own image plus this project.
#
# Build Aligner's image from its v0.7.0 Dockerfile first (NeMo 2.1.0, megatron-core 0.10,
# TensorRT-LLM 0.13, PyTriton 0.5.10, Apex and Transformer Engine on the PyTorch 24.07 image; its
# checkout at /opt/NeMo-Aligner holds the example scripts and configs the wheel lacks, NeMo's at
# /opt/NeMo the checkpoint converters):
#
#   docker buildx build -t nemo-aligner:0.7.0 --build-arg ALIGNER_COMMIT=v0.7.0 \
#       https://github.com/NVIDIA/NeMo-Aligner.git#v0.7.0
#
# then this one from the repository root:
#
#   docker buildx build -f docker/aligner.Dockerfile -t nemo_plugins-aligner:0.7.0 .
#
# The project goes in with --no-deps: its core requirement ortools needs a protobuf NeMo pins
# lower, and everything else its aligner modules import (torch, numpy, tokenizers, jinja2,
# omegaconf, lightning, safetensors) the image already has. Of the `aligner` extra, only
# math-verify (the accuracy reward) is not in Aligner's image; NeMo, Aligner, PyTriton and
# megatron-core stay the image's own. antlr4 stays at 4.9.3, the version omegaconf needs.
ARG BASE_IMAGE=nemo-aligner:0.7.0
FROM ${BASE_IMAGE}

RUN pip install --no-cache-dir --no-deps "math-verify==0.9.0" "latex2sympy2_extended==1.11.0" \
 && pip install --no-cache-dir "antlr4-python3-runtime==4.9.3" "sympy>=1.12"

COPY setup.py README.md constraints-aligner.txt /opt/nemo_plugins/
COPY nemo_plugins /opt/nemo_plugins/nemo_plugins
COPY conf /opt/nemo_plugins/conf
# editable, so conf/ (the Aligner Hydra configs, /opt/nemo_plugins/conf/aligner) is found beside the package
RUN pip install --no-cache-dir --no-deps -e /opt/nemo_plugins \
 && python -c "import nemo_aligner, pytriton, math_verify, nemo_plugins.aligner.reward_server, nemo_plugins.aligner.online_rpo"
